"""Closed surfaces, model nodes in a subject-hierarchy folder, STL/OBJ files (LPS) and the headless export."""

import numpy as np
import pytest
import slicer
import vtk

from deepsegrecon import scene as sc
from deepsegrecon.errors import InputError
from deepsegrecon.scene.export import export_segmentation_result
from scene_testdata import block_ijk_box, oblique_grid, polydata_points, ras_to_ijk, teeth_result

LABELS = {"tooth_11": 11, "mandible": 2, "tooth_36": 36}


@pytest.fixture
def teeth_scene():
    mrml = slicer.vtkMRMLScene()
    result = teeth_result()
    volume = sc.image_to_volume_node(mrml, oblique_grid(), "cbct")
    seg = sc.result_to_segmentation_node(mrml, result, volume, name="teeth")
    yield mrml, seg, result
    mrml.Clear(1)


# Slicer's conversion puts an unsmoothed surface exactly on the voxel edges; its smoothing step (windowed sinc
# on the padded labelmap) moves the flat faces of a box up to half a voxel outwards.
SMOOTHED_MARGIN = 0.55


def _check_inside(grid, points_ras, label, margin=SMOOTHED_MARGIN):
    """Every surface point lies within the label's voxels (edges included, plus ``margin`` voxels), in the
    image's IJK frame, and the surface spans the label to within one voxel on each axis."""
    ijk = ras_to_ijk(grid, points_ras)
    lo, hi = block_ijk_box(label)
    assert np.all(ijk >= lo - margin) and np.all(ijk <= hi + margin), (ijk.min(0), ijk.max(0), lo, hi)
    assert np.all(ijk.min(0) <= lo + 1.0) and np.all(ijk.max(0) >= hi - 1.0)


def test_closed_surfaces_lie_in_their_labels(teeth_scene):
    mrml, seg, result = teeth_scene
    surfaces = sc.create_closed_surfaces(seg, smoothing=0.5)
    assert set(surfaces) == set(LABELS)
    assert seg.GetSegmentation().GetConversionParameter("Smoothing factor") == "0.5"
    for name, poly in surfaces.items():
        assert poly.GetNumberOfPoints() > 20 and poly.GetNumberOfPolys() > 20
        _check_inside(result.labelmap, polydata_points(poly), LABELS[name])
    # without smoothing the surface is exactly on the label's voxel edges: the whole oblique geometry is right
    rough = sc.create_closed_surfaces(seg, smoothing=0.0)
    assert seg.GetSegmentation().GetConversionParameter("Smoothing factor") == "0.0"
    for name, poly in rough.items():
        ijk = ras_to_ijk(result.labelmap, polydata_points(poly))
        lo, hi = block_ijk_box(LABELS[name])
        np.testing.assert_allclose(ijk.min(0), lo, atol=1e-3)
        np.testing.assert_allclose(ijk.max(0), hi, atol=1e-3)
    # the factor is used: strong smoothing gives another surface
    rough_points = polydata_points(rough["tooth_11"])
    smooth = polydata_points(sc.create_closed_surfaces(seg, smoothing=1.0)["tooth_11"])
    assert not np.allclose(np.ptp(smooth, axis=0), np.ptp(rough_points, axis=0), atol=1e-3)
    with pytest.raises(InputError, match="between 0 and 1"):
        sc.create_closed_surfaces(seg, smoothing=2)


def test_models_in_subject_hierarchy_folder(teeth_scene):
    mrml, seg, result = teeth_scene
    sc.create_closed_surfaces(seg, 0.5)
    n_before = mrml.GetNumberOfNodes()
    folder = sc.export_segments_to_models(mrml, seg, "teeth models")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml)
    assert sh.GetItemName(folder) == "teeth models"
    models = sc.folder_models(mrml, folder)
    assert [m.GetName() for m in models] == list(LABELS)
    assert mrml.GetNumberOfNodesByClass("vtkMRMLModelNode") == 3
    assert mrml.GetNumberOfNodes() > n_before
    for model in models:
        _check_inside(result.labelmap, polydata_points(model.GetPolyData()), LABELS[model.GetName()])
        assert model.GetDisplayNode().GetColor() == pytest.approx(
            seg.GetSegmentation().GetSegment(model.GetName()).GetColor())
    # a subset into a second folder
    folder2 = sc.export_segments_to_models(mrml, seg, segment_ids=["mandible"])
    assert [m.GetName() for m in sc.folder_models(mrml, folder2)] == ["mandible"]
    assert mrml.GetNumberOfNodesByClass("vtkMRMLModelNode") == 4
    with pytest.raises(InputError, match="no segments"):
        sc.export_segments_to_models(mrml, seg, segment_ids=["nope"])


def _read(path):
    reader = vtk.vtkSTLReader() if str(path).endswith(".stl") else vtk.vtkOBJReader()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()


def test_stl_and_obj_files_in_lps(teeth_scene, tmp_path):
    mrml, seg, result = teeth_scene
    surfaces = sc.create_closed_surfaces(seg, 0.3)
    stl = sc.export_surfaces(seg, tmp_path / "models", "stl")
    obj = sc.export_surfaces(seg, tmp_path / "models", "OBJ", segment_ids=["tooth_11"])
    assert [p.name for p in stl] == ["tooth_11.stl", "mandible.stl", "tooth_36.stl"]
    assert [p.name for p in obj] == ["tooth_11.obj"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        ["tooth_11.stl", "mandible.stl", "tooth_36.stl", "tooth_11.obj", "tooth_11.mtl"])
    for path in stl + obj:
        name = path.stem
        poly = _read(path)
        assert poly.GetNumberOfPoints() > 20
        lps = polydata_points(poly)
        ras = lps * [-1, -1, 1]
        _check_inside(result.labelmap, ras, LABELS[name])
        b = np.array(surfaces[name].GetBounds()).reshape(3, 2)  # RAS bounds of the segment's surface
        lps_bounds = np.array(poly.GetBounds()).reshape(3, 2)
        np.testing.assert_allclose(lps_bounds[0], -b[0][::-1], atol=1e-3)  # L = -R
        np.testing.assert_allclose(lps_bounds[1], -b[1][::-1], atol=1e-3)  # P = -A
        np.testing.assert_allclose(lps_bounds[2], b[2], atol=1e-3)
    assert "Kd 0.95 0.9 0.7" in (tmp_path / "models" / "tooth_11.mtl").read_text()
    with pytest.raises(InputError, match="not supported"):
        sc.export_surfaces(seg, tmp_path, "ply")


def test_export_segmentation_result(tmp_path):
    result = teeth_result()
    out = export_segmentation_result(result, oblique_grid(), tmp_path / "stage", "case1", formats=("stl", "obj"),
                                     mrb=True, smoothing=0.5)
    models = tmp_path / "stage" / "case1_models"
    assert out["models_dir"] == models
    assert [p.name for p in out["files"]["stl"]] == ["tooth_11.stl", "mandible.stl", "tooth_36.stl"]
    assert [p.name for p in out["files"]["obj"]] == ["tooth_11.obj", "mandible.obj", "tooth_36.obj"]
    assert out["mrb"] == tmp_path / "stage" / "case1.mrb" and out["mrb"].stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["case1.mrb", "case1_models"]
    assert set(out["surfaces"]) == set(LABELS)
    for name, poly in out["surfaces"].items():  # still valid after the export's scene is gone
        _check_inside(result.labelmap, polydata_points(poly), LABELS[name])
    with pytest.raises(InputError, match="not on the grid"):
        export_segmentation_result(result, _shifted(oblique_grid()), tmp_path / "x", "c")
    with pytest.raises(InputError, match="not supported"):
        export_segmentation_result(result, None, tmp_path / "y", "c", formats=("ply",))


def _shifted(img):
    from deepsegrecon.image import Image

    return Image(img.array, img.spacing, np.add(img.origin, 1.0), img.direction)
