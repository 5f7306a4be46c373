"""Running DIF-Gaussian on a projection stack, and the reconstruction metrics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import ConeGeometry
from .net import DIFGaussian
from .projector import MU_WATER, fdk, forward_project, hu_to_mu, mu_to_hu

HU_RANGE = (-1000.0, 1000.0)  # metrics window (PSNR data range 2000 HU)
REFINE_ITERS = 4  # data-consistency steps after the network, and their relaxation (chosen on training-region
REFINE_RELAX = 0.3  # crops: 0.45 diverges within a few steps, 0.3 peaks after about 6)


def value_to_hu(v):
    return v * 2000.0 - 1000.0


def hu_to_value(hu):
    return (hu + 1000.0) / 2000.0


def proj_scale(geo: ConeGeometry) -> float:
    """Projections are divided by this before the encoder: 2 x water attenuation x the largest volume extent."""
    return 2.0 * MU_WATER * float(np.max(np.asarray(geo.volume_size) * np.asarray(geo.volume_spacing)))


def projector_for(geo: ConeGeometry, device="cpu") -> Callable:
    """``f(points (N, 3) normalised volume coords) -> (V, N, 2)`` normalised detector (column, row)."""
    he = torch.tensor(geo.half_extent, dtype=torch.float32, device=device)
    ang = torch.tensor(geo.angles, dtype=torch.float32, device=device)[:, None]
    ca, sa = torch.cos(ang), torch.sin(ang)
    nv, nu = geo.detector_shape
    cu, cv = max((nu - 1) / 2.0, 1e-6), max((nv - 1) / 2.0, 1e-6)
    (ou, ov), (su, sv) = geo.detector_offset, geo.detector_spacing

    def project(pts: torch.Tensor) -> torch.Tensor:
        p = pts * he
        x, y, z = p[:, 0][None], p[:, 1][None], p[:, 2][None]
        depth = geo.dso - (x * ca + y * sa)
        u = geo.dsd * (-x * sa + y * ca) / depth
        v = geo.dsd * z / depth
        return torch.stack([(u - ou) / su / cu, (v - ov) / sv / cv], -1)

    return project


def query_geometry(geo: ConeGeometry, query_res: int | None) -> ConeGeometry:
    """``geo`` with a grid of at most ``query_res`` points per axis spanning the same box (first and last voxel
    centres kept); ``geo`` itself when ``query_res`` is None or the grid is no larger."""
    if not query_res or max(geo.volume_size) <= int(query_res):
        return geo
    size = tuple(min(int(n), int(query_res)) for n in geo.volume_size)
    spacing = tuple(s * (n - 1) / max(q - 1, 1) for s, n, q in zip(geo.volume_spacing, geo.volume_size, size))
    return dataclasses.replace(geo, volume_size=size, volume_spacing=spacing)


@torch.no_grad()
def network_grid(model: DIFGaussian, proj: torch.Tensor, geo: ConeGeometry, query_res: int | None = 64,
                 slab_points: int = 160_000, progress: Callable[[float], None] | None = None) -> tuple:
    """(network intensity ((HU + 1000) / 2000), (k, j, i) on the model's device; its grid): the network queried at
    every voxel centre of ``query_geometry(geo, query_res)``."""
    model.eval()
    device = next(model.parameters()).device
    geo_q = query_geometry(geo, query_res)
    project = projector_for(geo_q, device)
    enc = model.encode(proj.to(device) / proj_scale(geo), project)
    I, J, K = geo_q.volume_size
    axes = [torch.linspace(-1, 1, n, device=device) for n in (I, J, K)]
    out = torch.empty(K, J, I, device=device)
    step = max(1, slab_points // (I * J))
    for z0 in range(0, K, step):
        zz = axes[2][z0:z0 + step]
        g = torch.stack(torch.meshgrid(zz, axes[1], axes[0], indexing="ij"), -1).reshape(-1, 3).flip(-1)
        cand = model.candidates_for(g.amin(0), g.amax(0))
        out[z0:z0 + len(zz)] = model.query(enc, g, project(g), cand).reshape(len(zz), J, I)
        if progress:
            progress(min(1.0, (z0 + len(zz)) / K))
    return out, geo_q


@torch.no_grad()
def refine(values: torch.Tensor, proj: torch.Tensor, geo: ConeGeometry, iters: int = REFINE_ITERS,
           relax: float = REFINE_RELAX, progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Data consistency: ``iters`` steps ``x += relax * FDK(p - A x)`` (Shepp-Logan ramp) on ``geo``'s grid, in
    attenuation, ``x >= 0``. The network fills what the few views leave open; these steps pull the volume back to
    what the projections measured. Stops early, keeping the previous volume, when the projection residual grows.
    Intensities ((HU + 1000) / 2000) in and out."""
    proj = proj.to(values.device).float()
    mu = hu_to_mu(value_to_hu(values))
    best = None
    for it in range(int(iters)):
        r = proj - forward_project(mu, geo, step_voxels=1.0)
        norm = float(r.norm())
        if best is not None and norm > best[0]:
            mu = best[1]
            break
        best = (norm, mu)
        mu = (mu + relax * fdk(r, geo, "shepp-logan")).clamp(min=0.0)
        if progress:
            progress((it + 1) / iters)
    return hu_to_value(mu_to_hu(mu))


def to_grid(values: torch.Tensor, geo: ConeGeometry) -> torch.Tensor:
    """A (k, j, i) volume spanning ``geo``'s box, trilinearly resampled to its grid (first and last centres kept)."""
    full = tuple(reversed(geo.volume_size))
    if tuple(values.shape) == full:
        return values
    return F.interpolate(values[None, None], size=full, mode="trilinear", align_corners=True)[0, 0]


def grid_hu(values: torch.Tensor, geo: ConeGeometry) -> np.ndarray:
    """Intensities on a grid spanning ``geo``'s box -> HU on ``geo``'s grid, (k, j, i) float32 numpy."""
    return value_to_hu(to_grid(values, geo)).cpu().numpy().astype(np.float32)


def reconstruct(model: DIFGaussian, proj: torch.Tensor, geo: ConeGeometry, query_res: int | None = 64,
                refine_iters: int = 0, progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Intensity ((HU + 1000) / 2000) on ``geo``'s grid, (k, j, i), on the CPU.

    The network is queried on a grid of at most ``query_res`` points per axis spanning the volume (``None``: every
    voxel centre; the shipped weights learnt 64^3 crops), ``refine_iters`` data-consistency steps run on that grid
    (:func:`refine`), and the result is resampled trilinearly to the volume grid."""
    share = 0.6 if refine_iters else 1.0
    out, geo_q = network_grid(model, proj, geo, query_res,
                              progress=(lambda f: progress(share * f)) if progress else None)
    if refine_iters:
        out = refine(out, proj, geo_q, refine_iters,
                     progress=(lambda f: progress(share + (1 - share) * f)) if progress else None)
    return to_grid(out, geo).cpu()


def metrics(volume_hu: np.ndarray, reference_hu: np.ndarray, slab: int = 16) -> dict:
    """PSNR (dB) and SSIM of HU volumes in the window [-1000, 1000] HU (data range 2000). SSIM runs over slabs of
    ``slab`` slices (plus the window's half-width either side), the same value as over the whole volume in a
    fraction of its memory."""
    from skimage.metrics import structural_similarity

    lo, hi = HU_RANGE
    a = np.clip(np.asarray(volume_hu, np.float32), lo, hi)
    b = np.clip(np.asarray(reference_hu, np.float32), lo, hi)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("PSNR/SSIM of a volume with NaN or infinite voxels")  # never report a made-up score
    mse = float(sum(np.mean((a[k:k + slab].astype(np.float64) - b[k:k + slab]) ** 2) * len(a[k:k + slab])
                    for k in range(0, len(a), slab)) / len(a))
    psnr = 10 * math.log10((hi - lo) ** 2 / mse) if mse > 0 else math.inf
    win = min(7, *[s - (1 - s % 2) for s in b.shape])
    pad = (win - 1) // 2
    K = b.shape[0]
    total, count = 0.0, 0
    for k0 in range(pad, K - pad, slab):
        k1 = min(k0 + slab, K - pad)
        lo_k, hi_k = k0 - pad, k1 + pad
        _, smap = structural_similarity(b[lo_k:hi_k].astype(np.float64), a[lo_k:hi_k].astype(np.float64),
                                        data_range=hi - lo, win_size=win, full=True)
        inner = smap[pad:pad + (k1 - k0), pad:smap.shape[1] - pad, pad:smap.shape[2] - pad]
        total += float(inner.sum(dtype=np.float64))
        count += inner.size
    ssim = total / max(count, 1)
    return {"psnr_db": round(float(psnr), 3) if math.isfinite(psnr) else 99.0, "ssim": round(float(ssim), 4),
            "window_hu": list(HU_RANGE)}
