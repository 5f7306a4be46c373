"""The BraTS-2018 winning network (Myronenko, "3D MRI brain tumor segmentation using autoencoder
regularization", 2018), built from MONAI blocks.

* Encoder / segmentation decoder: MONAI's :class:`~monai.networks.nets.SegResNet` (ResBlocks with
  GroupNorm(8) + ReLU, [1, 2, 2, 4] blocks down, [1, 1, 1] up, strided-conv downsampling, 1x1x1 conv +
  trilinear upsampling + additive skips), with the paper's *spatial* dropout (``Dropout3d``, 0.2) after the
  initial convolution, and three sigmoid outputs (ET, TC, WT).
* VAE branch (its **own** decoder, unlike MONAI's ``SegResNetVAE``): from the encoder end, GN + ReLU +
  3x3x3 conv (16, stride 2) + dense -> 128 means and 128 log-variances, a sample, dense back to
  16 x (input/16)^3, ReLU, 1x1x1 conv and upsampling, then three (conv 1x1x1, upsample, ResBlock) stages
  and a 1x1x1 conv that reconstructs the input channels.
* Loss: soft Dice (squared denominators, sigmoid) + 0.1 * L2 reconstruction + 0.1 * KL.

``forward`` returns the segmentation logits only in eval mode; in training mode with ``with_vae`` it returns
``(seg_logits, reconstruction, mu, logvar)``. The VAE needs the training crop size (its dense layers), so
``vae_input_size`` is fixed in the network config; inference on any size skips it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

# Output channels, in the order of the paper.
REGIONS = ("ET", "TC", "WT")

PAPER = {"arch": "segresnet-vae-myronenko2018", "init_filters": 32, "blocks_down": [1, 2, 2, 4],
         "blocks_up": [1, 1, 1], "dropout": 0.2, "vae_nz": 128, "vae_input_size": [160, 192, 128]}


def default_network(init_filters: int = 8, crop=(32, 32, 32), modalities=("t1", "t1c", "t2", "flair"),
                    spacing_mm: float = 2.0) -> dict:
    """The CPU-sized configuration of the shipped weights (the paper's is ``init_filters=32`` and a
    160x192x128 crop at 1 mm)."""
    return {**PAPER, "init_filters": int(init_filters), "vae_input_size": [int(c) for c in crop],
            "in_channels": len(modalities), "out_channels": 3, "modalities": list(modalities),
            "spacing_mm": float(spacing_mm), "roi": [int(c) for c in crop]}


class SegResNetVAE2018(nn.Module):
    def __init__(self, in_channels: int = 4, out_channels: int = 3, init_filters: int = 32,
                 blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout: float = 0.2, vae_nz: int = 128,
                 vae_input_size=(160, 192, 128), with_vae: bool = True):
        super().__init__()
        from monai.networks.blocks.segresnet_block import ResBlock, get_conv_layer, get_upsample_layer
        from monai.networks.layers.factories import Norm
        from monai.networks.nets import SegResNet

        norm = ("GROUP", {"num_groups": 8})
        self.seg = SegResNet(spatial_dims=3, init_filters=init_filters, in_channels=in_channels,
                             out_channels=out_channels, dropout_prob=dropout, norm=norm,
                             blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up), upsample_mode="nontrainable")
        if dropout:
            self.seg.dropout = nn.Dropout3d(dropout)  # the paper's spatial dropout
        self.with_vae = bool(with_vae)
        self.in_channels = in_channels
        levels = len(blocks_down) - 1
        top = init_filters * 2 ** levels
        size = np.array(vae_input_size, int)
        if np.any(size % 2 ** (levels + 1)):
            raise ValueError(f"vae_input_size {list(size)} must be a multiple of {2 ** (levels + 1)}")
        self.vae_input_size = tuple(int(s) for s in size)
        self.small = tuple(int(s) for s in size // 2 ** (levels + 1))
        self.nz = int(vae_nz)
        if self.with_vae:
            n_small = 16 * int(np.prod(self.small))
            self.vd = nn.Sequential(Norm[Norm.GROUP, 3](8, top), nn.ReLU(inplace=True),
                                    get_conv_layer(3, top, 16, stride=2, bias=True))
            self.vd_dense = nn.Linear(n_small, 2 * self.nz)
            self.vu_dense = nn.Linear(self.nz, n_small)
            self.vu = nn.Sequential(nn.ReLU(inplace=True), get_conv_layer(3, 16, top, kernel_size=1),
                                    get_upsample_layer(3, top, upsample_mode="nontrainable"))
            stages = []
            for i in range(levels):
                c = top // 2 ** (i + 1)
                stages.append(nn.Sequential(get_conv_layer(3, c * 2, c, kernel_size=1),
                                            get_upsample_layer(3, c, upsample_mode="nontrainable"),
                                            ResBlock(3, c, norm=norm)))
            self.vae_up = nn.Sequential(*stages)
            self.vae_end = get_conv_layer(3, init_filters, in_channels, kernel_size=1, bias=True)

    def vae(self, top: torch.Tensor):
        """(reconstruction, mu, logvar) from the encoder's last feature map."""
        h = self.vd(top).flatten(1)
        stats = self.vd_dense(h)
        mu, logvar = stats[:, : self.nz], stats[:, self.nz:].clamp(-10, 10)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        h = self.vu_dense(z).view(-1, 16, *self.small)
        return self.vae_end(self.vae_up(self.vu(h))), mu, logvar

    def forward(self, x: torch.Tensor):
        top, down = self.seg.encode(x)
        down.reverse()
        seg = self.seg.decode(top, down)
        if not (self.training and self.with_vae):
            return seg
        if tuple(x.shape[2:]) != self.vae_input_size:
            raise ValueError(f"the VAE branch needs {self.vae_input_size} crops, got {tuple(x.shape[2:])}")
        recon, mu, logvar = self.vae(top)
        return seg, recon, mu, logvar


def build_net(network: dict, with_vae: bool = True) -> SegResNetVAE2018:
    return SegResNetVAE2018(in_channels=int(network["in_channels"]), out_channels=int(network.get("out_channels", 3)),
                            init_filters=int(network["init_filters"]), blocks_down=network["blocks_down"],
                            blocks_up=network["blocks_up"], dropout=float(network.get("dropout", 0.2)),
                            vae_nz=int(network.get("vae_nz", 128)), vae_input_size=network["vae_input_size"],
                            with_vae=with_vae)


def load_seg_weights(net: SegResNetVAE2018, state: dict) -> None:
    """Load weights; a state without the VAE branch (as shipped) fits a net with or without it."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(("vd", "vu", "vae"))] + \
          [k for k in unexpected if not k.startswith(("vd", "vu", "vae"))]
    if bad:
        raise RuntimeError(f"weights do not fit: {bad[:4]}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The paper's L_KL = 1/N sum(mu^2 + sigma^2 - log sigma^2 - 1), N = latent size, mean over the batch."""
    return (mu.pow(2) + logvar.exp() - logvar - 1).sum(1).mean() / mu.shape[1]


class BratsLoss(nn.Module):
    """Soft Dice (sigmoid, squared denominators) on the ET/TC/WT channels + 0.1 L2 + 0.1 KL.

    ``forward(output, regions, image)``: ``output`` a tensor (eval / no VAE: Dice only) or the training tuple;
    ``regions`` (B, 3, ...) binary ET/TC/WT targets; ``image`` the input the VAE reconstructs. Returns the
    total and a dict of the terms. ``weights`` (B, 3) may leave channels out (0) for a case without them."""

    def __init__(self, w_l2: float = 0.1, w_kl: float = 0.1):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=False)
        self.w_l2, self.w_kl = float(w_l2), float(w_kl)

    def forward(self, output, regions: torch.Tensor, image: torch.Tensor = None):
        if isinstance(output, (tuple, list)):
            seg, recon, mu, logvar = output
        else:
            seg, recon = output, None
        dice = self.dice(seg.float(), regions.float())
        terms = {"dice": dice}
        total = dice
        if recon is not None:
            l2 = torch.mean((recon.float() - image.float()) ** 2)
            kl = kl_divergence(mu.float(), logvar.float())
            terms.update(l2=l2, kl=kl)
            total = total + self.w_l2 * l2 + self.w_kl * kl
        return total, terms


def state_without_vae(net: nn.Module, half: bool = True) -> dict:
    """What is shipped: the segmentation path only (the VAE is a training regulariser), float16 to save space."""
    return {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
            for k, v in net.state_dict().items() if not k.startswith(("vd", "vu", "vae"))}
