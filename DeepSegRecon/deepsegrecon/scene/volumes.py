"""Volume nodes <-> engine :class:`Image`, with exact geometry.

MRML stores a volume as ``vtkImageData`` (points ordered i fastest, then j, then k; its own origin 0 and spacing 1)
plus an IJK-to-RAS matrix. An :class:`Image` holds a (k, j, i) array and LPS geometry; ``Image.ijk_to_ras``
and ``Image.from_ijk_to_ras`` convert. A C-ordered (k, j, i) numpy array has exactly VTK's point order, so
voxels are copied without reordering.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..image import Image
from ..segio import as_3d
from ._mrml import check_scene, np_matrix, slicer_module, vtk_matrix, world_matrix_of


def image_to_vtk_image_data(image: Image):
    """``vtkImageData`` with the voxels of ``image`` (origin 0, spacing 1, as MRML volume nodes keep them)."""
    import vtk
    from vtk.util import numpy_support

    img = as_3d(image)
    arr = img.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    data = vtk.vtkImageData()
    data.SetDimensions(*img.size)
    scalars = numpy_support.numpy_to_vtk(arr.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    data.GetPointData().SetScalars(scalars)
    return data


def array_from_vtk_image_data(data) -> np.ndarray:
    """(k, j, i) copy of the scalars of a single-component ``vtkImageData``."""
    from vtk.util import numpy_support

    scalars = data.GetPointData().GetScalars()
    if scalars is None:
        raise InputError("the volume has no voxel data")
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(f"the volume has {scalars.GetNumberOfComponents()} components per voxel; "
                         "a scalar volume is needed")
    i, j, k = data.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i).copy()


def image_to_volume_node(scene, image: Image, name: str = None, labelmap: bool = False, node=None):
    """Put ``image`` into a scalar (or labelmap) volume node: a new one added to ``scene``, or ``node`` updated.

    A new node is filled before it is added, so observers never see an empty volume. A 2-D image becomes a
    single-slice volume.
    """
    check_scene(scene)
    slicer = slicer_module()
    if not isinstance(image, Image):
        raise InputError("image_to_volume_node needs an Image")
    img = as_3d(image)
    data = image_to_vtk_image_data(img)
    ijk_to_ras = vtk_matrix(img.ijk_to_ras())
    if node is None:
        node = (slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode())
        node.SetName(name or "Volume")
        node.SetIJKToRASMatrix(ijk_to_ras)
        node.SetAndObserveImageData(data)
        scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
        return node
    was = node.StartModify()
    try:
        if name:
            node.SetName(name)
        node.SetIJKToRASMatrix(ijk_to_ras)
        node.SetAndObserveImageData(data)
    finally:
        node.EndModify(was)
    if node.GetScene() is None:
        scene.AddNode(node)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def volume_ijk_to_world(node) -> np.ndarray:
    """IJK-to-RAS of ``node`` in world coordinates: its own matrix, then its linear parent transforms."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return world_matrix_of(node, "volume") @ np_matrix(m)


def volume_node_to_image(node, squeeze_2d: bool = False) -> Image:
    """The voxels and world geometry of a volume node as an :class:`Image` (LPS geometry, (k, j, i) array).

    A linear parent transform is applied to the returned geometry (as if hardened; the node itself is not
    changed), so the image lies where Slicer displays it. A non-linear parent transform, or a linear one that
    shears the voxel grid, is refused with :class:`InputError`.
    ``squeeze_2d`` turns a single-slice volume into a 2-D image.
    """
    slicer = slicer_module()
    if node is None or not isinstance(node, slicer.vtkMRMLVolumeNode):
        raise InputError("a volume node is needed")
    data = node.GetImageData()
    if data is None:
        raise InputError(f"volume '{node.GetName()}' has no voxel data")
    arr = array_from_vtk_image_data(data)
    ijk_to_ras = volume_ijk_to_world(node)
    axes = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume '{node.GetName()}' has a zero-length voxel axis")
    d = axes / spacing
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-5):
        raise InputError(f"volume '{node.GetName()}' is under a transform that shears its voxel grid; "
                         "harden the transform and resample the volume first")
    img = Image.from_ijk_to_ras(arr, ijk_to_ras, name=node.GetName())
    if node.GetParentTransformNode() is not None:
        img.meta["parent_transform_applied"] = node.GetParentTransformNode().GetName()
    if squeeze_2d and arr.shape[0] == 1:
        img = Image(arr[0], img.spacing[:2], img.origin[:2], img.direction[:2, :2], img.meta)
    return img
