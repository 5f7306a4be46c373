"""Shared test data for the segio and scene tests: a small oblique, anisotropic teeth-like labelmap."""

import numpy as np

from conftest import oblique_direction
from deepsegrecon.image import Image
from deepsegrecon.results import SegmentationResult, SegmentInfo

TOOTH_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
                     "~SCT^245543004^Tooth~^^~Anatomic codes - DICOM master list~^^~^^")
MANDIBLE_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                        "Structure~SCT^91609006^Mandible~^^~Anatomic codes - DICOM master list~^^~^^")

# (k, j, i) slices of each labelled block
BLOCKS = {
    11: (slice(2, 8), slice(3, 9), slice(4, 12)),
    2: (slice(5, 10), slice(9, 13), slice(2, 6)),
    36: (slice(8, 11), slice(2, 6), slice(11, 15)),
}


def oblique_grid(dtype=np.int16) -> Image:
    """(k, j, i) = (12, 14, 16) voxels, spacing (0.4, 0.7, 1.9), oblique, values encoding their index."""
    k, j, i = np.meshgrid(np.arange(12), np.arange(14), np.arange(16), indexing="ij")
    arr = (k * 3 + j * 5 + i * 7).astype(dtype)
    return Image(arr, spacing=(0.4, 0.7, 1.9), origin=(-12.5, 33.25, 101.0), direction=oblique_direction())


def teeth_result() -> SegmentationResult:
    grid = oblique_grid()
    lab = np.zeros(grid.array.shape, np.uint8)
    for value, sl in BLOCKS.items():
        lab[sl] = value
    segments = [
        SegmentInfo("tooth_11", 11, (0.95, 0.9, 0.7), TOOTH_TERMINOLOGY),
        SegmentInfo("mandible", 2, (0.4, 0.6, 0.9), MANDIBLE_TERMINOLOGY),
        SegmentInfo("tooth_36", 36, (0.2, 0.8, 0.3), ""),
    ]
    return SegmentationResult(grid.with_array(lab), segments)


def block_ijk_box(label: int):
    """(min, max) corners in (i, j, k) voxel index units of the physical region of a block (voxel edges)."""
    ks, js, is_ = BLOCKS[label]
    lo = np.array([is_.start, js.start, ks.start]) - 0.5
    hi = np.array([is_.stop - 1, js.stop - 1, ks.stop - 1]) + 0.5
    return lo, hi


def ras_to_ijk(image: Image, points_ras: np.ndarray) -> np.ndarray:
    m = np.linalg.inv(image.ijk_to_ras())
    pts = np.c_[np.asarray(points_ras, float), np.ones(len(points_ras))]
    return (pts @ m.T)[:, :3]


def polydata_points(poly) -> np.ndarray:
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(float)
