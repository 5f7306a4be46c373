"""Engine Image/results <-> MRML nodes on a real vtkMRMLScene: oblique direction, anisotropic spacing,
LPS/RAS and (k, j, i) vs (i, j, k) order, through Slicer's own segmentation storage node and slicerio."""

import numpy as np
import pytest
import slicer
import slicerio
import slicerio.segmentation
import vtk

from deepsegrecon import scene as sc
from deepsegrecon import segio
from deepsegrecon.errors import InputError
from deepsegrecon.image import LPS_TO_RAS
from deepsegrecon.results import SegmentationResult
from deepsegrecon.scene._mrml import np_matrix, vtk_matrix
from scene_testdata import TOOTH_TERMINOLOGY, oblique_grid, teeth_result


@pytest.fixture
def mrml():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def _ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np_matrix(m)


def test_volume_round_trip_exact(mrml, oblique_image):
    node = sc.image_to_volume_node(mrml, oblique_image, "ct")
    assert node.GetScene() is mrml and node.GetDisplayNode() is not None
    np.testing.assert_allclose(_ijk_to_ras(node), LPS_TO_RAS @ oblique_image.ijk_to_lps(), atol=1e-12)
    data = node.GetImageData()
    assert data.GetDimensions() == oblique_image.size == (11, 9, 7)
    # VTK (i, j, k) index <-> numpy [k, j, i]: the voxel value encodes k*10000 + j*100 + i
    for i, j, k in [(0, 0, 0), (10, 0, 0), (3, 8, 1), (2, 5, 6)]:
        assert data.GetScalarComponentAsDouble(i, j, k, 0) == k * 10000 + j * 100 + i
        ras = _ijk_to_ras(node) @ [i, j, k, 1]
        lps = oblique_image.physical_points([[i, j, k]])[0]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    back = sc.volume_node_to_image(node)
    assert back.same_grid(oblique_image, tol=1e-12)
    np.testing.assert_array_equal(back.array, oblique_image.array)
    assert back.array.dtype == oblique_image.array.dtype
    # update in place: same node, new voxels
    n = mrml.GetNumberOfNodes()
    sc.image_to_volume_node(mrml, oblique_image.with_array(oblique_image.array * 2), "ct", node=node)
    assert mrml.GetNumberOfNodes() == n
    np.testing.assert_array_equal(sc.volume_node_to_image(node).array, oblique_image.array * 2)


def test_linear_parent_transform_is_applied_nonlinear_refused(mrml, oblique_image):
    node = sc.image_to_volume_node(mrml, oblique_image, "ct")
    t = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    rot = np.eye(4)
    rot[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    rot[:3, 3] = (10, -20, 5)
    t.SetMatrixTransformToParent(vtk_matrix(rot))
    node.SetAndObserveTransformNodeID(t.GetID())
    img = sc.volume_node_to_image(node)
    np.testing.assert_allclose(img.ijk_to_ras(), rot @ oblique_image.ijk_to_ras(), atol=1e-9)
    assert img.meta["parent_transform_applied"] == "shift"
    np.testing.assert_array_equal(img.array, oblique_image.array)

    bent = mrml.AddNewNodeByClass("vtkMRMLTransformNode", "bent")
    tps = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (20, 20, 20)]:
        src.InsertNextPoint(p)
        dst.InsertNextPoint(p[0] + 3, p[1], p[2] + (5 if p == (20, 20, 20) else 0))
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    bent.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(bent.GetID())
    with pytest.raises(InputError, match="non-linear transform 'bent'.*harden"):
        sc.volume_node_to_image(node)


def test_segmentation_node_storage_node_slicerio_identical(mrml, tmp_path):
    result = teeth_result()
    volume = sc.image_to_volume_node(mrml, oblique_grid(), "cbct")
    seg = sc.result_to_segmentation_node(mrml, result, reference_volume_node=volume, name="teeth")
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(3)] == ["tooth_11", "mandible", "tooth_36"]
    assert segmentation.GetNumberOfLayers() == 1
    for info in result.segments:
        s = segmentation.GetSegment(info.name)
        assert s.GetName() == info.name and s.GetLabelValue() == info.label
        assert s.GetColor() == pytest.approx(info.color)
    assert segmentation.GetSegment("tooth_11").GetTerminology() == TOOTH_TERMINOLOGY
    assert seg.GetNodeReference("referenceImageGeometryRef") is volume

    # Slicer's own writer
    storage = slicer.vtkMRMLSegmentationStorageNode()
    mrml.AddNode(storage)
    seg.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "mrml.seg.nrrd"))
    assert storage.WriteData(seg)
    ours = segio.write_seg_nrrd(result, tmp_path / "ours.seg.nrrd")
    for path in (tmp_path / "mrml.seg.nrrd", ours):
        back = slicerio.read_segmentation(str(path))
        np.testing.assert_array_equal(back["voxels"].transpose(2, 1, 0), result.labelmap.array)
        np.testing.assert_allclose(back["ijkToLPS"], result.labelmap.ijk_to_lps(), atol=1e-9)
        assert [(s["id"], s["name"], s["labelValue"]) for s in back["segments"]] == [
            (s.name, s.name, s.label) for s in result.segments]
        for s, info in zip(back["segments"], result.segments):
            assert s["color"] == pytest.approx(list(info.color), abs=1e-6)
        assert slicerio.segmentation.terminology_entry_to_string(back["segments"][0]["terminology"]) == TOOTH_TERMINOLOGY
        r = segio.read_seg_nrrd(path)
        assert r.labelmap.same_grid(result.labelmap, tol=1e-9)
        assert [(s.name, s.label) for s in r.segments] == [(s.name, s.label) for s in result.segments]
    # the two headers carry the same segment fields
    import nrrd

    h_mrml, h_ours = nrrd.read_header(str(tmp_path / "mrml.seg.nrrd")), nrrd.read_header(str(ours))
    seg_keys = sorted(k for k in h_mrml if k.startswith("Segment"))
    assert seg_keys == sorted(k for k in h_ours if k.startswith("Segment"))
    for k in seg_keys:
        if k.endswith(("_Color", "_Tags", "ConversionParameters")):
            continue
        assert h_mrml[k] == h_ours[k], k


def test_slicer_loads_segio_file(mrml, tmp_path):
    """Slicer's segmentation storage node reads the file segio writes: segments, labels, geometry."""
    result = teeth_result()
    path = segio.write_seg_nrrd(result, tmp_path / "ours.seg.nrrd")
    seg = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    mrml.AddNode(storage)
    seg.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(seg)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    assert segmentation.GetSegment("tooth_11").GetTerminology() == TOOTH_TERMINOLOGY
    assert segmentation.GetSegment("mandible").GetColor() == pytest.approx((0.4, 0.6, 0.9))
    image, infos = sc.segmentation_node_to_labelmap(seg)
    assert image.same_grid(result.labelmap, tol=1e-9)
    np.testing.assert_array_equal(image.array, result.labelmap.array)
    assert [(s.name, s.label) for s in infos] == [(s.name, s.label) for s in result.segments]


def test_replace_segments_in_place_and_read_back(mrml):
    result = teeth_result()
    volume = sc.image_to_volume_node(mrml, oblique_grid(), "cbct")
    seg = sc.result_to_segmentation_node(mrml, result, volume)
    n_nodes, seg_id = mrml.GetNumberOfNodes(), seg.GetID()
    only = SegmentationResult(result.labelmap, [result.segments[0]])
    same = sc.result_to_segmentation_node(mrml, only, volume, node=seg)
    assert same is seg and seg.GetID() == seg_id and mrml.GetNumberOfNodes() == n_nodes
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    image, infos = sc.segmentation_node_to_labelmap(seg, volume)
    assert [s.name for s in infos] == ["tooth_11"]
    np.testing.assert_array_equal(image.array, np.where(result.labelmap.array == 11, 11, 0))
    assert image.same_grid(result.labelmap, tol=1e-9)


def test_user_added_segment_is_read_back_with_a_free_label(mrml):
    """A segment the user paints in Slicer (its own labelmap, label value 1 in a new layer)."""
    result = teeth_result()
    volume = sc.image_to_volume_node(mrml, oblique_grid(), "cbct")
    seg = sc.result_to_segmentation_node(mrml, result, volume)
    grid = result.labelmap
    mask = np.zeros(grid.array.shape, np.uint8)
    mask[0:2, 0:3, 0:4] = 1  # (k, j, i)
    painted = slicer.vtkOrientedImageData()
    from deepsegrecon.scene.volumes import image_to_vtk_image_data

    painted.ShallowCopy(image_to_vtk_image_data(grid.with_array(mask)))
    painted.SetImageToWorldMatrix(vtk_matrix(grid.ijk_to_ras()))
    segment = slicer.vtkSegment()
    segment.SetName("caries")
    segment.SetLabelValue(1)
    segment.AddRepresentation("Binary labelmap", painted)
    seg.GetSegmentation().AddSegment(segment, "caries")
    image, infos = sc.segmentation_node_to_labelmap(seg)
    labels = {s.name: s.label for s in infos}
    assert labels["tooth_11"] == 11 and labels["mandible"] == 2 and labels["tooth_36"] == 36
    assert labels["caries"] == 1  # unique, so kept
    np.testing.assert_array_equal(image.array == 1, mask == 1)
    np.testing.assert_array_equal(image.array == 36, result.labelmap.array == 36)


def test_refuses_bad_arguments(mrml):
    result = teeth_result()
    with pytest.raises(InputError):
        sc.result_to_segmentation_node(None, result)
    with pytest.raises(InputError, match="unique"):
        sc.result_to_segmentation_node(mrml, SegmentationResult(result.labelmap, result.segments * 2))
    with pytest.raises(InputError, match="volume node"):
        sc.volume_node_to_image(mrml.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    assert mrml.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # only the one made above
    other = slicer.vtkMRMLScene()
    foreign = sc.image_to_volume_node(other, oblique_grid(), "elsewhere")
    with pytest.raises(InputError, match="same scene"):
        sc.result_to_segmentation_node(mrml, result, reference_volume_node=foreign)
    assert mrml.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    other.Clear(1)


def test_labelmap_volume_and_2d_image(mrml):
    from deepsegrecon.image import Image

    result = teeth_result()
    node = sc.image_to_volume_node(mrml, result.labelmap, "labels", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    back = sc.volume_node_to_image(node)
    np.testing.assert_array_equal(back.array, result.labelmap.array)
    assert back.same_grid(result.labelmap, tol=1e-12)

    flat = Image(np.arange(30, dtype=np.float32).reshape(5, 6), spacing=(0.5, 2.0), origin=(3.0, -4.0))
    node2 = sc.image_to_volume_node(mrml, flat, "xray")
    assert node2.GetImageData().GetDimensions() == (6, 5, 1)
    img3 = sc.volume_node_to_image(node2)
    assert img3.array.shape == (1, 5, 6)
    img2 = sc.volume_node_to_image(node2, squeeze_2d=True)
    assert img2.same_grid(flat, tol=1e-12)
    np.testing.assert_array_equal(img2.array, flat.array)
