"""Segment Brain Tumour logic on a real MRML scene (slicer-core): a worker process runs the task on phantom
volumes, three overlapping region segments and a volume table come into the scene; missing inputs and bad
selections leave the scene unchanged."""

import numpy as np
import pytest
import slicer

from deepsegrecon import scene as sc
from deepsegrecon.brain import labels as L
from deepsegrecon.errors import InputError
from deepsegrecon.scene.brain import SegmentBrainTumorLogic


@pytest.fixture(scope="module")
def phantom():
    from deepsegrecon.brain.phantom import make_phantom

    return make_phantom(100_005)


@pytest.fixture
def setup(tmp_path, phantom):
    mrml = slicer.vtkMRMLScene()
    nodes = {m: sc.image_to_volume_node(mrml, img, f"case {m}") for m, img in phantom["images"].items()}
    logic = SegmentBrainTumorLogic(mrml, job_root=tmp_path / "jobs", env={"OMP_NUM_THREADS": "1"})
    yield mrml, nodes, logic
    logic.cancel()


def _count(mrml, cls):
    return mrml.GetNumberOfNodesByClass(cls)


def test_flair_and_t1c_give_region_segments_and_volume_table(setup, phantom):
    mrml, nodes, logic = setup
    out = logic.run({"t1": None, "t1c": nodes["t1c"], "t2": None, "flair": nodes["flair"]},
                    {"device": "cpu", "model": "phantom-v1"},  # a phantom: the phantom-trained weights
                    timeout=600)
    seg, table = out
    assert isinstance(seg, slicer.vtkMRMLSegmentationNode) and isinstance(table, slicer.vtkMRMLTableNode)
    s = seg.GetSegmentation()
    names = [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]
    assert names == ["enhancing_tumor", "tumor_core", "whole_tumor"]
    assert [tuple(round(c, 3) for c in s.GetNthSegment(i).GetColor()) for i in range(3)] == \
        [L.COLORS[n] for n in names]
    assert "Neoplasm" in s.GetNthSegment(0).GetTerminology()
    # the three regions overlap (one layer each) and are nested; voxel counts equal the result's
    from vtk.util.numpy_support import vtk_to_numpy

    assert s.GetNumberOfLayers() == 3
    counts = [int((vtk_to_numpy(s.GetNthSegment(i).GetRepresentation("Binary labelmap").GetPointData()
                                .GetScalars()) > 0).sum()) for i in range(3)]
    regions = L.to_regions(logic.result.labelmap.array)
    assert counts == [int(r.sum()) for r in regions] and 0 < counts[0] < counts[1] < counts[2]
    t = table.GetTable()
    rows = {t.GetValue(r, 0).ToString(): t.GetValue(r, 1).ToDouble() for r in range(t.GetNumberOfRows())}
    vols = logic.volumes_ml()
    assert list(rows) == list(L.REGION_NAMES) and all(abs(rows[k] - vols[k]) < 1e-6 for k in rows)
    true = L.region_volumes_ml(phantom["labels"].array, (2, 2, 2))
    assert rows["enhancing_tumor"] <= rows["tumor_core"] <= rows["whole_tumor"]
    assert abs(rows["whole_tumor"] - true["whole_tumor"]) < 0.35 * true["whole_tumor"]
    assert logic.inputs_message() == "Inputs used: T1c, FLAIR (without T1, T2)"


def test_missing_required_input_refused_scene_unchanged(setup):
    mrml, nodes, logic = setup
    before = mrml.GetNumberOfNodes()
    with pytest.raises(InputError, match="FLAIR and T1c"):
        logic.start({"t1": nodes["t1"], "t2": nodes["t2"], "t1c": nodes["t1c"], "flair": None}, {})
    with pytest.raises(InputError, match="unknown inputs"):
        logic.start({"dwi": nodes["t1"], "t1c": nodes["t1c"], "flair": nodes["flair"]}, {})
    assert mrml.GetNumberOfNodes() == before and not logic.running


def test_cancel_leaves_the_scene_unchanged(setup):
    import time

    mrml, nodes, logic = setup
    before = mrml.GetNumberOfNodes()
    logic.start({m: nodes[m] for m in ("t1", "t1c", "t2", "flair")}, {"device": "cpu"})
    time.sleep(0.5)
    t0 = time.monotonic()
    logic.cancel()
    assert time.monotonic() - t0 < 2.5
    assert logic.poll()["state"] == "cancelled" and not logic.running
    assert mrml.GetNumberOfNodes() == before and logic.output_nodes == []


def test_region_segments_added_to_the_training_set_become_brats_labels(tmp_path, phantom):
    """A corrected Segment Brain Tumour output (overlapping enhancing_tumor / tumor_core / whole_tumor segments)
    added to the training set is stored with the model's sub-region labels (necrotic core, oedema, enhancing),
    voxel for voxel the labels the regions were made from."""
    from deepsegrecon.results import SegmentationResult
    from deepsegrecon.scene.brain import regions_to_segmentation_node
    from deepsegrecon.scene.training import TrainingLogic
    from deepsegrecon.segio import read_seg_nrrd

    mrml = slicer.vtkMRMLScene()
    nodes = {m: sc.image_to_volume_node(mrml, phantom["images"][m], f"case {m}") for m in ("t1c", "flair")}
    truth = phantom["labels"]
    seg = regions_to_segmentation_node(mrml, SegmentationResult(truth, L.region_infos()), nodes["t1c"])
    logic = TrainingLogic(mrml, "brain-tumor", training_root=tmp_path / "cases", python=None,
                          job_root=tmp_path / "jobs")
    folder = logic.add_to_training_set(nodes, seg)
    stored = read_seg_nrrd(folder / "label.seg.nrrd").labelmap
    assert stored.same_grid(truth)
    assert np.array_equal(np.asarray(stored.array), np.asarray(truth.array))  # BraTS 2023 values = the model's
    names = {s.GetName() for s in (seg.GetSegmentation().GetNthSegment(i) for i in range(3))}
    assert names == set(L.REGION_NAMES)
