"""Segments -> model nodes in a subject-hierarchy folder, and surface files (STL/OBJ)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import atomic_file, check_writable_dir
from ._mrml import check_scene, ensure_converter_rules, ensure_sh_item, slicer_module, world_matrix_of
from .segmentations import CLOSED_SURFACE, _conversion_parameter, create_closed_surfaces

SURFACE_FORMATS = ("stl", "obj")


def safe_file_stem(name: str) -> str:
    """A file name from a segment name: letters, digits, '.', '_' and '-' kept, anything else '_'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "segment"
    return stem


def _segment_ids(seg_node, segment_ids=None) -> list:
    segmentation = seg_node.GetSegmentation()
    all_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if segment_ids is None:
        return all_ids
    missing = [s for s in segment_ids if s not in all_ids]
    if missing:
        raise InputError(f"segmentation '{seg_node.GetName()}' has no segments {missing}; it has {all_ids}")
    return list(segment_ids)


def _ensure_surfaces(seg_node) -> None:
    segmentation = seg_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(CLOSED_SURFACE):
        smoothing = _conversion_parameter(segmentation, "Smoothing factor") or 0.5
        create_closed_surfaces(seg_node, float(smoothing))


def export_segments_to_models(scene, seg_node, folder_name: str = None, segment_ids=None) -> int:
    """One model node per segment (Slicer's ExportSegmentsToModels), under a new subject-hierarchy folder.

    Closed surfaces are created first if the segmentation has none. Returns the folder's item ID; on failure
    the folder and any model made so far are removed.
    """
    check_scene(scene)
    slicer = slicer_module()
    if seg_node is None or not isinstance(seg_node, slicer.vtkMRMLSegmentationNode) or seg_node.GetScene() is not scene:
        raise InputError("a segmentation node in the scene is needed")
    ids = _segment_ids(seg_node, segment_ids)
    ensure_converter_rules()
    _ensure_surfaces(seg_node)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ensure_sh_item(scene, seg_node)
    before = {scene.GetNthNodeByClass(i, "vtkMRMLModelNode").GetID()
              for i in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode"))}
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), folder_name or f"{seg_node.GetName()} models")
    # In Slicer the subject-hierarchy logic gives every new node its item; headless (no application), do it here
    observer = None if hasattr(slicer, "app") else _observe_new_models(scene, folder)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToModels(seg_node, ids, folder)
        if observer is not None:
            scene.RemoveObserver(observer)
            observer = None
        if not ok:
            raise InputError(f"could not export the segments of '{seg_node.GetName()}' to models")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode")):
            model = scene.GetNthNodeByClass(i, "vtkMRMLModelNode")
            if model.GetID() not in before:
                ensure_sh_item(scene, model, folder)
    except BaseException:
        if observer is not None:
            scene.RemoveObserver(observer)
        for i in reversed(range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode"))):
            model = scene.GetNthNodeByClass(i, "vtkMRMLModelNode")
            if model.GetID() not in before:
                scene.RemoveNode(model)
        sh.RemoveItem(folder)
        raise
    return folder


def _observe_new_models(scene, folder: int) -> int:
    """Give each model node added to the scene a subject-hierarchy item under ``folder`` at once.

    Slicer's subject-hierarchy logic creates items for new nodes; ``slicer-core`` has no such logic, and the
    export sets the parent of the model's item, so create it first (in Slicer the item already exists).
    """
    import vtk
    from vtk.util.misc import calldata_type

    slicer = slicer_module()

    @calldata_type(vtk.VTK_OBJECT)
    def on_node_added(caller, event, node):
        if node is not None and node.IsA("vtkMRMLModelNode"):
            sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
            if not sh.GetItemByDataNode(node):
                sh.CreateItem(folder, node)

    return scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, on_node_added)


def folder_models(scene, folder_item: int) -> list:
    """The model nodes directly under a subject-hierarchy folder."""
    import vtk

    slicer = slicer_module()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    children = vtk.vtkIdList()
    sh.GetItemChildren(folder_item, children)
    out = []
    for i in range(children.GetNumberOfIds()):
        node = sh.GetItemDataNode(children.GetId(i))
        if node is not None and node.IsA("vtkMRMLModelNode"):
            out.append(node)
    return out


def export_surfaces(seg_node, out_dir, fmt: str = "stl", segment_ids=None, lps: bool = True) -> list:
    """Write each segment's closed surface to ``out_dir/<segment name>.<fmt>``; returns the paths.

    STL: Slicer's ``ExportSegmentsClosedSurfaceRepresentationToFiles`` (binary STL, LPS coordinates as Slicer
    writes by default, parent transforms applied). OBJ: the same world surface in LPS, written with its
    material (the segment colour) in ``<segment name>.mtl``; Slicer's own OBJ export needs a render window
    and puts every segment into one file, so it is not used. Each file appears whole (temporary + rename).
    """
    slicer = slicer_module()
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in SURFACE_FORMATS:
        raise InputError(f"surface format '{fmt}' is not supported; use one of {', '.join(SURFACE_FORMATS)}")
    if seg_node is None or not isinstance(seg_node, slicer.vtkMRMLSegmentationNode):
        raise InputError("a segmentation node is needed")
    out_dir = check_writable_dir(Path(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _segment_ids(seg_node, segment_ids)
    ensure_converter_rules()
    _ensure_surfaces(seg_node)
    segmentation = seg_node.GetSegmentation()
    stems = _unique_stems([segmentation.GetSegment(s).GetName() for s in ids])
    paths = []
    for sid, stem in zip(ids, stems):
        target = out_dir / f"{stem}.{fmt}"
        if fmt == "stl":
            _export_stl(seg_node, sid, target, lps)
        else:
            _export_obj(seg_node, sid, target, lps)
        paths.append(target)
    return paths


def _unique_stems(names: list) -> list:
    out, seen = [], {}
    for name in names:
        stem = safe_file_stem(name)
        key = stem.lower()
        if key in seen:
            seen[key] += 1
            stem = f"{stem}_{seen[key]}"
        else:
            seen[key] = 1
        out.append(stem)
    return out


def _export_stl(seg_node, segment_id: str, target: Path, lps: bool) -> None:
    import vtk

    slicer = slicer_module()
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsClosedSurfaceRepresentationToFiles(
            str(tmp_dir), seg_node, ids, "STL", bool(lps), 1.0, False)
        written = sorted(tmp_dir.glob("*.stl"))
        if not ok or len(written) != 1:
            raise InputError(f"could not export segment '{segment_id}' to STL")
        os.replace(written[0], target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def world_surface(seg_node, segment_id: str, lps: bool = False):
    """A copy of a segment's closed surface in world coordinates (RAS, or LPS), triangulated, with normals."""
    import vtk

    seg = seg_node.GetSegmentation().GetSegment(segment_id)
    poly = seg.GetRepresentation(CLOSED_SURFACE) if seg is not None else None
    if poly is None:
        raise InputError(f"segment '{segment_id}' has no closed surface")
    m = world_matrix_of(seg_node, "segmentation")
    if lps:
        m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
    transform = vtk.vtkTransform()
    transform.SetMatrix(m.ravel().tolist())
    tf = vtk.vtkTransformPolyDataFilter()
    tf.SetInputData(poly)
    tf.SetTransform(transform)
    tri = vtk.vtkTriangleFilter()
    tri.SetInputConnection(tf.GetOutputPort())
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(tri.GetOutputPort())
    normals.SplittingOff()
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(normals.GetOutput())
    return out


def _export_obj(seg_node, segment_id: str, target: Path, lps: bool) -> None:
    import vtk

    seg = seg_node.GetSegmentation().GetSegment(segment_id)
    poly = world_surface(seg_node, segment_id, lps=lps)
    mtl_path = target.with_suffix(".mtl")
    material = safe_file_stem(seg.GetName())
    r, g, b = seg.GetColor()
    with atomic_file(mtl_path) as tmp:
        tmp.write_text(f"# DeepSegRecon material for segment {seg.GetName()}\nnewmtl {material}\n"
                       f"Ka 0 0 0\nKd {r:.6g} {g:.6g} {b:.6g}\nKs 0 0 0\nd 1\nillum 1\n")
    with atomic_file(target) as tmp:
        body = tmp.with_name(tmp.name + ".body.obj")
        try:
            writer = vtk.vtkOBJWriter()  # vertices, normals and faces; the material lines are added here
            writer.SetInputData(poly)
            writer.SetFileName(str(body))
            if not writer.Write():
                raise InputError(f"could not write {target.name}")
            with open(tmp, "wb") as out, open(body, "rb") as src:
                out.write(f"# DeepSegRecon OBJ, segment {seg.GetName()}. SPACE={'LPS' if lps else 'RAS'}\n"
                          f"mtllib {mtl_path.name}\no {material}\nusemtl {material}\n".encode())
                shutil.copyfileobj(src, out, 1 << 20)
        finally:
            if body.exists():
                body.unlink()
