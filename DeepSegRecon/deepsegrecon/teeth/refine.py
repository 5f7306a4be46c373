"""Tooth surfaces re-decided on the input grid from the image.

The tooth network sees the teeth at 0.5 mm: the surface it gives is blurred by a voxel or so, mostly
outwards into the periodontal ligament and the socket bone around the roots. Within ``band_mm`` of that
surface each voxel is decided again from its own intensity against the contrast found around it: ``hi``
is the median just inside the band (dentin) and ``lo`` the median just outside (soft tissue, bone). A tooth
voxel darker than ``lo + prune * (hi - lo)`` leaves the tooth (and takes the label of the nearest non-tooth
voxel); a non-tooth voxel brighter than ``lo + grow * (hi - lo)`` joins the nearest tooth. Holes closed in
the axial plane (pulp and root canals stay tooth).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from . import labels as L

BAND_MM = 1.0
PRUNE = 0.6
GROW = 0.7
DIST_GRID_MM = 0.4  # distances are measured on a grid this fine at most
AXIAL_PLANE = np.zeros((3, 3, 3), bool)  # hole filling in the axial plane only (pulp and root canals)
AXIAL_PLANE[1] = ndi.generate_binary_structure(2, 1)


def contrast_around(image: np.ndarray, mask: np.ndarray, d_in: np.ndarray, d_out: np.ndarray, band_mm: float):
    """(hi, lo): medians of ``image`` between ``band_mm`` and ``band_mm`` + 1 mm inside ``mask`` (``d_in``: depth
    in mm) and outside it (``d_out``: distance in mm); None with fewer than 50 voxels on a side or no contrast."""
    inner = mask & (d_in > band_mm) & (d_in <= band_mm + 1.0)
    outer = ~mask & (d_out > band_mm) & (d_out <= band_mm + 1.0)
    if inner.sum() < 50 or outer.sum() < 50:
        return None
    hi, lo = float(np.median(image[inner])), float(np.median(image[outer]))
    return (hi, lo) if hi > lo else None


def refine_surface(lab: np.ndarray, image: np.ndarray, spacing, box=None, band_mm: float = BAND_MM,
                   prune: float = PRUNE, grow: float = GROW) -> np.ndarray:
    """Refine the teeth of labelmap ``lab`` (canonical grid, axis 0 vertical) against ``image`` on the
    same grid, inside ``box`` ((lo, hi) index corners; default: around all teeth). In place; returns ``lab``."""
    sp = np.asarray(spacing, float)
    teeth_all = np.isin(lab, L.FDI)
    if not teeth_all.any():
        return lab
    if box is None:
        idx = np.nonzero(teeth_all.any((1, 2)))[0], np.nonzero(teeth_all.any((0, 2)))[0], \
            np.nonzero(teeth_all.any((0, 1)))[0]
        box = ([a.min() for a in idx], [a.max() + 1 for a in idx])
    pad = np.ceil((band_mm + 1.5) / sp).astype(int)
    lo = np.maximum(np.asarray(box[0]) - pad, 0)
    hi = np.minimum(np.asarray(box[1]) + pad, lab.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub, img = lab[sl], np.asarray(image[sl], np.float32)
    teeth = teeth_all[sl]
    del teeth_all
    # distances on a grid of about 0.4 mm at most (fine scans: every f-th voxel), enough for a 1 mm band
    f = max(1, int(round(DIST_GRID_MM / sp.min())))
    small = teeth[::f, ::f, ::f]
    d_in = _up(ndi.distance_transform_edt(small, sampling=sp * f), f, teeth.shape)
    d_out, ind = ndi.distance_transform_edt(~small, sampling=sp * f, return_indices=True)
    nearest_tooth = _up(sub[::f, ::f, ::f][tuple(ind)], f, teeth.shape)
    d_out = _up(d_out, f, teeth.shape)
    del ind
    contrast = contrast_around(img, teeth, d_in, d_out, band_mm)
    if contrast is None:  # no tooth contrast to refine against
        return lab
    t_hi, t_lo = contrast
    new = teeth & ~((d_in <= band_mm) & (img < t_lo + prune * (t_hi - t_lo)))
    new |= ~teeth & (d_out <= band_mm) & (img > t_lo + grow * (t_hi - t_lo))
    del d_in, d_out
    new |= ndi.binary_fill_holes(new, structure=AXIAL_PLANE) & teeth
    removed = teeth & ~new
    if removed.any():
        # removed voxels take the label of the nearest voxel that never was tooth (bone or soft tissue)
        never = (~teeth & ~new)[::f, ::f, ::f]
        _, ind = ndi.distance_transform_edt(~never, return_indices=True)
        other = _up(sub[::f, ::f, ::f][tuple(ind)], f, teeth.shape)
        del ind
        sub[removed] = other[removed]
    sub[new] = nearest_tooth[new]
    return lab


def _up(a: np.ndarray, f: int, shape) -> np.ndarray:
    """``a`` sampled at every ``f``-th voxel back to ``shape`` (nearest)."""
    if f == 1:
        return a
    for ax in range(3):
        a = np.repeat(a, f, axis=ax)
    return a[: shape[0], : shape[1], : shape[2]]
