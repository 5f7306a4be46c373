"""Image with full geometry.

Conventions (the same as ITK/SimpleITK and DICOM):
- ``array`` is indexed (k, j, i): slice, row, column. A 2-D image is (j, i).
- ``spacing`` is (i, j, k) in millimetres.
- ``origin`` is the LPS position, in mm, of the centre of voxel (0, 0, 0).
- ``direction`` is a 3x3 matrix whose columns are the LPS unit vectors of the i, j and k axes.
Slicer/MRML works in RAS; ``ijk_to_ras`` gives the matrix MRML needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Image:
    array: np.ndarray
    spacing: tuple = None
    origin: tuple = None
    direction: np.ndarray = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        n = self.array.ndim
        if n not in (2, 3):
            raise ValueError(f"an image must be 2-D or 3-D, got an array of shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in (self.spacing if self.spacing is not None else (1.0,) * n))
        self.origin = tuple(float(o) for o in (self.origin if self.origin is not None else (0.0,) * n))
        d = np.eye(n) if self.direction is None else np.asarray(self.direction, dtype=float).reshape(n, n)
        self.direction = d
        if len(self.spacing) != n or len(self.origin) != n:
            raise ValueError("spacing and origin must have one value per array dimension")
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def size(self) -> tuple:
        """Size in (i, j, k) order, as ITK and VTK report it."""
        return tuple(reversed(self.array.shape))

    def with_array(self, array: np.ndarray, **meta) -> Image:
        """A new image on the same grid."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction.copy(), {**self.meta, **meta})

    def ijk_to_lps(self) -> np.ndarray:
        """Homogeneous matrix from (i, j, k, 1) voxel index to LPS mm (3-D images)."""
        if self.ndim != 3:
            raise ValueError("ijk_to_lps needs a 3-D image")
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray, **meta) -> Image:
        m = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        return cls(array, tuple(spacing), tuple(m[:3, 3]), m[:3, :3] / spacing, dict(meta))

    def physical_points(self, ijk: np.ndarray) -> np.ndarray:
        """LPS positions of (N, 3) voxel indices given in (i, j, k) order."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def same_grid(self, other: Image, tol: float = 1e-4) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_sitk(self):
        import SimpleITK as sitk

        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, img, **meta) -> Image:
        import SimpleITK as sitk

        n = img.GetDimension()
        return cls(
            sitk.GetArrayFromImage(img),
            img.GetSpacing(),
            img.GetOrigin(),
            np.array(img.GetDirection()).reshape(n, n),
            dict(meta),
        )

    def __repr__(self) -> str:
        return (
            f"Image(shape={self.array.shape}, dtype={self.array.dtype}, spacing={self.spacing}, "
            f"origin={self.origin}, direction={self.direction.round(4).tolist()})"
        )
