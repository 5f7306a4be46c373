"""Small MRML/VTK helpers shared by the scene adapter (no Qt, no application globals)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def slicer_module():
    """The ``slicer`` module: Slicer's application module or the ``slicer-core`` wheel's namespace."""
    try:
        import slicer
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("deepsegrecon.scene needs the MRML libraries: run inside 3D Slicer or "
                          "install the 'slicer-core' wheel (pip install deepsegrecon[scene])") from e
    return slicer


def vtk_matrix(a: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    a = np.asarray(a, dtype=float)
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def np_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


_RULES_REGISTERED = False


def ensure_converter_rules() -> None:
    """Register the segmentation conversion rules once, unless the application already did (Slicer does)."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return
    slicer = slicer_module()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {r.GetName() for r in factory.GetConverterRules()}
    for cls_name in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule"):
        cls = getattr(slicer, cls_name, None)
        if cls is None:
            continue
        rule = cls()
        if rule.GetName() not in have:
            factory.RegisterConverterRule(rule)
    _RULES_REGISTERED = True


def world_matrix_of(node, what: str) -> np.ndarray:
    """4x4 from the node's coordinates to world (RAS); refuses a non-linear parent transform."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"{what} '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
            "harden the transform (Transforms module: Harden transform) or remove it, then try again")
    import vtk

    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return np_matrix(m)


def check_scene(scene) -> None:
    slicer = slicer_module()
    if scene is None or not isinstance(scene, slicer.vtkMRMLScene):
        raise InputError("a vtkMRMLScene is needed")


def ensure_sh_item(scene, node, parent_item=None) -> int:
    """The subject-hierarchy item of ``node``, created if the scene has no SH logic creating it (slicer-core)."""
    slicer = slicer_module()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(parent_item if parent_item else sh.GetSceneItemID(), node)
    elif parent_item and sh.GetItemParent(item) != parent_item:
        sh.SetItemParent(item, parent_item)
    return item
