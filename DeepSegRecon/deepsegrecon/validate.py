"""Input checks shared by every task: each failure names the problem."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .image import Image


def check_image(img: Image, name: str = "input", ndim: int = 3, min_size: int = 8) -> None:
    """Refuse images no method can use: wrong dimension, tiny, NaN/inf, constant."""
    if not isinstance(img, Image):
        raise InputError(f"{name} is not an image")
    if img.ndim != ndim:
        raise InputError(f"{name} is {img.ndim}-D (shape {img.array.shape}); a {ndim}-D image is needed")
    if min(img.array.shape) < min_size:
        raise InputError(f"{name} is too small ({img.array.shape}); each side needs at least {min_size} voxels")
    a = img.array
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            raise InputError(f"{name} has {int(bad.sum())} NaN or infinite voxels")
    if a.dtype.kind not in "fiub":
        raise InputError(f"{name} has voxel type {a.dtype}; a scalar numeric type is needed")
    lo, hi = a.min(), a.max()
    if lo == hi:
        raise InputError(f"{name} is constant (every voxel is {lo}): there is nothing to segment")
