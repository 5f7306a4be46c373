"""Projection stacks on disk: a folder with ``geometry.json`` and either one 3-D stack (``projections.nrrd``,
``.mha``, ``.nii.gz``) or one 2-D image per view (sorted by name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import Image
from .geometry import ConeGeometry

GEOMETRY_FILE = "geometry.json"
STACK_NAMES = ("projections.nrrd", "projections.mha", "projections.nii.gz", "projections.nii")
VIEW_SUFFIXES = (".nrrd", ".mha", ".nii.gz", ".nii", ".tif", ".tiff", ".png")


def stack_image(proj: np.ndarray, geo: ConeGeometry) -> Image:
    """A projection stack (views, rows, columns) as an Image (spacing: detector u, v and 1 per view)."""
    return Image(np.asarray(proj, np.float32), (*geo.detector_spacing, 1.0))


def check_projections(arr: np.ndarray, geo: ConeGeometry, what: str = "projections") -> None:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise InputError(f"{what}: a stack (views, rows, columns) is needed, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise InputError(f"{what}: at least 2 projections are needed, got {arr.shape[0]}")
    if tuple(arr.shape[1:]) != tuple(geo.detector_shape):
        raise InputError(f"{what} are {arr.shape[1]} x {arr.shape[2]} pixels but the geometry's detector is "
                         f"{geo.detector_shape[0]} x {geo.detector_shape[1]} (rows x columns)")
    if arr.shape[0] != geo.n_views:
        raise InputError(f"{what}: {arr.shape[0]} projections but the geometry lists {geo.n_views} angles")
    if arr.dtype.kind not in "fiu" or not np.isfinite(arr).all():
        raise InputError(f"{what}: values must be finite numbers (line integrals)")


def read_projections(folder) -> tuple:
    """(stack Image, ConeGeometry) from a projection folder; every problem is an InputError."""
    from ..io import read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"projection folder {folder} does not exist or is not a folder")
    geo = ConeGeometry.load(folder / GEOMETRY_FILE)
    stack = next((folder / n for n in STACK_NAMES if (folder / n).is_file()), None)
    if stack is not None:
        img = read_image(stack)
        arr = img.array if img.ndim == 3 else img.array[None]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VIEW_SUFFIXES))
        if len(files) < 2:
            raise InputError(f"{folder}: at least 2 projections are needed, found {len(files)} image file"
                             f"{'' if len(files) == 1 else 's'} (and no projections.nrrd stack)")
        views = []
        for f in files:
            a = read_image(f).array
            if a.ndim != 2:
                raise InputError(f"{f.name}: a 2-D projection image is needed, got shape {a.shape}")
            if views and a.shape != views[0].shape:
                raise InputError(f"projections of unequal size: {files[0].name} is {views[0].shape[0]} x "
                                 f"{views[0].shape[1]} but {f.name} is {a.shape[0]} x {a.shape[1]}")
            views.append(a.astype(np.float32))
        arr = np.stack(views)
    check_projections(arr, geo, f"projections in {folder.name}")
    return stack_image(arr, geo), geo


def write_projections(folder, stack: Image, geo: ConeGeometry) -> Path:
    from ..io import write_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_image(stack, folder / STACK_NAMES[0])
    geo.save(folder / GEOMETRY_FILE)
    return folder
