"""Inputs -> network tensor and back: co-registration check, z-score over brain voxels, model grid.

* The inputs are put on the grid of the first one (SimpleITK, linear); an input whose physical extent does
  not overlap the first is refused.
* Each input is z-scored over its non-zero (brain) voxels; the background stays 0 (as in BraTS).
* The network runs on a grid with the first input's direction and origin corner and the model's isotropic
  spacing (2 mm for the CPU weights); its probabilities come back to the first input's grid by linear
  interpolation, so the labelmap has exactly the input grid.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..image import Image


def corners_lps(img: Image) -> np.ndarray:
    n = np.array(img.size) - 1
    c = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
    return img.physical_points(c)


def overlap_fraction(a: Image, b: Image) -> float:
    """Share of ``a``'s axis-aligned LPS bounding box covered by ``b``'s (0: no overlap)."""
    ca, cb = corners_lps(a), corners_lps(b)
    lo, hi = np.maximum(ca.min(0), cb.min(0)), np.minimum(ca.max(0), cb.max(0))
    inter = np.prod(np.clip(hi - lo, 0, None))
    return float(inter / max(np.prod(ca.max(0) - ca.min(0)), 1e-9))


def resample_to(img: Image, ref: Image, order: int = 1, dtype=np.float32) -> Image:
    """``img`` on ``ref``'s grid (0 outside)."""
    import SimpleITK as sitk

    if img.same_grid(ref):
        return img
    interp = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    src = img.with_array(np.asarray(img.array, np.float32)).to_sitk()
    out = sitk.Resample(src, ref.to_sitk(), sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
    return ref.with_array(sitk.GetArrayFromImage(out).astype(dtype))


def on_common_grid(images: dict) -> dict:
    """The inputs on the first one's grid; refuses inputs that do not overlap it."""
    names = list(images)
    ref = images[names[0]]
    out = {names[0]: ref}
    for n in names[1:]:
        img = images[n]
        if not img.same_grid(ref):
            if overlap_fraction(ref, img) <= 0.0:
                raise InputError(f"the input '{n}' does not overlap the input '{names[0]}' in space: the MRI volumes "
                                 "must be co-registered (same patient position)")
            img = resample_to(img, ref)
        out[n] = img
    return out


def zscore(array: np.ndarray, mask: np.ndarray = None) -> np.ndarray:
    """Z-score over the non-zero voxels (or ``mask``); the rest is 0 (:func:`normalize` without clipping)."""
    return normalize(array, mask, clip=None)


def normalize(array: np.ndarray, mask: np.ndarray = None, clip=(0.5, 99.5)) -> np.ndarray:
    """Robust z-score over the brain: intensities clipped to the ``clip`` percentiles of the brain voxels (the
    non-zero ones, or ``mask``; ``clip=None``: no clipping), then z-scored over them; the rest is 0.
    Affine-invariant, so raw scanner values and already z-scored inputs give the same result."""
    a = np.asarray(array, np.float32)
    m = (a != 0) if mask is None else np.asarray(mask, bool)
    if not m.any():
        return np.zeros_like(a)
    v = a[m]
    if clip is not None:
        v = np.clip(v, *np.percentile(v, clip))
    mean, std = float(v.mean()), float(v.std())
    out = np.zeros_like(a)
    out[m] = (v - mean) / (std if std > 1e-8 else 1.0)
    return out


def model_grid(ref: Image, spacing_mm: float) -> Image:
    """A grid covering ``ref`` with isotropic ``spacing_mm`` and ``ref``'s direction (same first corner)."""
    size_i = np.maximum(np.round(np.array(ref.size) * np.array(ref.spacing) / spacing_mm).astype(int), 1)
    sp = np.array(ref.size) * np.array(ref.spacing) / size_i  # covers exactly the same extent
    # voxel centres: first-corner alignment of the box edges
    corner = np.asarray(ref.origin) - ref.direction @ (np.array(ref.spacing) / 2)
    origin = corner + ref.direction @ (sp / 2)
    return Image(np.zeros(tuple(size_i[::-1]), np.float32), tuple(sp), tuple(origin), ref.direction.copy())


MAX_BRAIN_ML = 2600.0  # a skull-stripped adult brain is 1000-1900 mL; a whole head is twice that


def foreground(img: Image, name: str = "input") -> np.ndarray:
    """Brain voxels of a skull-stripped MRI: those that differ from the background value (the most common
    value on the volume's border: 0 as BraTS stores it, or a constant left by z-scoring the whole volume).
    Refuses an input whose foreground is far larger than a brain (not skull-stripped)."""
    a = np.asarray(img.array)
    border = np.concatenate([a[[0, -1]].ravel(), a[:, [0, -1]].ravel(), a[:, :, [0, -1]].ravel()])
    values, counts = np.unique(border, return_counts=True)
    bg = values[np.argmax(counts)]
    fg = a != bg
    if (~fg).mean() < 0.02:
        fg = np.ones(a.shape, bool)
    ml = float(fg.sum() * np.prod(img.spacing) / 1000.0)
    if ml > MAX_BRAIN_ML:
        raise InputError(f"{name} does not look skull-stripped: {ml:.0f} mL of it differs from the background "
                         f"(a brain is 1000-1900 mL). The model needs skull-stripped, co-registered MRI as BraTS "
                         "distributes it; strip the skull first (e.g. HD-BET or SynthStrip)")
    return fg


def _positive(a: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Brain intensities shifted to be positive (z-scored inputs), background 0, so that averaging onto the
    model grid dims the brain's rim as it does for raw scanner values."""
    a = np.where(fg, a, 0).astype(np.float32)
    if fg.any():
        lo = float(a[fg].min())
        if lo <= 0:
            hi = float(np.percentile(a[fg], 99.5))
            a[fg] = a[fg] - lo + 1e-3 * max(hi - lo, 1e-6)
    return a


def to_network_input(images: dict, modalities, spacing_mm: float, norm: str = "robust"):
    """(tensor (1, C, k, j, i) on the model grid, model grid Image, reference Image, brain mask on ref grid,
    names of the inputs used). Missing modalities are zero channels (the model is trained with dropout).

    ``norm="robust"``: each input's brain (:func:`foreground`) is averaged onto the model grid (linear
    resampling at 2 mm of a 1 mm grid is the 2x2x2 block mean the training data were made with), then
    normalised (:func:`normalize`) over its non-zero voxels there. ``"zscore"``: the phantom-v1 way (z-score on the
    input grid, then resampled)."""
    import torch

    common = on_common_grid(images)
    ref = next(iter(common.values()))
    fgs = {m: foreground(img, f"input {m}") for m, img in common.items()}
    brain = np.zeros(ref.array.shape, bool)
    for fg in fgs.values():
        brain |= fg
    grid = model_grid(ref, spacing_mm)
    same = grid.same_grid(ref)
    chans = []
    for m in modalities:
        if m not in common:
            chans.append(np.zeros(grid.array.shape, np.float32))
        elif norm == "zscore":
            z = ref.with_array(zscore(common[m].array))
            chans.append(z.array if same else resample_to(z, grid).array)
        else:
            a = ref.with_array(_positive(common[m].array, fgs[m]))
            chans.append(normalize(a.array if same else resample_to(a, grid).array))
    x = torch.from_numpy(np.ascontiguousarray(np.stack(chans)))[None]
    used = [m for m in modalities if m in common]
    return x, grid, ref, brain, used


def probabilities_to_ref(probs: np.ndarray, grid: Image, ref: Image) -> np.ndarray:
    """(3, ...) probabilities on the model grid -> (3, ...) on the reference grid (linear)."""
    if grid.same_grid(ref):
        return probs
    return np.stack([resample_to(grid.with_array(p.astype(np.float32)), ref).array for p in probs])
