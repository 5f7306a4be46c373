"""The two teeth networks (MONAI U-Nets) and the input preparation they share with training.

Stage 1 looks at the whole volume at about 1 mm and labels background, maxilla, mandible and
teeth. Stage 2 looks at the teeth bounding box at about 0.5 mm and labels background and 16 tooth
classes (upper positions 1-8, lower positions 1-8; left and right share a class, the side is
decided in physical space). Besides the image, stage 2 gets three coordinate channels measured
from the teeth bounding box: |x - midline|, y - front of the arch, z - middle of the teeth (mm / 30).

Everything here works in the *canonical* frame: the array is permuted and flipped so that its axes
(0, 1, 2) point Superior, Posterior and Left (the nearest axis-aligned LPS orientation), which is a
lossless re-indexing of the input grid. No SimpleITK here (training runs without it).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from . import labels as L

DEFAULT_NETWORK = {
    "stage1": {"arch": "monai.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": L.N_STAGE1,
               "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1, "norm": "instance",
               "spacing_mm": 1.0, "roi": [64, 80, 80]},
    "stage2": {"arch": "monai.UNet", "spatial_dims": 3, "in_channels": 4, "out_channels": L.N_STAGE2,
               "channels": [16, 32, 64, 128, 192], "strides": [2, 2, 2, 2], "num_res_units": 1,
               "norm": "instance", "spacing_mm": 0.5, "roi": [48, 80, 80], "margin_mm": 4.0,
               "coord_scale_mm": 30.0},
    "intensity": {"clip": [-1000.0, 3500.0], "scale": 1000.0},
    "axes": "canonical (S, P, L)",
}


def default_network() -> dict:
    return copy.deepcopy(DEFAULT_NETWORK)


def build_net(cfg: dict) -> torch.nn.Module:
    """Rebuild one stage's network from its manifest config."""
    arch = cfg.get("arch", "monai.UNet")
    if arch == "monai.UNet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=int(cfg.get("spatial_dims", 3)), in_channels=int(cfg["in_channels"]),
                    out_channels=int(cfg["out_channels"]), channels=tuple(cfg["channels"]),
                    strides=tuple(cfg["strides"]), num_res_units=int(cfg.get("num_res_units", 1)),
                    norm=cfg.get("norm", "instance"), dropout=float(cfg.get("dropout", 0.0)))
    if arch == "monai.BasicUNet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=int(cfg.get("spatial_dims", 3)), in_channels=int(cfg["in_channels"]),
                         out_channels=int(cfg["out_channels"]), features=tuple(cfg["features"]))
    raise ValueError(f"unknown network architecture '{arch}'")


def build_nets(network: dict) -> tuple:
    return build_net(network["stage1"]), build_net(network["stage2"])


# ---------------------------------------------------------------------------------------------
# intensity and resampling


def normalise(hu, network: dict = None):
    """HU-like values -> network input (clipped, scaled)."""
    it = (network or DEFAULT_NETWORK)["intensity"]
    lo, hi = it["clip"]
    if isinstance(hu, torch.Tensor):
        return hu.float().clamp(lo, hi) / float(it["scale"])
    return np.clip(np.asarray(hu, np.float32), lo, hi) / np.float32(it["scale"])


def grid_size(extent_vox, spacing, target_mm) -> tuple:
    """Number of target voxels covering ``extent_vox`` voxels of ``spacing`` mm at about ``target_mm``."""
    return tuple(max(1, int(round(n * s / target_mm))) for n, s in zip(extent_vox, spacing))


def resample(t: torch.Tensor, size) -> torch.Tensor:
    """Resize a (C, D, H, W) or (N, C, D, H, W) tensor so that the field of view is kept (voxel edges align):
    box average along axes that shrink, linear along axes that grow."""
    squeeze = t.ndim == 4
    x = t[None] if squeeze else t
    x = x.float()
    size = tuple(int(s) for s in size)
    shrink = tuple(min(a, b) for a, b in zip(x.shape[2:], size))
    if shrink != tuple(x.shape[2:]):
        x = F.interpolate(x, size=shrink, mode="area")
    if shrink != size:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x[0] if squeeze else x


def _axis_weights(n_fine: int, lo: int, hi: int, n_coarse: int, f0: int, f1: int):
    """Linear interpolation from a coarse grid covering fine indices [lo, hi) with n_coarse voxels
    to fine indices f0..f1-1: returns (index0, index1, weight1) tensors."""
    f = torch.arange(f0, f1, dtype=torch.float64)
    c = (f - lo + 0.5) * (n_coarse / float(hi - lo)) - 0.5
    c = c.clamp(0, n_coarse - 1)
    i0 = torch.floor(c).long().clamp(0, n_coarse - 1)
    i1 = (i0 + 1).clamp(max=n_coarse - 1)
    w = (c - i0.double()).float()
    return i0, i1, w


def upsample_slab(coarse: torch.Tensor, box_lo, box_hi, out_lo, out_hi) -> torch.Tensor:
    """Linearly interpolate ``coarse`` (C, d, h, w), which covers the fine-grid box [box_lo, box_hi),
    at the fine voxels [out_lo, out_hi) (each a 3-tuple of fine indices). Returns (C, ...) float32."""
    x = coarse.float()
    for ax in range(3):
        i0, i1, w = _axis_weights(0, box_lo[ax], box_hi[ax], coarse.shape[ax + 1], out_lo[ax], out_hi[ax])
        a = torch.index_select(x, ax + 1, i0)
        b = torch.index_select(x, ax + 1, i1)
        shape = [1, 1, 1, 1]
        shape[ax + 1] = -1
        x = torch.lerp(a, b, w.view(shape))
    return x


def coarse_centres(box_lo, box_hi, n_coarse):
    """Fine-grid (continuous) index of each coarse voxel centre, per axis."""
    return [box_lo[a] + (np.arange(n_coarse[a]) + 0.5) * (box_hi[a] - box_lo[a]) / n_coarse[a] - 0.5
            for a in range(3)]


def coord_channels(box_lo, box_hi, n_coarse, spacing, ref, scale_mm=30.0) -> torch.Tensor:
    """Stage-2 coordinate channels on the coarse grid: |x - mid|, y - front, z - zmid (mm / scale).

    ``ref`` = (z_mid, y_front, x_mid) in fine canonical index units; ``spacing`` is the fine spacing."""
    cz, cy, cx = coarse_centres(box_lo, box_hi, n_coarse)
    z = torch.from_numpy(((cz - ref[0]) * spacing[0] / scale_mm).astype(np.float32))
    y = torch.from_numpy(((cy - ref[1]) * spacing[1] / scale_mm).astype(np.float32))
    x = torch.from_numpy((np.abs(cx - ref[2]) * spacing[2] / scale_mm).astype(np.float32))
    D, H, W = (int(n) for n in n_coarse)
    return torch.stack([x.view(1, 1, W).expand(D, H, W), y.view(1, H, 1).expand(D, H, W),
                        z.view(D, 1, 1).expand(D, H, W)], 0)


def teeth_reference(mask: np.ndarray):
    """(z_mid, y_front, x_mid) and the bounding box (lo, hi) of a teeth mask, in its own index units."""
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None, None, None
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx]) + 1
    ref = np.array([(lo[0] + hi[0] - 1) / 2.0, float(lo[1]), (lo[2] + hi[2] - 1) / 2.0])
    return ref, lo, hi


def state_dict_fp16(net: torch.nn.Module) -> dict:
    """Weights for shipping: floating tensors in float16 (loading casts them back)."""
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in net.state_dict().items()}


def load_weights(net: torch.nn.Module, state: dict) -> torch.nn.Module:
    own = net.state_dict()
    fixed = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v) for k, v in state.items()}
    net.load_state_dict(fixed, strict=True)
    return net
