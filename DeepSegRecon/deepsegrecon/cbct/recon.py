"""Running DIF-Gaussian on a projection stack, and the reconstruction metrics."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .geometry import ConeGeometry
from .net import DIFGaussian
from .projector import MU_WATER

HU_RANGE = (-1000.0, 1000.0)  # metrics window (PSNR data range 2000 HU)


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


@torch.no_grad()
def reconstruct(model: DIFGaussian, proj: torch.Tensor, geo: ConeGeometry, query_res: Optional[int] = 64,
                slab_points: int = 160_000, progress: Optional[Callable[[float], None]] = None) -> torch.Tensor:
    """Network intensity ((HU + 1000) / 2000) on ``geo``'s grid: (k, j, i).

    The network is queried on a grid of at most ``query_res`` points per axis spanning the volume (``None``: every
    voxel centre) and resampled trilinearly to the volume grid (the shipped weights learnt 64^3 crops)."""
    model.eval()
    device = next(model.parameters()).device
    project = projector_for(geo, device)
    enc = model.encode(proj.to(device) / proj_scale(geo), project)
    full = geo.volume_size
    I, J, K = full if not query_res else [min(int(n), int(query_res)) for n in full]
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
    if (I, J, K) != tuple(full):
        out = torch.nn.functional.interpolate(out[None, None], size=tuple(reversed(full)), mode="trilinear",
                                              align_corners=True)[0, 0]
    return out.cpu()


def metrics(volume_hu: np.ndarray, reference_hu: np.ndarray) -> dict:
    """PSNR (dB) and SSIM of HU volumes in the window [-1000, 1000] HU (data range 2000)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    lo, hi = HU_RANGE
    a = np.clip(np.asarray(volume_hu, np.float64), lo, hi)
    b = np.clip(np.asarray(reference_hu, np.float64), lo, hi)
    with np.errstate(divide="ignore"):  # identical volumes: infinite PSNR, reported as 99 dB
        psnr = peak_signal_noise_ratio(b, a, data_range=hi - lo)
    ssim = structural_similarity(b, a, data_range=hi - lo, win_size=min(7, *[s - (1 - s % 2) for s in b.shape]))
    return {"psnr_db": round(float(psnr), 3) if math.isfinite(psnr) else 99.0, "ssim": round(float(ssim), 4),
            "window_hu": list(HU_RANGE)}
