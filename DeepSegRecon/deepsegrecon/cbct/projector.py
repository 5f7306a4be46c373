"""Cone-beam forward projection (ray marching, trilinear ``grid_sample``), noise, and FDK on torch.

Volumes are attenuation in 1/mm, arrays (k, j, i); projections are line integrals, arrays (view, row, column).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import ConeGeometry

MU_WATER = 0.02  # 1/mm, water at about 70 keV


def hu_to_mu(hu):
    """Hounsfield units -> attenuation (1/mm); air (-1000 HU) and below -> 0."""
    if isinstance(hu, torch.Tensor):
        return MU_WATER * (1.0 + hu.clamp(min=-1000.0) / 1000.0)
    return MU_WATER * (1.0 + np.maximum(hu, -1000.0) / 1000.0)


def mu_to_hu(mu):
    return (mu / MU_WATER - 1.0) * 1000.0


def _frame(a: float, device) -> tuple:
    e = torch.tensor([math.cos(a), math.sin(a), 0.0], device=device)
    uax = torch.tensor([-math.sin(a), math.cos(a), 0.0], device=device)
    return e, uax


def forward_project(vol: torch.Tensor, geo: ConeGeometry, step_voxels: float = 0.5,
                    views: list | None = None, chunk_samples: int = 8_000_000) -> torch.Tensor:
    """Line integrals of ``vol`` (k, j, i) through ``geo``: (views, rows, columns).

    Each ray is clipped to the volume box and sampled at ``n`` midpoints (``n`` fixed by the box diagonal and
    ``step_voxels`` x the smallest voxel size); trilinear interpolation, zero outside."""
    device = vol.device
    vol = vol.float()[None, None]
    he = torch.tensor(geo.half_extent, device=device, dtype=torch.float32).clamp(min=1e-6)
    box = torch.tensor(np.asarray(geo.volume_size) * np.asarray(geo.volume_spacing) / 2.0, device=device,
                       dtype=torch.float32)
    n_s = int(math.ceil(2 * float(box.norm()) / (step_voxels * min(geo.volume_spacing))))
    u, v = (torch.tensor(a, device=device, dtype=torch.float32) for a in geo.detector_uv())
    kax = torch.tensor([0.0, 0.0, 1.0], device=device)
    mids = (torch.arange(n_s, device=device, dtype=torch.float32) + 0.5) / n_s
    out = []
    rows = max(1, int(chunk_samples // (len(u) * n_s)))  # detector rows per block: bounded memory
    for n in (range(geo.n_views) if views is None else views):
        e, uax = _frame(float(geo.angles[n]), device)
        src = geo.dso * e
        view = []
        for r0 in range(0, len(v), rows):
            vv = v[r0:r0 + rows]
            det = (src - geo.dsd * e)[None, None] + u[None, :, None] * uax + vv[:, None, None] * kax  # (r, nu, 3)
            d = det - src
            d = d / d.norm(dim=-1, keepdim=True)
            with torch.no_grad():
                safe = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
                ta, tb = (-box - src) / safe, (box - src) / safe
                t0 = torch.minimum(ta, tb).amax(-1)
                t1 = torch.maximum(ta, tb).amin(-1).clamp(min=t0)  # no hit: zero length
            t = t0[..., None] + (t1 - t0)[..., None] * mids  # (r, nu, n_s)
            pts = src + t[..., None] * d[..., None, :]
            grid = (pts / he)[None]  # x, y, z = i, j, k
            vals = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
            view.append(vals.sum(-1) * (t1 - t0) / n_s)
        out.append(torch.cat(view))
    return torch.stack(out)


def add_noise(proj: torch.Tensor, photons: float = 1e5, electronic_sd: float = 10.0, seed: int = 0) -> torch.Tensor:
    """Poisson counts of ``photons`` x exp(-p) plus Gaussian electronic noise, back to line integrals."""
    g = torch.Generator(device=proj.device).manual_seed(int(seed))
    expected = photons * torch.exp(-proj.double())
    counts = torch.poisson(expected, generator=g)
    counts = counts + electronic_sd * torch.randn(counts.shape, generator=g, device=proj.device, dtype=counts.dtype)
    return (-torch.log(counts.clamp(min=1.0) / photons)).to(proj.dtype)


# ----------------------------------------------------------------------------------------------- FDK
def ramp_filter(n: int, tau: float, kind: str = "ram-lak", device="cpu") -> torch.Tensor:
    """Frequency response (length n//2+1, real) of the discrete ramp (Ram-Lak) kernel with sample spacing ``tau``,
    optionally Shepp-Logan or Hann windowed (as RTK's, cut at Nyquist); includes the ``tau`` of the convolution
    integral."""
    k = torch.fft.fftfreq(n, d=1.0 / n).to(device)  # integer offsets 0, 1, ..., -1
    h = torch.zeros(n, dtype=torch.float64, device=device)
    h[0] = 1.0 / (4 * tau ** 2)
    odd = (k.abs() % 2) == 1
    h[odd] = -1.0 / (k[odd].double() ** 2 * math.pi ** 2 * tau ** 2)
    resp = torch.fft.rfft(h).real * tau
    if kind == "shepp-logan":
        f = torch.fft.rfftfreq(n).to(device)  # cycles per sample, 0..0.5
        resp = resp * torch.sinc(f)
    elif kind == "hann":
        i = torch.arange(n // 2 + 1, device=device, dtype=torch.float64)
        resp = resp * 0.5 * (1.0 + torch.cos(math.pi * i / (n // 2 + 1)))
    elif kind != "ram-lak":
        raise ValueError(f"unknown filter '{kind}'; use ram-lak, shepp-logan or hann")
    return resp.float()


def _view_weights(geo: ConeGeometry, u: torch.Tensor) -> torch.Tensor:
    """Angular weights (views, columns): Delta-angle / 2 for a full circle, Parker weights for a short scan."""
    ang = np.asarray(geo.angles, float)
    n = len(ang)
    rel = np.mod(ang - ang[0], 2 * math.pi)
    rel[1:][rel[1:] == 0] = 2 * math.pi
    span = float(rel.max())
    step = span / max(1, n - 1)
    if span + step >= 2 * math.pi - 1e-6:  # full circle
        return torch.full((n, u.numel()), math.pi / n, device=u.device)
    # short scan: Parker (our fan angle has the opposite sign of Parker's convention)
    gamma = -torch.atan(u.double() / geo.dsd)
    delta = max((span - math.pi) / 2.0, 1e-3)
    w = torch.ones(n, u.numel(), dtype=torch.float64, device=u.device)
    for i, b in enumerate(rel):
        b = float(b)
        a1 = (2 * delta - 2 * gamma).clamp(min=1e-6)
        r1 = b < a1
        w[i] = torch.where(r1, torch.sin(math.pi / 4 * b / (delta - gamma).clamp(min=1e-6)) ** 2, w[i])
        r3 = b > math.pi - 2 * gamma
        w[i] = torch.where(r3, torch.sin(math.pi / 4 * (math.pi + 2 * delta - b) / (delta + gamma).clamp(min=1e-6))
                           ** 2, w[i])
        w[i] = w[i].clamp(0, 1)
    return (w * step).float()


def fdk(proj: torch.Tensor, geo: ConeGeometry, filter: str = "ram-lak", slab: int = 32) -> torch.Tensor:
    """Feldkamp-Davis-Kress: cosine weighting, ramp filter along rows, voxel-driven backprojection (bilinear on the
    detector) with the (dso / depth)^2 weight. Returns attenuation (k, j, i) on ``geo``'s volume grid."""
    device = proj.device
    proj = proj.float()
    nv, nu = geo.detector_shape
    u, v = (torch.tensor(a, device=device, dtype=torch.float32) for a in geo.detector_uv())
    cosw = geo.dsd / torch.sqrt(geo.dsd ** 2 + u[None] ** 2 + v[:, None] ** 2)
    tau = geo.detector_spacing[0] * geo.dso / geo.dsd  # column spacing at the isocentre
    n = 1 << int(math.ceil(math.log2(2 * nu)))
    resp = ramp_filter(n, tau, filter, device)
    q = torch.fft.irfft(torch.fft.rfft(proj * cosw, n=n, dim=-1) * resp, n=n, dim=-1)[..., :nu]
    q = q * _view_weights(geo, u)[:, None, :]
    I, J, K = geo.volume_size
    he = geo.half_extent
    sp = geo.volume_spacing
    x = torch.arange(I, device=device, dtype=torch.float32) * sp[0] - he[0]
    y = torch.arange(J, device=device, dtype=torch.float32) * sp[1] - he[1]
    z = torch.arange(K, device=device, dtype=torch.float32) * sp[2] - he[2]
    out = torch.zeros(K, J, I, device=device)
    cu = (nu - 1) / 2.0
    cv = (nv - 1) / 2.0
    for i, a in enumerate(geo.angles):
        ca, sa = math.cos(a), math.sin(a)
        depth = geo.dso - (x[None] * ca + y[:, None] * sa)  # (J, I)
        uu = geo.dsd * (-x[None] * sa + y[:, None] * ca) / depth
        col = (uu - geo.detector_offset[0]) / geo.detector_spacing[0]
        gx = (col / cu) if cu > 0 else col
        w = (geo.dso / depth) ** 2
        qi = q[i][None, None]
        for z0 in range(0, K, slab):
            zz = z[z0:z0 + slab]
            vv = geo.dsd * zz[:, None, None] / depth[None]
            row = (vv - geo.detector_offset[1]) / geo.detector_spacing[1]
            gy = row / cv
            grid = torch.stack([gx.expand_as(gy), gy], -1).reshape(1, -1, I, 2)
            s = F.grid_sample(qi, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out[z0:z0 + slab] += s.reshape(len(zz), J, I) * w
    return out
