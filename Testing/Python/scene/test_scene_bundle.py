"""Scene bundles (.mrb): saved atomically, read back with node counts and exact geometry."""

import zipfile

import numpy as np
import pytest
import slicer

from deepsegrecon import scene as sc
from deepsegrecon.errors import InputError
from scene_testdata import oblique_grid, teeth_result


def test_mrb_round_trip(tmp_path):
    mrml = slicer.vtkMRMLScene()
    result, grid = teeth_result(), oblique_grid()
    volume = sc.image_to_volume_node(mrml, grid, "cbct")
    seg = sc.result_to_segmentation_node(mrml, result, volume, name="teeth")
    sc.create_closed_surfaces(seg, 0.5)
    sc.export_segments_to_models(mrml, seg, "teeth models")
    path = sc.save_mrb(mrml, tmp_path / "case.mrb")
    assert [p.name for p in tmp_path.iterdir()] == ["case.mrb"]  # no temporary or bundle folder left
    assert mrml.GetURL() == ""  # the scene's own location is left as it was
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith(".mrml") for n in names) and any(n.endswith(".seg.nrrd") for n in names)

    loaded = sc.load_mrb(path)
    for cls, n in [("vtkMRMLScalarVolumeNode", 1), ("vtkMRMLSegmentationNode", 1), ("vtkMRMLModelNode", 3)]:
        assert loaded.GetNumberOfNodesByClass(cls) == n, cls
    vol2 = loaded.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
    img = sc.volume_node_to_image(vol2)
    assert vol2.GetName() == "cbct"
    assert img.same_grid(grid, tol=1e-6)
    np.testing.assert_array_equal(img.array, grid.array)
    seg2 = loaded.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    lab, infos = sc.segmentation_node_to_labelmap(seg2)
    assert lab.same_grid(result.labelmap, tol=1e-6)
    np.testing.assert_array_equal(lab.array, result.labelmap.array)
    assert [(s.name, s.label, s.terminology) for s in infos] == [
        (s.name, s.label, s.terminology or infos[i].terminology) for i, s in enumerate(result.segments)]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(loaded)
    models = [loaded.GetNthNodeByClass(i, "vtkMRMLModelNode") for i in range(3)]
    assert sorted(m.GetName() for m in models) == ["mandible", "tooth_11", "tooth_36"]
    assert {sh.GetItemName(sh.GetItemParent(sh.GetItemByDataNode(m))) for m in models} == {"teeth models"}
    assert all(m.GetPolyData().GetNumberOfPoints() > 20 for m in models)
    loaded.Clear(1)
    mrml.Clear(1)


def test_mrb_errors(tmp_path):
    mrml = slicer.vtkMRMLScene()
    with pytest.raises(InputError, match=".mrb"):
        sc.save_mrb(mrml, tmp_path / "case.zip")
    with pytest.raises(InputError, match="does not exist"):
        sc.load_mrb(tmp_path / "missing.mrb")
    (tmp_path / "bad.mrb").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.mrb"):
        sc.load_mrb(tmp_path / "bad.mrb")
