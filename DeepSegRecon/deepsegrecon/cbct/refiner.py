"""Learned post-processing of an iterative reconstruction (FBPConvNet-style, Jin et al. 2017): a small 2.5-D
residual U-Net (MONAI ``BasicUNet``, 2-D) sees ``slices`` adjacent axial slices (along the rotation axis k) of the
SART volume, scaled like the target ``(HU + 1000) / 2000``, and adds a correction to the centre slice.

Volumes are HU, (k, j, i) float32 numpy. The refiner runs on the iterative grid (at most ``methods.ITER_RES`` voxels
per axis), the grid it was trained on (2-4 mm voxels, 24-128 per axis).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS = "refiner.pt"
DEFAULT_CFG = {"arch": "unet2.5d", "slices": 5, "features": [16, 16, 32, 64, 128, 16], "input": "sart",
               "target": "(HU + 1000) / 2000"}


class Refiner(torch.nn.Module):
    def __init__(self, cfg: dict = None):
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.cfg = {**DEFAULT_CFG, **(cfg or {})}
        self.slices = int(self.cfg["slices"])
        self.unet = BasicUNet(spatial_dims=2, in_channels=self.slices, out_channels=1,
                              features=tuple(self.cfg["features"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, slices, H, W) scaled slices -> (B, 1, H, W) refined centre slice (H, W: any size, padded to 16)."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 16, (-w) % 16
        xp = F.pad(x, (0, pw, 0, ph))  # air (0) outside
        out = self.unet(xp)[..., :h, :w]
        c = self.slices // 2
        return x[:, c:c + 1] + out


def stack_slices(vol: torch.Tensor, ks, n: int) -> torch.Tensor:
    """(len(ks), n, J, I): for each k in ``ks`` the ``n`` slices around it (edge slices repeated)."""
    K = vol.shape[0]
    half = n // 2
    idx = torch.as_tensor(ks)[:, None] + torch.arange(-half, half + 1)[None]
    return vol[idx.clamp(0, K - 1)]


@torch.no_grad()
def apply(model: Refiner, hu: np.ndarray, batch: int = 16) -> np.ndarray:
    """The refined volume (HU, same shape) of an HU volume ``hu`` (k, j, i)."""
    model.eval()
    dev = next(model.parameters()).device
    v = torch.from_numpy(np.ascontiguousarray(hu, np.float32)).to(dev)
    v = (v + 1000.0) / 2000.0
    out = torch.empty_like(v)
    K = v.shape[0]
    for k0 in range(0, K, batch):
        ks = list(range(k0, min(K, k0 + batch)))
        out[k0:k0 + len(ks)] = model(stack_slices(v, ks, model.slices))[:, 0]
    return (out * 2000.0 - 1000.0).cpu().numpy().astype(np.float32)


def load(entry) -> Refiner:
    """The refiner of model version ``entry`` (sha256 checked, weights_only), float32 on the CPU."""
    from ..errors import ModelError
    from ..store import load_state_dict

    cfg = entry.manifest.get("refiner")
    if not isinstance(cfg, dict) or cfg.get("arch") != "unet2.5d":
        raise ModelError(f"model {entry.task} {entry.version} ({entry.dir}) has no refiner config")
    state = load_state_dict(entry, WEIGHTS, task="cbct-recon")
    model = Refiner(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{WEIGHTS} in model {entry.task} {entry.version} does not fit its refiner config") from e
    return model.eval()


def entry_for(store, version=None):
    """``version`` when it holds a refiner, else the newest version that does (user ones first); None if none."""
    if version:
        e = store.get("cbct-recon", version)
        if WEIGHTS in e.files:
            return e
    found = [e for e in store.list("cbct-recon") if WEIGHTS in e.files and "error" not in e.manifest]
    if not found:
        return None
    return max(found, key=lambda e: (not e.builtin, str(e.manifest.get("created") or ""), e.version))
