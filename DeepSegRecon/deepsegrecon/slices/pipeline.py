"""The slice pipeline: CT volume -> axial slices at the network size -> TransUNet -> labels on the input grid.

Slices are taken in the canonical S/P/L re-indexing of the input (any direction matrix): axis 0 runs
inferior -> superior, each slice has rows posterior-wards and columns left-wards. Each slice is windowed
(HU ``window`` -> [0, 1]), padded to a square with 0 (air) and resized (box average) to ``img_size``;
``context`` neighbours on each side become extra channels (2.5D; with no context the slice is repeated
into the network's channels). Probabilities go back to each slice's size (bilinear) before the argmax.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WINDOW = (-125.0, 275.0)


def square_pad(h: int, w: int) -> tuple:
    """(top, bottom, left, right) padding that makes an h x w slice square, centred."""
    n = max(h, w)
    return (n - h) // 2, n - h - (n - h) // 2, (n - w) // 2, n - w - (n - w) // 2


def slices_to_net(vol, size: int, window=WINDOW, chunk: int = 16) -> torch.Tensor:
    """(D, H, W) HU array (canonical) -> (D, size, size) float32 in [0, 1]."""
    lo, hi = float(window[0]), float(window[1])
    d, h, w = vol.shape
    t, b, l, r = square_pad(h, w)
    out = torch.empty((d, size, size), dtype=torch.float32)
    for z in range(0, d, chunk):
        x = torch.from_numpy(np.asarray(vol[z:z + chunk], dtype=np.float32))
        x = ((x.clamp(lo, hi) - lo) / (hi - lo))[:, None]
        x = F.pad(x, [l, r, t, b], value=0.0)
        out[z:z + chunk] = _resize(x, size)[:, 0]
    return out


def labels_to_net(lab, n_classes: int, size: int, chunk: int = 8) -> torch.Tensor:
    """(D, H, W) class indices -> (D, size, size) int64: the class with the largest area in each pixel."""
    d, h, w = lab.shape
    t, b, l, r = square_pad(h, w)
    out = torch.empty((d, size, size), dtype=torch.int64)
    for z in range(0, d, chunk):
        y = torch.from_numpy(np.asarray(lab[z:z + chunk], dtype=np.int64))
        y = F.pad(y, [l, r, t, b], value=0)
        onehot = F.one_hot(y, n_classes).permute(0, 3, 1, 2).float()
        out[z:z + chunk] = _resize(onehot, size).argmax(1)
    return out


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    if x.shape[-1] < size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


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


def predict(net, x: torch.Tensor, out_hw: tuple, network: dict, device, batch: int = 16, step=None) -> np.ndarray:
    """Class indices (D, H, W) uint8 for prepared slices ``x`` (D, s, s), back on (H, W) slices."""
    net.eval()
    d = x.shape[0]
    h, w = out_hw
    t, b, l, r = square_pad(h, w)
    n = max(h, w)
    ctx = int(network.get("context", 1))
    ch = int(network.get("in_channels", 3))
    out = np.zeros((d, h, w), np.uint8)
    with torch.inference_mode():
        for z in range(0, d, batch):
            idx = torch.arange(z, min(z + batch, d))
            xb = with_context(x, ctx, ch)[idx] if ctx <= 0 else _context_batch(x, idx, ctx)
            logits = net(xb.to(device)).float()
            p = torch.softmax(logits, 1).cpu()
            if n != p.shape[-1]:
                p = F.interpolate(p, size=(n, n), mode="bilinear", align_corners=False)
            out[z:z + len(idx)] = p[:, :, t:t + h, l:l + w].argmax(1).to(torch.uint8).numpy()
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
