"""Reconstruct CBCT scene logic on a real MRML scene with a real worker process: volumes on the CT grid
(world geometry), the metrics table, projection folders as volume nodes; bad input leaves the scene unchanged."""

import json

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")

from deepsegrecon.cbct.geometry import geometry_for_grid  # noqa: E402
from deepsegrecon.cbct.net import DIFGaussian, default_network  # noqa: E402
from deepsegrecon.cbct.projio import stack_image, write_projections  # noqa: E402
from deepsegrecon.errors import InputError  # noqa: E402
from deepsegrecon.image import Image  # noqa: E402
from deepsegrecon.scene.cbct import ReconstructCBCTLogic  # noqa: E402
from deepsegrecon.scene.volumes import image_to_volume_node, volume_node_to_image  # noqa: E402

TINY = {"features": [4, 8, 8, 16], "out_ch": 8, "det_res": 32, "gs_res": 6, "decoder": [16, 8, 1]}


@pytest.fixture
def setup(tmp_path, monkeypatch, oblique_image):
    from deepsegrecon.cbct.train import write_version

    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    cfg = {**default_network(), **TINY}
    write_version(DIFGaussian(cfg), cfg, [], 0, None, "tiny", 0, 0)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (16, 18, 20)], indexing="ij")
    hu = np.where(i ** 2 + (j / 0.8) ** 2 + (k / 0.9) ** 2 < 0.7, 40.0, -1000.0).astype(np.float32)
    ct = Image(hu, (1.2, 0.8, 1.5), (4.0, -7.5, 20.0), oblique_image.direction)
    scene = slicer.vtkMRMLScene()
    node = image_to_volume_node(scene, ct, "phantom")
    logic = ReconstructCBCTLogic(scene, job_root=tmp_path / "jobs")
    yield scene, node, ct, logic
    logic.cancel()


def _node_names(scene):
    return sorted(scene.GetNthNode(n).GetName() for n in range(scene.GetNumberOfNodes()))


def test_simulate_and_reconstruct_into_the_scene(setup):
    scene, node, ct, logic = setup
    logic.simulate_and_reconstruct(node, 6, {"detector": 32, "device": "cpu"})
    status = logic.wait(timeout=240)
    assert status["state"] == "succeeded", status
    recon, fdk, table = logic.output_nodes
    from deepsegrecon.cbct.rtk_backend import available

    expected = ("rtk", "sart") if available() else ("torch", "dif-gaussian")  # the worker's default
    assert (logic.result.report["backend"], logic.result.report["method"]) == expected
    assert recon.GetName() == "phantom CBCT recon" and fdk.GetName() == "phantom CBCT fdk"
    for vol in (recon, fdk):
        img = volume_node_to_image(vol)
        assert img.same_grid(ct)  # oblique direction and anisotropic spacing through MRML
    assert table.IsA("vtkMRMLTableNode") and table.GetNumberOfRows() == 2
    t = table.GetTable()
    assert [t.GetValue(r, 0).ToString() for r in range(2)] == ["DIF-Gaussian", "FDK"]
    assert t.GetValue(1, 1).ToDouble() == pytest.approx(logic.result.report["metrics"]["fdk"]["psnr_db"])
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 3


def test_projection_folder_and_bad_reference(setup, tmp_path):
    scene, node, ct, logic = setup
    geo = geometry_for_grid(ct, 5, detector=24)
    folder = write_projections(tmp_path / "proj", stack_image(np.full((5, 24, 24), 0.3, np.float32), geo), geo)
    proj_node, geometry = logic.load_projection_folder(folder)
    assert geometry == json.loads((folder / "geometry.json").read_text())
    assert logic.geometry_of_node(proj_node) == geometry
    other = image_to_volume_node(scene, Image(ct.array, (1.0, 1.0, 1.0)), "other grid")
    before = _node_names(scene)
    fast = {"device": "cpu", "backend": "torch", "compare": []}  # the torch path: no ITK load in the worker
    logic.reconstruct_from_projections(proj_node, other, fast)
    status = logic.wait(timeout=240)
    assert status["state"] == "failed" and "reference has another geometry" in status["error"], status
    assert _node_names(scene) == before and logic.output_nodes == []
    with pytest.raises(InputError, match="no cone-beam geometry"):
        logic.reconstruct_from_projections(node)
    logic.reconstruct_from_projections(proj_node, node, fast)
    status = logic.wait(timeout=240)
    assert status["state"] == "succeeded", status
    assert volume_node_to_image(logic.output_nodes[0]).same_grid(ct)
    assert logic.output_nodes[0].GetName() == "proj projections CBCT recon"
