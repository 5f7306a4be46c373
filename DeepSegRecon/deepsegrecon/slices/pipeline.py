"""The slice pipeline: CT volume -> axial slices at the network size -> TransUNet -> labels on the input grid.

Slices are taken in the canonical S/P/L re-indexing of the input (any direction matrix): axis 0 runs
inferior -> superior, each slice has rows posterior-wards and columns left-wards. Each slice is windowed
(HU ``window`` -> [0, 1]) and resized to the network's ``img_size`` x ``img_size`` grid of ``pixel_mm``
pixels (so organs have the same size in pixels whatever the scanner's field of view), centred on the body;
``context`` neighbours on each side become extra channels (2.5D; with no context the slice is repeated into
the network's channels). Probabilities go back to the input slices (bilinear) before the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..inference import label_argmax

WINDOW = (-125.0, 275.0)


@dataclass
class SliceGrid:
    """Where the network's ``size`` x ``size`` grid of ``pixel_mm`` pixels lies on the input slices: centred on
    ``centre`` (row, col index), input pixels ``spacing`` (row, col mm). Pixels outside the input are air."""

    hw: tuple
    spacing: tuple
    centre: tuple
    size: int
    pixel_mm: float

    def _factors(self) -> tuple:
        return tuple(max(1, int(self.pixel_mm / s + 1e-6)) for s in self.spacing)

    def to_net(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, size, size): box average by whole factors, then bilinear to ``pixel_mm``."""
        f = self._factors()
        if f != (1, 1):
            x = F.avg_pool2d(x, f, f)
        hp, wp = x.shape[-2:]
        u = torch.arange(self.size, dtype=torch.float64) + 0.5 - self.size / 2.0
        norm = []
        for a, n in ((0, hp), (1, wp)):
            r = self.centre[a] + u * self.pixel_mm / self.spacing[a]  # input index
            q = (r - (f[a] - 1) / 2.0) / f[a]  # pooled index
            norm.append((2 * q + 1) / n - 1)
        gy, gx = torch.meshgrid(norm[0], norm[1], indexing="ij")
        grid = torch.stack([gx, gy], -1).float()[None].expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def from_net(self, p: torch.Tensor) -> torch.Tensor:
        """(N, K, size, size) -> (N, K, H, W), bilinear; zero outside the network's field of view."""
        norm = []
        for a in (0, 1):
            r = torch.arange(self.hw[a], dtype=torch.float64)
            u = (r - self.centre[a]) * self.spacing[a] / self.pixel_mm + self.size / 2.0 - 0.5
            norm.append((2 * u + 1) / self.size - 1)
        gy, gx = torch.meshgrid(norm[0], norm[1], indexing="ij")
        grid = torch.stack([gx, gy], -1).float()[None].expand(p.shape[0], -1, -1, -1)
        return F.grid_sample(p.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def body_centre(vol, threshold: float = -500.0) -> tuple:
    """(row, col) index of the centre of the in-plane box around the body (voxels over ``threshold`` HU in
    any slice); the slice centre when there are none."""
    proj = np.zeros(vol.shape[1:], bool)
    for z in range(0, vol.shape[0], 32):
        proj |= (np.asarray(vol[z:z + 32]) > threshold).any(0)
    out = []
    for a in (0, 1):
        idx = np.flatnonzero(proj.any(1 - a))
        out.append((idx[0] + idx[-1]) / 2.0 if len(idx) else (vol.shape[1 + a] - 1) / 2.0)
    return tuple(float(v) for v in out)


def slice_grid(vol, spacing_rc, network: dict) -> SliceGrid:
    """The network grid for a canonical (D, H, W) volume with in-plane spacing (row mm, col mm)."""
    return SliceGrid(tuple(vol.shape[1:]), tuple(float(s) for s in spacing_rc), body_centre(vol),
                     int(network["img_size"]), float(network.get("pixel_mm", 3.0)))


def slices_to_net(vol, grid: SliceGrid, window=WINDOW, chunk: int = 16) -> torch.Tensor:
    """(D, H, W) HU array (canonical) -> (D, size, size) float32 in [0, 1] (window, then resample)."""
    lo, hi = float(window[0]), float(window[1])
    d = vol.shape[0]
    out = torch.empty((d, grid.size, grid.size), dtype=torch.float32)
    for z in range(0, d, chunk):
        x = torch.from_numpy(np.asarray(vol[z:z + chunk], dtype=np.float32))
        x = ((x.clamp(lo, hi) - lo) / (hi - lo))[:, None]
        out[z:z + chunk] = grid.to_net(x)[:, 0]
    return out


def labels_to_net(lab, n_classes: int, grid: SliceGrid, chunk: int = 8) -> torch.Tensor:
    """(D, H, W) class indices -> (D, size, size) int64: the class with the largest share of each pixel."""
    d = lab.shape[0]
    out = torch.empty((d, grid.size, grid.size), dtype=torch.int64)
    for z in range(0, d, chunk):
        y = torch.from_numpy(np.asarray(lab[z:z + chunk], dtype=np.int64))
        onehot = F.one_hot(y, n_classes).permute(0, 3, 1, 2).float()
        out[z:z + chunk] = grid.to_net(onehot).argmax(1)
    return out


def with_context(x: torch.Tensor, context: int, channels: int) -> torch.Tensor:
    """(D, s, s) -> (D, channels, s, s): slice k with its ``context`` neighbours each side (edges repeated),
    or, with no context, the slice repeated into every channel."""
    d = x.shape[0]
    if context <= 0:
        return x[:, None].expand(-1, channels, -1, -1)
    idx = torch.arange(d)[:, None] + torch.arange(-context, context + 1)[None]
    out = x[idx.clamp(0, d - 1)]
    if out.shape[1] != channels:
        raise ValueError(f"context {context} gives {out.shape[1]} channels; the network takes {channels}")
    return out


def predict(net, x: torch.Tensor, grid: SliceGrid, network: dict, device, batch: int = 16, step=None) -> np.ndarray:
    """Class indices (D, H, W) uint8 for prepared slices ``x`` (D, s, s), back on the input slices."""
    net.eval()
    d = x.shape[0]
    h, w = grid.hw
    ctx = int(network.get("context", 1))
    ch = int(network.get("in_channels", 3))
    out = np.zeros((d, h, w), np.uint8)
    with torch.inference_mode():
        for z in range(0, d, batch):
            idx = torch.arange(z, min(z + batch, d))
            xb = with_context(x[idx], 0, ch) if ctx <= 0 else _context_batch(x, idx, ctx)
            p = torch.softmax(net(xb.to(device)).float(), 1).cpu()
            for i in range(0, len(idx), 4):  # back to the input slices a few at a time (bounded memory)
                out[z + i:z + i + 4] = label_argmax(grid.from_net(p[i:i + 4]), 1).numpy()
            if step:
                step(min(z + batch, d) / d)
    return out


def _context_batch(x, idx, ctx):
    d = x.shape[0]
    nb = idx[:, None] + torch.arange(-ctx, ctx + 1)[None]
    return x[nb.clamp(0, d - 1)]


def largest_components(lab: np.ndarray, classes) -> np.ndarray:
    """Keep only the largest 3-D connected component of each class (others become background)."""
    from scipy import ndimage as ndi

    for c in classes:
        m = lab == c
        if not m.any():
            continue
        box = ndi.find_objects(m.astype(np.uint8))[0]
        sub = m[box]
        cc, n = ndi.label(sub)
        if n > 1:
            sizes = np.bincount(cc.ravel())
            sizes[0] = 0
            drop = sub & (cc != int(np.argmax(sizes)))
            region = lab[box]
            region[drop] = 0
    return lab
