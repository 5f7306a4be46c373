"""DIF-Gaussian (Lin et al., MICCAI 2024), CPU-sized.

- a shared 2-D U-Net (MONAI BasicUNet blocks) encodes every projection: full-resolution features and a bottleneck;
- a ``gs_res``^3 grid of Gaussians: bottleneck features sampled where each grid point projects, max-pooled over the
  views, give (MLP) each Gaussian's feature and (MLP) its offset, scale and rotation (quaternion);
- a query point gets (a) its pixel-aligned features max-pooled over the views and (b) the Gaussian-weighted sum of
  the features of its ``k`` nearest Gaussians (``cdist`` + ``topk``);
- a residual point decoder (every layer also sees the input features) predicts the intensity.

Points are in normalised volume coordinates [-1, 1]^3 (x, y, z along i, j, k); their detector positions (normalised
[-1, 1] column, row) come from the geometry (:func:`project_normalised`), so any number of views works.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat

DEFAULT_NETWORK = {
    "arch": "dif-gaussian",
    "features": [8, 16, 32, 64],  # U-Net levels; the last is the bottleneck
    "out_ch": 16,  # pixel-aligned feature channels (= Gaussian feature channels)
    "det_res": 64,  # projections are resampled to det_res x det_res for the encoder
    "gs_res": 12,  # 12^3 Gaussians
    "k": 3,  # nearest Gaussians per query point
    "o_scaling": 1.0,  # offsets up to half a grid cell
    "s_scaling": 0.3,  # scales within (1 -/+ 0.3) x a grid cell
    "decoder": [32, 16, 1],  # residual point decoder widths after the 2 x out_ch input
    "proj_scale": "2 * MU_WATER * max volume extent (mm)",
    "target": "(HU + 1000) / 2000",
}

_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
_NORM = ("instance", {"affine": True})


def default_network() -> dict:
    return copy.deepcopy(DEFAULT_NETWORK)


class UNet2D(nn.Module):
    """BasicUNet-style 2-D U-Net returning (features at full resolution, bottleneck)."""

    def __init__(self, features, out_ch):
        super().__init__()
        f = list(features)
        self.conv0 = TwoConv(2, 1, f[0], _ACT, _NORM, True)
        self.downs = nn.ModuleList(Down(2, f[i], f[i + 1], _ACT, _NORM, True) for i in range(len(f) - 1))
        self.ups = nn.ModuleList(UpCat(2, f[i + 1], f[i], f[i], _ACT, _NORM, True, halves=True)
                                 for i in reversed(range(len(f) - 1)))
        self.head = nn.Conv2d(f[0], out_ch, 1)

    def forward(self, x):
        skips = [self.conv0(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips[-1]
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            y = up(y, skip)
        return self.head(y), skips[-1]


def mlp_1d(chs, last_bn: bool = False, last_act: bool = False) -> nn.Sequential:
    """Shared per-point MLP on (N, C) features (BatchNorm over the points)."""
    layers = []
    for i in range(len(chs) - 1):
        layers.append(nn.Linear(chs[i], chs[i + 1]))
        last = i == len(chs) - 2
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(chs[i + 1]))
        if not last or last_act:
            layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


class PointDecoder(nn.Module):
    """MLP over points (N, C); every layer after the first also gets the input features (residual concat)."""

    def __init__(self, chs):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(len(chs) - 1):
            cin = chs[i] + (chs[0] if i > 0 else 0)
            last = i == len(chs) - 2
            mods = [nn.Linear(cin, chs[i + 1])]
            if not last:
                mods += [nn.BatchNorm1d(chs[i + 1]), nn.LeakyReLU(0.1, inplace=True)]
            self.layers.append(nn.Sequential(*mods))

    def forward(self, x):
        y = x
        for i, layer in enumerate(self.layers):
            y = layer(y if i == 0 else torch.cat([y, x], -1))
        return y


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    r, x, y, z = q.unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
                        2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
                        2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y)], -1).reshape(*q.shape[:-1], 3, 3)


def view_features(feats: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear features (V, C, H, W) at detector positions uv (V, N, 2), max-pooled over views: (N, C)."""
    s = F.grid_sample(feats, uv[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return s[:, :, 0].amax(0).t()


class DIFGaussian(nn.Module):
    def __init__(self, cfg: dict = None):
        super().__init__()
        self.cfg = cfg = {**DEFAULT_NETWORK, **(cfg or {})}
        f, c = list(cfg["features"]), int(cfg["out_ch"])
        self.encoder = UNet2D(f, c)
        ds = f[-1]
        self.gs_feats_mlp = mlp_1d([ds, ds // 4, c], last_bn=True)
        self.gs_params_mlp = mlp_1d([ds, ds // 4, 3 + 3 + 4])
        self.decoder = PointDecoder([2 * c] + list(cfg["decoder"]))
        n = int(cfg["gs_res"])
        axis = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3).flip(-1)  # x fastest
        self.register_buffer("gs_base", grid, persistent=False)
        self.cell = 2.0 / n

    # ---------------------------------------------------------------------------------------- encoding
    def encode(self, projs: torch.Tensor, project) -> dict:
        """``projs`` (V, H, W) normalised projections; ``project(points (N, 3)) -> uv (V, N, 2)``."""
        r = int(self.cfg["det_res"])
        x = projs[:, None].float()
        if tuple(x.shape[-2:]) != (r, r):
            x = F.interpolate(x, size=(r, r), mode="area" if x.shape[-1] >= r else "bilinear")
        feats, bottleneck = self.encoder(x)
        g = view_features(bottleneck, project(self.gs_base))  # (G, ds)
        gs_feats = self.gs_feats_mlp(g)  # (G, C)
        params = self.gs_params_mlp(g)  # (G, 10)
        max_off = self.cell * 0.5 * float(self.cfg["o_scaling"])
        offsets = (torch.sigmoid(params[:, :3]) - 0.5) * 2 * max_off
        ss = float(self.cfg["s_scaling"])
        scales = torch.sigmoid(params[:, 3:6]) * 2 * ss * self.cell + (1 - ss) * self.cell
        rot = quaternion_to_matrix(params[:, 6:] + torch.tensor([1.0, 0, 0, 0], device=params.device))
        # covariance R S S R^T; its inverse is A^T A with A = S^-1 R^T (whitening)
        whiten = rot.transpose(1, 2) / scales[:, :, None]
        norm = self.cell ** 3 / ((2 * math.pi) ** 1.5 * scales.prod(-1))  # density x cell volume
        return {"feats": feats, "gs_feats": gs_feats, "gs_centres": self.gs_base + offsets, "gs_whiten": whiten,
                "gs_norm": norm}

    # ---------------------------------------------------------------------------------------- queries
    def gaussian_features(self, enc: dict, pts: torch.Tensor, candidates=None) -> torch.Tensor:
        """Sum over the ``k`` nearest Gaussians (by grid position) of density x feature: (N, C)."""
        base = self.gs_base if candidates is None else self.gs_base[candidates]
        k = min(int(self.cfg["k"]), base.shape[0])
        idx = torch.cdist(pts, base).topk(k, dim=1, largest=False).indices  # (N, k)
        if candidates is not None:
            idx = candidates[idx]
        d = pts[:, None, :] - enc["gs_centres"][idx]  # (N, k, 3)
        y = (enc["gs_whiten"][idx] * d[:, :, None, :]).sum(-1)  # (N, k, 3)
        w = enc["gs_norm"][idx] * torch.exp(-0.5 * (y * y).sum(-1))
        out = (w[..., None] * enc["gs_feats"][idx]).sum(1)  # (N, C)
        return F.leaky_relu(out, 0.1)

    def query(self, enc: dict, pts: torch.Tensor, uv: torch.Tensor, candidates=None) -> torch.Tensor:
        """Intensity at points (N, 3) projecting to uv (V, N, 2): (N,)."""
        pf = view_features(enc["feats"], uv)
        gf = self.gaussian_features(enc, pts, candidates)
        return self.decoder(torch.cat([pf, gf], -1))[:, 0]

    def candidates_for(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Indices of Gaussians whose grid position lies within 1.5 cells of the box [lo, hi] (normalised)."""
        m = 1.5 * self.cell
        inside = ((self.gs_base >= lo - m) & (self.gs_base <= hi + m)).all(-1)
        return inside.nonzero()[:, 0]
