"""Segment Slices scene logic on a real vtkMRMLScene: a worker runs the slices task on an oblique, anisotropic
CT-like volume node; the segmentation comes in on the volume's geometry; cancel leaves the scene unchanged;
scoring against a reference fills a table node."""

import math

import numpy as np
import pytest
import slicer
import torch

from conftest import oblique_direction
from deepsegrecon import scene as sc
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.scene.slices import SegmentSlicesLogic
from deepsegrecon.slices.labels import read_label_set
from deepsegrecon.slices.nets import build_net
from deepsegrecon.slices.task import load_model, segment
from deepsegrecon.store import ModelStore
from test_slices_cli import TINY


def _ct():
    k, j, i = np.meshgrid(np.arange(14), np.arange(40), np.arange(36), indexing="ij")
    body = ((j - 20) * 0.9) ** 2 + ((i - 18) * 1.1) ** 2 < 15 ** 2
    organ = body & ((((j - 16) * 0.9) ** 2 + ((i - 14) * 1.1) ** 2) < 6 ** 2)
    arr = np.where(body, 40.0, -1000.0) + np.where(organ, 100.0, 0.0)
    return Image(arr.astype(np.int16), (1.1, 0.9, 2.5), (-30.0, 12.0, 80.0), oblique_direction())


@pytest.fixture
def setup(tmp_path, monkeypatch):
    home, builtin = tmp_path / "home", tmp_path / "builtin"
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(home))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(builtin))
    torch.manual_seed(3)
    net = build_net(TINY)
    with torch.no_grad():  # bias the head so that some organs are found by the untrained net
        net.net.head.bias.copy_(torch.linspace(0.0, 0.4, TINY["out_channels"]))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ModelStore().write_version("slices", "tiny", {"model.pt": tmp_path / "model.pt"},
                               {"task": "slices", "network": TINY})
    mrml = slicer.vtkMRMLScene()
    image = _ct()
    volume = sc.image_to_volume_node(mrml, image, "CT")
    logic = SegmentSlicesLogic(mrml, job_root=tmp_path / "jobs",
                               env={"DEEPSEGRECON_HOME": str(home), "DEEPSEGRECON_BUILTIN_MODELS": str(builtin)})
    yield mrml, volume, image, logic
    logic.cancel()
    mrml.Clear(1)


def test_run_imports_the_engine_result_on_the_volume_geometry(setup):
    mrml, volume, image, logic = setup
    seen = []
    logic.start({"image": volume}, {"device": "cpu", "model": "tiny"})
    status = logic.wait(timeout=120, on_progress=seen.append, poll_interval=0.1)
    assert status["state"] == "succeeded", status
    assert any(s["state"] == "running" for s in seen) and status["fraction"] == 1.0
    (seg,) = logic.output_nodes
    # the same labels as the engine run in this process, on the volume's (oblique, anisotropic) grid
    expected = segment(image, load_model(ModelStore().get("slices", "tiny")), read_label_set(), "cpu")
    assert expected.segments, "the biased tiny net finds at least one organ"
    lab, infos = sc.segmentation_node_to_labelmap(seg, volume)
    assert lab.same_grid(image)
    names = {i.name: i.label for i in infos}
    assert sorted(names) == sorted(s.name for s in expected.segments)
    for s in expected.segments:
        np.testing.assert_array_equal(lab.array == names[s.name], expected.labelmap.array == s.label)
    assert logic.warnings() == []
    # scoring against the engine's own labels: Dice 1 and HD95 0 for every organ found, others absent
    ref = sc.image_to_volume_node(mrml, expected.labelmap, "reference", labelmap=True)
    table = mrml.AddNewNodeByClass("vtkMRMLTableNode", "metrics")
    scores = logic.score(seg, ref, volume, table_node=table)
    assert scores["mean_dice"] == 1.0 and scores["mean_hd95_mm"] == 0.0
    assert table.GetNumberOfRows() == 8 and table.GetTable().GetColumnByName("dice") is not None
    for organ, m in scores["per_organ"].items():
        assert m["status"] == ("ok" if organ in names else "absent")


def test_cancel_leaves_the_scene_unchanged(setup):
    mrml, volume, image, logic = setup
    before = mrml.GetNumberOfNodes()
    logic.start({"image": volume}, {"device": "cpu", "model": "tiny"})
    logic.cancel()
    assert logic.poll()["state"] == "cancelled"
    assert mrml.GetNumberOfNodes() == before and logic.output_nodes == []


def test_score_refuses_a_reference_of_another_geometry(setup):
    mrml, volume, image, logic = setup
    seg = sc.result_to_segmentation_node(
        mrml, segment(image, load_model(ModelStore().get("slices", "tiny")), read_label_set(), "cpu"),
        reference_volume_node=volume, name="organs")
    other = Image(np.zeros((14, 40, 30), np.uint8), image.spacing, image.origin, image.direction)
    ref = sc.image_to_volume_node(mrml, other, "other", labelmap=True)
    with pytest.raises(InputError, match="another geometry"):
        logic.score(seg, ref, volume)
    with pytest.raises(InputError, match="choose a reference"):
        logic.score(seg, None, volume)
    same = logic.score(seg, seg, volume)  # a segmentation node as the reference: segments matched by name
    assert same["mean_dice"] == 1.0 and not any(math.isinf(m["hd95_mm"] or 0) for m in same["per_organ"].values())
