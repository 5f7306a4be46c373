"""TransUNet: the paper's R50-ViT-B/16 layout (shapes at 224x224, every skip count) and its building blocks."""

import pytest
import torch

from deepsegrecon.slices.nets import FULL, SMALL, ResNetV2, SliceNet, StdConv2d, TransUNet

torch.set_num_threads(1)


def test_full_configuration_shapes_and_size():
    torch.manual_seed(0)
    net = TransUNet({**FULL, "out_channels": 9}).eval()
    # R50 stages [3, 4, 9], ViT-B: 12 layers, width 768, 12 heads, learned 14x14 position embeddings, no class token
    assert [len(s) for s in net.encoder.stages] == [3, 4, 9]
    assert len(net.blocks) == 12 and net.blocks[0].attn.num_heads == 12
    assert tuple(net.embed.position_embeddings.shape) == (1, 196, 768)
    assert net.embed.patch_embeddings.kernel_size == (1, 1) and net.embed.patch_embeddings.in_channels == 1024
    assert isinstance(net.encoder.root[0], StdConv2d) and isinstance(net.encoder.root[1], torch.nn.GroupNorm)
    assert [b.conv2[0].out_channels for b in net.decoder] == [256, 128, 64, 16]
    n = sum(p.numel() for p in net.parameters())
    assert 104e6 < n < 106.5e6  # the paper's R50-ViT-B/16 TransUNet has ~105 M parameters
    x = torch.randn(1, 3, 224, 224)
    seen = []
    net.encoder.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        assert tuple(net(x).shape) == (1, 9, 224, 224)
    f, skips = seen[0]
    assert tuple(f.shape) == (1, 1024, 14, 14)
    assert [tuple(s.shape) for s in skips] == [(1, 512, 28, 28), (1, 256, 56, 56), (1, 64, 112, 112)]


@pytest.mark.parametrize("n_skip", [0, 1, 2, 3])
def test_every_skip_count_at_224(n_skip):
    torch.manual_seed(n_skip)
    cfg = {**SMALL, "img_size": 224, "n_skip": n_skip, "out_channels": 5}
    net = TransUNet(cfg).eval()
    enc = net.encoder.skip_channels  # channels at 1/8, 1/4, 1/2
    for i, block in enumerate(net.decoder):
        expected_in = ([cfg["head_channels"]] + cfg["decoder"][:-1])[i] + (enc[i] if i < n_skip else 0)
        assert block.conv1[0].in_channels == expected_in
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = net(x)
        assert tuple(y.shape) == (2, 5, 224, 224)
        # the skips really feed the decoder: changing only fine detail changes the output more with skips
        assert torch.isfinite(y).all()


def test_skips_carry_fine_detail():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    x2 = x.clone()
    x2[..., 100:104, 100:104] += 3.0  # a 4-pixel change, below the 16-pixel ViT grid
    diffs = []
    for n_skip in (0, 3):
        torch.manual_seed(1)
        net = TransUNet({**SMALL, "img_size": 224, "n_skip": n_skip}).eval()
        with torch.no_grad():
            d = (net(x) - net(x2)).abs()
        diffs.append(float(d[..., 96:108, 96:108].mean() / (d.mean() + 1e-12)))
    assert diffs[1] > diffs[0]  # with skips the change stays local (sharper)


def test_weight_standardisation():
    torch.manual_seed(0)
    conv = StdConv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 9, 9)
    w = conv.weight
    ws = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, ws, padding=1), atol=1e-5)
    with torch.no_grad():
        y = conv(x)
        conv.weight.mul_(7.0).add_(0.3)  # standardised: invariant to weight scale and shift per filter
        assert torch.allclose(conv(x), y, rtol=5e-3, atol=1e-3)


def test_resnet_pads_odd_sizes_back():
    enc = ResNetV2(3, 8, (1, 1, 1), 4)
    f, skips = enc(torch.randn(1, 3, 224, 224))
    assert f.shape[-1] == 14 and [s.shape[-1] for s in skips] == [28, 56, 112]


def test_slice_net_takes_engine_patches_and_refuses_other_sizes():
    net = SliceNet({**SMALL, "img_size": 32, "width": 8, "hidden": 32, "heads": 2, "mlp": 64, "layers": 1,
                    "head_channels": 16, "decoder": [16, 8, 8, 8], "out_channels": 4}).eval()
    with torch.no_grad():
        assert tuple(net(torch.randn(2, 3, 1, 32, 32)).shape) == (2, 4, 1, 32, 32)
        with pytest.raises(ValueError, match="32x32"):
            net(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        TransUNet({**SMALL, "img_size": 40})
