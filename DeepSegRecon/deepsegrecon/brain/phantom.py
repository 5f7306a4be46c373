"""Brain tumour phantoms on real anatomy: the MNI152 2009 template (``nilearn``, shipped with the package).

Grey matter, white matter and CSF fractions come from the template's tissue maps (2 mm). A tumour is grown
at a random position inside the brain: a deformed ellipsoid whole tumour (oedema spreading more into white
matter), a tumour core inside it, and, in most cases, a necrotic core inside that, so the enhancing tumour is a
rim. Each of T1, T1c, T2 and FLAIR gets its own tissue contrast (CSF dark on T1/FLAIR and bright on T2, rim
bright on T1c, oedema bright on T2/FLAIR), per-case contrast jitter, tumour texture, a smooth bias field,
blur, noise and an arbitrary intensity scale (as raw MRI). Ground truth uses the BraTS 2023 labels
(1 necrosis, 2 oedema, 3 enhancing). The same seed gives the same phantom.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..image import Image
from . import labels as L

MODALITIES = ("t1", "t1c", "t2", "flair")
TRAIN_SEEDS = (0, 100_000)  # phantom seeds for training
HELDOUT_SEEDS = tuple(range(100_001, 100_007))  # never trained on: evaluation and tests
# tissue intensity (relative) per modality: CSF, GM, WM, necrosis, oedema, enhancing
CONTRAST = {"t1": (0.30, 0.60, 0.85, 0.35, 0.52, 0.62),
            "t1c": (0.30, 0.62, 0.85, 0.38, 0.58, 1.40),
            "t2": (1.35, 0.72, 0.48, 1.15, 1.00, 0.78),
            "flair": (0.18, 0.66, 0.52, 0.55, 1.15, 0.88)}


@lru_cache(maxsize=2)
def anatomy(resolution: int = 2):
    """(gm, wm, csf, brain mask) arrays (k, j, i) cropped to the brain, and the Image geometry (LPS)."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = load_mni152_template(resolution=resolution)
    gm = np.asarray(load_mni152_gm_template(resolution=resolution).dataobj, np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=resolution).dataobj, np.float32)
    brain = np.asarray(t1.dataobj) > 0.05
    gm, wm = np.clip(gm, 0, 1) * brain, np.clip(wm, 0, 1) * brain
    csf = np.clip(1.0 - gm - wm, 0, 1) * brain
    idx = np.argwhere(brain)
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, brain.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    # nibabel arrays are (x, y, z) = (i, j, k) in RAS; Image arrays are (k, j, i), LPS
    arrs = [np.ascontiguousarray(a[sl].transpose(2, 1, 0)) for a in (gm, wm, csf, brain)]
    aff = np.array(t1.affine, float)
    aff[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    ref = Image.from_ijk_to_ras(arrs[0], aff)
    return arrs[0], arrs[1], arrs[2], arrs[3].astype(bool), ref


@lru_cache(maxsize=2)
def _depth(resolution: int) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    brain, ref = anatomy(resolution)[3:]
    return distance_transform_edt(brain, sampling=ref.spacing[::-1])


def smooth_noise(shape, rng, cell: int = 8) -> np.ndarray:
    """Smooth random field (unit variance-ish) of ``shape``: coarse noise upsampled by cubic interpolation."""
    from scipy.ndimage import zoom

    coarse = rng.standard_normal([max(2, s // cell + 2) for s in shape]).astype(np.float32)
    f = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=3, mode="nearest")
    return f[: shape[0], : shape[1], : shape[2]]


def _ellipsoid_distance(shape, spacing_kji, centre, radius_mm, rng) -> np.ndarray:
    """Normalised distance (1 at the surface) of a randomly rotated and stretched ellipsoid."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
    axes = radius_mm * rng.uniform(0.75, 1.25, 3)
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing_kji)], indexing="ij")
    pts = np.stack(grids, -1) @ rot
    return np.sqrt(((pts / axes) ** 2).sum(-1)).astype(np.float32)


def make_phantom(seed: int, resolution: int = 2, modalities=MODALITIES) -> dict:
    """``{"images": {modality: Image}, "labels": Image (BraTS 2023 values), "info": {...}}``."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    rng = np.random.default_rng(int(seed))
    gm, wm, csf, brain, ref = anatomy(resolution)
    shape, sp = brain.shape, np.array(ref.spacing[::-1])
    depth = _depth(resolution)
    r_wt = rng.uniform(12.0, 30.0)
    cand = np.argwhere((depth > 0.45 * r_wt + 6) & (wm > 0.3))
    centre = cand[rng.integers(len(cand))]
    # the tumour lives in a box around its centre (fast)
    half = np.ceil(1.25 * 1.6 * r_wt / sp).astype(int)
    lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape, c_box = tuple(hi - lo), (centre - lo).astype(float)
    d_wt = _ellipsoid_distance(bshape, sp, c_box, r_wt, rng)
    d_wt += 0.18 * smooth_noise(bshape, rng, 6) - 0.25 * (wm[box] - 0.5)
    wt = (d_wt < 1.0) & brain[box]
    r_tc = r_wt * rng.uniform(0.5, 0.8)
    d_tc = _ellipsoid_distance(bshape, sp, c_box + rng.normal(0, 1.0, 3), r_tc, rng)
    tc = (d_tc + 0.12 * smooth_noise(bshape, rng, 5) < 1.0) & wt
    necrosis = rng.random() < 0.85
    ncr = np.zeros(bshape, bool)
    if necrosis and tc.any():
        inside = distance_transform_edt(tc, sampling=sp)
        rim_mm = min(rng.uniform(4.0, 8.0), 0.6 * float(inside.max()))
        ncr = (inside > rim_mm * (1 + 0.2 * smooth_noise(bshape, rng, 5))) & tc
    lab = np.zeros(shape, np.uint8)
    sub = lab[box]
    sub[wt] = L.ED
    sub[tc] = L.ET
    sub[ncr] = L.NCR
    if not (lab == L.ET).any():  # a core too small for a rim: all enhancing
        sub[tc] = L.ET

    tumour = [(lab == v).astype(np.float32) for v in (L.NCR, L.ED, L.ET)]
    healthy = 1.0 - sum(tumour)
    images = {}
    for m in modalities:
        c = np.array(CONTRAST[m]) * rng.uniform(0.9, 1.1, 6)
        img = healthy * (c[0] * csf + c[1] * gm + c[2] * wm)
        texture = np.ones(shape, np.float32)
        texture[box] += 0.08 * smooth_noise(bshape, rng, 3)
        for t, ci in zip(tumour, c[3:]):
            img += t * ci * texture
        img = gaussian_filter(img, rng.uniform(0.4, 0.8))
        img *= 1.0 + 0.08 * smooth_noise(shape, rng, 24)
        img += rng.uniform(0.01, 0.04) * rng.standard_normal(shape).astype(np.float32)
        img = np.clip(img, 0, None) * brain * rng.uniform(300.0, 3000.0)
        images[m] = ref.with_array(img.astype(np.float32), modality=m)
    vox_ml = float(np.prod(sp)) / 1000.0
    info = {"seed": int(seed), "centre_kji": [int(v) for v in centre], "wt_radius_mm": round(float(r_wt), 1),
            "necrosis": bool(necrosis), "volumes_ml": {k: round(float(v) * vox_ml, 2) for k, v in
                                                         zip(("ET", "TC", "WT"), L.to_regions(lab).sum((1, 2, 3)))}}
    return {"images": images, "labels": ref.with_array(lab), "info": info}


def write_phantom(seed: int, out, resolution: int = 2, convention: str = "brats2023") -> dict:
    """``out/{t1,t1c,t2,flair}.nrrd`` + ``out/labels.seg.nrrd`` (BraTS labels of ``convention``)."""
    from ..files import staged_outputs
    from ..io import write_image
    from ..results import SegmentationResult
    from ..segio import write_seg_nrrd

    p = make_phantom(seed, resolution)
    lab = L.convert(p["labels"].array, "brats2023", convention)
    out = Path(out)
    with staged_outputs(out) as stage:
        for m, img in p["images"].items():
            write_image(img, stage / f"{m}.nrrd")
        present = [v for v in (L.NCR, L.ED, L.ET) if (p["labels"].array == v).any()]
        write_seg_nrrd(SegmentationResult(p["labels"].with_array(lab), L.subregion_infos(present, convention)),
                       stage / "labels.seg.nrrd")
    return {**p["info"], "files": sorted(str(out / f) for f in [*(f"{m}.nrrd" for m in p["images"]),
                                                               "labels.seg.nrrd"])}
