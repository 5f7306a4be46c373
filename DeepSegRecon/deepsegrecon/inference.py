"""Sliding-window inference with bounded memory (MONAI's inferer).

Windows run on ``device``; the stitched output stays on the CPU, so GPU memory is bounded by
``sw_batch_size`` windows whatever the volume size. ``progress(fraction)`` is called between
batches of windows, and is where a task checks for cancellation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .device import amp_enabled


def sliding_window(
    net: torch.nn.Module,
    volume: torch.Tensor,
    roi_size: Sequence[int],
    device,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Run ``net`` over ``volume`` (N, C, D, H, W) window by window; returns logits on the CPU (float32)."""
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    roi = [min(r, s) for r, s in zip(roi_size, volume.shape[2:])]
    net = net.to(device).eval()
    amp = amp_enabled(device)

    # MONAI calls the predictor once per batch of windows; count calls to report progress.
    n_windows = _count_windows(volume.shape[2:], roi, overlap)
    n_calls = max(1, -(-n_windows // sw_batch_size))
    calls = [0]

    def predictor(x):
        if progress is not None:
            progress(calls[0] / n_calls)
        calls[0] += 1
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            return net(x).float()

    # no_grad, not inference_mode: callers may add to the result in place (e.g. test-time averaging)
    with torch.no_grad():
        out = sliding_window_inference(
            volume, roi, sw_batch_size, predictor, overlap=overlap, mode=mode,
            sw_device=device, device=torch.device("cpu"),
        )
    if progress is not None:
        progress(1.0)
    return out


def _count_windows(image_size, roi, overlap) -> int:
    """Number of windows MONAI's scan visits (same interval rule as monai.inferers.utils)."""
    n = 1
    for size, r in zip(image_size, roi):
        step = max(int(r * (1 - overlap)), 1)
        n *= 1 if size <= r else -(-(size - r) // step) + 1
    return n


def label_argmax(p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``p.argmax(dim)`` as uint8 labels (the first channel wins a tie), by elementwise comparisons: torch's
    argmax over a short channel axis of a large volume is about 20 times slower."""
    channels = p.unbind(dim)
    best = channels[0]
    lab = torch.zeros(best.shape, dtype=torch.uint8)
    for c, q in enumerate(channels[1:], 1):
        m = q > best
        best = torch.where(m, q, best)
        lab[m] = c
    return lab
