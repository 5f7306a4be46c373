"""TransUNet (Chen et al. 2021, R50-ViT-B/16) in plain torch + MONAI's transformer blocks.

Encoder: ResNetV2 (weight-standardised convolutions + GroupNorm) root + stages of bottleneck units
([3, 4, 9] for R50), a 1x1 patch embedding of the 1/16 feature map with learned position embeddings
(MONAI ``PatchEmbeddingBlock``), ``layers`` MONAI ``TransformerBlock``s and a final LayerNorm (no class
token). Decoder: 3x3 conv to ``head_channels``, then cascaded x2 upsampling blocks (``decoder`` channels)
that take the encoder features at 1/8, 1/4 and 1/2 (the first ``n_skip`` of them), and a 3x3 segmentation
head. ``FULL`` is the paper's configuration; ``SMALL`` the CPU one shipped with DeepSegRecon.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FULL = {"arch": "transunet", "in_channels": 3, "out_channels": 9, "img_size": 224, "width": 64,
        "blocks": [3, 4, 9], "groups": 32, "hidden": 768, "layers": 12, "heads": 12, "mlp": 3072,
        "head_channels": 512, "decoder": [256, 128, 64, 16], "n_skip": 3, "dropout": 0.1}
SMALL = {**FULL, "img_size": 128, "width": 16, "blocks": [2, 2, 2], "groups": 8, "hidden": 192, "layers": 4,
         "heads": 3, "mlp": 384, "head_channels": 128, "decoder": [64, 32, 16, 16], "dropout": 0.0}


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (BiT / ResNetV2)."""

    def forward(self, x):
        w = self.weight
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _gn(groups, ch):
    return nn.GroupNorm(min(groups, ch), ch, eps=1e-6)


class Bottleneck(nn.Module):
    """ResNetV2 bottleneck unit as in TransUNet: 1x1 -> 3x3 (stride) -> 1x1, GroupNorm, projection shortcut."""

    def __init__(self, cin, cout, cmid, stride=1, groups=32):
        super().__init__()
        self.conv1 = StdConv2d(cin, cmid, 1, bias=False)
        self.gn1 = _gn(groups, cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride, 1, bias=False)
        self.gn2 = _gn(groups, cmid)
        self.conv3 = StdConv2d(cmid, cout, 1, bias=False)
        self.gn3 = _gn(groups, cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = StdConv2d(cin, cout, 1, stride, bias=False)
            self.gn_proj = nn.GroupNorm(cout, cout)
        else:
            self.downsample = None

    def forward(self, x):
        res = x if self.downsample is None else self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(res + y)


class ResNetV2(nn.Module):
    """Root (7x7/2 conv, GN, ReLU; max-pool) and three stages; returns the 1/16 map and skips [1/8, 1/4, 1/2]."""

    def __init__(self, in_channels=3, width=64, blocks=(3, 4, 9), groups=32):
        super().__init__()
        self.root = nn.Sequential(StdConv2d(in_channels, width, 7, 2, 3, bias=False), _gn(groups, width),
                                  nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, 2, 0)
        stages = []
        cin = width
        for n, (units, mult) in enumerate(zip(blocks, (4, 8, 16))):
            cout, cmid = width * mult, width * mult // 4
            layers = [Bottleneck(cin, cout, cmid, 1 if n == 0 else 2, groups)]
            layers += [Bottleneck(cout, cout, cmid, 1, groups) for _ in range(units - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = cin
        self.skip_channels = [width * 8, width * 4, width]

    def forward(self, x):
        size = x.shape[-1]
        feats = []
        x = self.root(x)
        feats.append(x)  # 1/2
        x = self.pool(x)
        for i, stage in enumerate(self.stages[:-1]):
            x = stage(x)
            want = size // 4 // (i + 1)
            if x.shape[-1] != want or x.shape[-2] != want:  # the unpadded pool loses a pixel: pad back
                x = F.pad(x, [0, want - x.shape[-1], 0, want - x.shape[-2]])
            feats.append(x)  # 1/4, 1/8
        x = self.stages[-1](x)
        return x, feats[::-1]


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    def __init__(self, cin, cout, skip=0):
        super().__init__()
        self.conv1 = ConvBNReLU(cin + skip, cout)
        self.conv2 = ConvBNReLU(cout, cout)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.conv2(self.conv1(x))


class TransUNet(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

        c = {**FULL, **cfg}
        if int(c["img_size"]) % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {c['img_size']}")
        if not 0 <= int(c["n_skip"]) <= 3:
            raise ValueError(f"n_skip must be 0..3, got {c['n_skip']}")
        self.cfg = c
        self.encoder = ResNetV2(c["in_channels"], c["width"], tuple(c["blocks"]), c["groups"])
        grid = int(c["img_size"]) // 16
        self.embed = PatchEmbeddingBlock(self.encoder.out_channels, (grid, grid), 1, c["hidden"], c["heads"],
                                         proj_type="conv", pos_embed_type="learnable",
                                         dropout_rate=c["dropout"], spatial_dims=2)
        self.blocks = nn.ModuleList([TransformerBlock(c["hidden"], c["mlp"], c["heads"], c["dropout"], qkv_bias=True)
                                     for _ in range(int(c["layers"]))])
        self.norm = nn.LayerNorm(c["hidden"], eps=1e-6)
        self.conv_more = ConvBNReLU(c["hidden"], c["head_channels"])
        dec = list(c["decoder"])
        skips = self.encoder.skip_channels[: int(c["n_skip"])] + [0] * (4 - int(c["n_skip"]))
        ins = [c["head_channels"]] + dec[:-1]
        self.decoder = nn.ModuleList([DecoderBlock(i, o, s) for i, o, s in zip(ins, dec, skips)])
        self.head = nn.Conv2d(dec[-1], c["out_channels"], 3, padding=1)
        self.grid = grid

    def forward(self, x):
        if x.shape[-1] != self.grid * 16 or x.shape[-2] != self.grid * 16:
            raise ValueError(f"TransUNet built for {self.grid * 16}x{self.grid * 16} slices got {tuple(x.shape[-2:])}")
        f, skips = self.encoder(x)
        h = self.embed(f)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)  # (B, n_patches, hidden)
        b, n, d = h.shape
        h = h.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        h = self.conv_more(h)
        n_skip = int(self.cfg["n_skip"])
        for i, blk in enumerate(self.decoder):
            h = blk(h, skips[i] if i < n_skip else None)
        return self.head(h)


class SliceNet(nn.Module):
    """The TransUNet on slices stored as (B, C, 1, H, W) patches (the training engine's 3-D layout)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.net = TransUNet(cfg)

    def forward(self, x):
        if x.ndim == 5:
            b, c, d, h, w = x.shape
            y = self.net(x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w))
            return y.reshape(b, d, -1, h, w).permute(0, 2, 1, 3, 4)
        return self.net(x)


def build_net(cfg: dict) -> SliceNet:
    if cfg.get("arch", "transunet") != "transunet":
        raise ValueError(f"unknown slices network '{cfg.get('arch')}'")
    return SliceNet(cfg)
