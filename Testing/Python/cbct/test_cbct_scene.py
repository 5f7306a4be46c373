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
from deepsegrecon.results import VolumeResult  # noqa: E402
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

    # the worker's default (sart-unet) falls back to SART: this store holds no refiner
    expected = ("rtk", "sart") if available() else ("torch", "dif-gaussian")
    assert logic.result.report["skipped"] == (["sart-unet (no refiner installed)"] if available() else
                                              ["sart (needs itk-rtk; backend torch)",
                                               "admm-tv (needs itk-rtk; backend torch)",
                                               "sart-unet (needs itk-rtk; backend torch)"])
    assert (logic.result.report["backend"], logic.result.report["method"]) == expected
    assert recon.GetName() == "phantom CBCT recon" and fdk.GetName() == "phantom CBCT fdk"
    for vol in (recon, fdk):
        img = volume_node_to_image(vol)
        assert img.same_grid(ct)  # oblique direction and anisotropic spacing through MRML
    report = logic.result.report
    t = table.GetTable()
    rows = {t.GetValue(r, 0).ToString(): [t.GetValue(r, c).ToDouble() for c in (1, 2, 3)]
            for r in range(table.GetNumberOfRows())}
    assert table.GetNumberOfRows() == len(report["metrics"]) == len(report["methods"]) + 1  # + the network alone
    assert t.GetValue(0, 0).ToString() == ("SART" if expected[1] == "sart" else "DIF-Gaussian + data consistency")
    fdk = report["metrics"]["fdk"]
    assert rows["FDK"] == pytest.approx([fdk["psnr_db"], fdk["ssim"], report["timings_s"]["fdk_s"]])
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 3


def _table_rows(table):
    t = table.GetTable()
    assert [t.GetColumnName(c) for c in range(4)] == ["method", "PSNR (dB)", "SSIM", "seconds"]
    return [(t.GetValue(r, 0).ToString(), *[t.GetValue(r, c).ToDouble() for c in (1, 2, 3)])
            for r in range(t.GetNumberOfRows())]


def test_metrics_table_lists_every_method_default_first(setup):
    """Every method in the result's metrics gets a row (name, PSNR, SSIM, seconds), the report's method first;
    without a reference there is no table."""
    scene, node, ct, logic = setup
    scores = {"fdk": (18.2, 0.41), "sart": (25.5, 0.71), "cg": (22.4, 0.62), "admm_tv": (23.8, 0.66),
              "dif_gaussian": (26.2, 0.74), "dif_gaussian_network_only": (21.7, 0.60)}
    timings = {"fdk_s": 0.4, "sart_s": 3.1, "cg_s": 5.2, "admm_tv_s": 9.8, "dif_gaussian_s": 7.5,
               "dif_gaussian_network_s": 2.5}
    report = {"method": "sart", "views": 10, "refine_iters": 8, "timings_s": timings,
              "metrics": {k: {"psnr_db": p, "ssim": s, "window_hu": [-1000, 1000]} for k, (p, s) in scores.items()}}
    volumes = {"recon": ct, "fdk": ct, "cg": ct}
    nodes = logic._import_result(VolumeResult(volumes, report))
    table = nodes[-1]
    name = logic.output_name()
    assert [n.GetName() for n in nodes] == [f"{name} recon", f"{name} fdk", f"{name} metrics (10 views)"]
    assert table is logic.metrics_table and table.GetScene() is scene
    assert _table_rows(table) == [
        ("SART", 25.5, 0.71, 3.1),
        ("DIF-Gaussian + data consistency", 26.2, 0.74, 7.5),
        ("DIF-Gaussian (network alone)", 21.7, 0.60, 2.5),
        ("FDK", 18.2, 0.41, 0.4),
        ("conjugate gradient", 22.4, 0.62, 5.2),
        ("ADMM-TV", 23.8, 0.66, 9.8)]
    # the torch backend's run: DIF-Gaussian chosen, no data consistency, a method without its time
    report = {**report, "method": "dif-gaussian", "refine_iters": 0, "timings_s": {"fdk_s": 0.4},
              "metrics": {k: report["metrics"][k] for k in ("fdk", "dif_gaussian")}}
    table = logic._import_result(VolumeResult({"recon": ct, "fdk": ct}, report))[-1]
    rows = _table_rows(table)
    assert [r[:3] for r in rows] == [("DIF-Gaussian", 26.2, 0.74), ("FDK", 18.2, 0.41)]
    assert np.isnan(rows[0][3]) and rows[1][3] == 0.4
    assert table.GetName() == f"{name} metrics (10 views)_1"
    count = scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    assert len(logic._import_result(VolumeResult({"recon": ct}, {**report, "metrics": None}))) == 1
    assert logic.metrics_table is None and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == count


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
