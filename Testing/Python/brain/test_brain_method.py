"""Brain tumour: label conventions, the paper's SegResNet + VAE, its loss, the MNI phantom, preprocessing."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from conftest import oblique_direction
from deepsegrecon.brain import labels as L
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image


# ------------------------------------------------------------------------------------------- labels
def test_label_conventions_both_ways():
    lab21 = np.array([0, 1, 2, 4, 4, 2, 0], np.uint8)
    lab23 = L.convert(lab21, "brats2021", "brats2023")
    assert lab23.tolist() == [0, 1, 2, 3, 3, 2, 0]
    assert L.convert(lab23, "brats2023", "brats2021").tolist() == lab21.tolist()
    assert L.detect_convention(lab21) == "brats2021" and L.detect_convention(lab23) == "brats2023"
    et, tc, wt = L.to_regions(lab23)
    assert et.tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert tc.tolist() == [0, 1, 0, 1, 1, 0, 0]
    assert wt.tolist() == [0, 1, 1, 1, 1, 1, 0]
    assert L.from_regions(et, tc, wt).tolist() == lab23.tolist()
    # nesting is enforced: an ET voxel outside TC/WT is not kept
    assert L.from_regions(np.array([1, 1]), np.array([0, 1]), np.array([1, 1])).tolist() == [2, 3]
    with pytest.raises(InputError, match=r"\[4\]"):
        L.convert(lab21, "brats2023", "brats2021")
    with pytest.raises(InputError, match="7"):
        L.detect_convention(np.array([0, 7]))
    with pytest.raises(InputError, match="both 3 and 4"):
        L.detect_convention(np.array([3, 4]))
    vols = L.region_volumes_ml(lab23, (2.0, 2.0, 2.0))
    assert vols == {"enhancing_tumor": 0.016, "tumor_core": 0.024, "whole_tumor": 0.04}


# ------------------------------------------------------------------------------------------- network
def _tiny(with_vae=True, crop=(32, 32, 32)):
    from deepsegrecon.brain.nets import build_net, default_network

    return build_net(default_network(8, crop), with_vae=with_vae)


def test_network_is_the_papers():
    from monai.networks.blocks.segresnet_block import ResBlock

    from deepsegrecon.brain.nets import PAPER, SegResNetVAE2018, default_network

    assert PAPER["init_filters"] == 32 and PAPER["blocks_down"] == [1, 2, 2, 4] and PAPER["blocks_up"] == [1, 1, 1]
    cfg = default_network(32, (160, 192, 128))
    assert {k: cfg[k] for k in PAPER} == PAPER  # the paper's configuration is one argument away
    net = SegResNetVAE2018(4, 3, init_filters=32, vae_input_size=(160, 192, 128))
    assert [sum(isinstance(m, ResBlock) for m in layer) for layer in net.seg.down_layers] == [1, 2, 2, 4]
    assert [len(layer) for layer in net.seg.up_layers] == [1, 1, 1]
    assert isinstance(net.seg.dropout, torch.nn.Dropout3d) and net.seg.dropout.p == 0.2
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    # VAE: 256 filters at the encoder end -> 16 x (input/16) -> dense 256 = 128 means + 128 (log-)variances
    conv = net.vd[2].conv
    assert conv.in_channels == 256 and conv.out_channels == 16 and conv.stride == (2, 2, 2)
    assert net.vd_dense.in_features == 16 * 10 * 12 * 8 and net.vd_dense.out_features == 256
    assert net.vu_dense.in_features == 128
    assert net.vae_end.conv.out_channels == 4 and net.vae_end.conv.kernel_size == (1, 1, 1)
    # its own decoder: no module is shared between the VAE branch and the segmentation decoder
    seg_ids = {id(p) for p in net.seg.parameters()}
    vae_ids = {id(p) for n, p in net.named_parameters() if not n.startswith("seg.")}
    assert vae_ids and not (seg_ids & vae_ids)


def test_train_returns_vae_outputs_eval_returns_segmentation_only():
    net = _tiny()
    x = torch.randn(1, 4, 32, 32, 32)
    net.train()
    out = net(x)
    assert isinstance(out, tuple) and len(out) == 4
    seg, recon, mu, logvar = out
    assert seg.shape == (1, 3, 32, 32, 32) and recon.shape == x.shape and mu.shape == logvar.shape == (1, 128)
    net.eval()
    with torch.no_grad():
        y = net(torch.randn(1, 4, 40, 24, 56))  # any size in eval: the VAE is not run
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, 40, 24, 56)
    with pytest.raises(ValueError, match="VAE"):
        net.train()
        net(torch.randn(1, 4, 48, 32, 32))


def test_loss_is_dice_plus_l2_plus_kl_and_kl_falls():
    from deepsegrecon.brain.nets import BratsLoss

    torch.manual_seed(0)
    net = _tiny(crop=(16, 16, 16))
    with torch.no_grad():  # start far from the prior: large means
        net.vd_dense.bias[:128] += 3.0
    x = torch.randn(2, 4, 16, 16, 16)
    y = torch.zeros(2, 3, 16, 16, 16)
    y[:, :, 4:12, 4:12, 4:12] = 1
    loss_fn = BratsLoss()
    net.train()
    out = net(x)
    total, terms = loss_fn(out, y, x)
    assert torch.isclose(total, terms["dice"] + 0.1 * terms["l2"] + 0.1 * terms["kl"])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    kls = []
    for _ in range(25):
        total, terms = loss_fn(net(x), y, x)
        opt.zero_grad()
        total.backward()
        opt.step()
        kls.append(float(terms["kl"].detach()))
    assert kls[0] > 3.0 and kls[-1] < 0.5 * kls[0]


def test_shipped_training_history_kl_and_loss_fell():
    from deepsegrecon.store import ModelStore

    m = ModelStore().get("brain-tumor", "phantom-v1").manifest
    first, last = m["training"]["first_terms"], m["training"]["final_terms"]
    assert last["loss"] < first["loss"] and last["dice"] < first["dice"]
    assert last["kl"] < first["kl"] or last["kl"] < 0.05


# ------------------------------------------------------------------------------------------- phantom
def test_phantom_anatomy_tumour_and_contrast():
    from deepsegrecon.brain.phantom import make_phantom

    a, b = make_phantom(7), make_phantom(7)
    assert np.array_equal(a["labels"].array, b["labels"].array)
    assert np.array_equal(a["images"]["flair"].array, b["images"]["flair"].array)
    c = make_phantom(8)
    assert not np.array_equal(a["labels"].array, c["labels"].array)
    lab = a["labels"].array
    assert set(np.unique(lab)) <= {0, 1, 2, 3} and (lab == 3).any() and (lab == 2).any()
    ref = a["labels"]
    assert ref.spacing == (2.0, 2.0, 2.0) and np.allclose(ref.direction, np.diag([-1, -1, 1]))
    for img in a["images"].values():
        assert img.same_grid(ref)
    brain = a["images"]["t1"].array > 0
    assert 0.3 < brain.mean() < 0.8 and not (lab[~brain] > 0).any()
    # ET is a rim around necrosis: its voxels touch non-ET voxels of the core or oedema
    from scipy.ndimage import binary_erosion

    et = lab == 3
    assert binary_erosion(et).sum() < 0.6 * et.sum()
    med = {m: {v: float(np.median(img.array[lab == v])) for v in (1, 2, 3)} for m, img in a["images"].items()}
    wm = {m: float(np.median(img.array[(lab == 0) & brain])) for m, img in a["images"].items()}
    assert med["t1c"][3] > 1.4 * wm["t1c"] and med["t1c"][3] > 1.5 * med["t1"][3] / wm["t1"] * wm["t1c"]
    assert med["flair"][2] > 1.4 * wm["flair"] and med["t2"][2] > 1.4 * wm["t2"]
    assert med["t1c"][1] < 0.7 * med["t1c"][3]


def test_phantom_sizes_and_positions_vary():
    from deepsegrecon.brain.phantom import make_phantom

    infos = [make_phantom(s, modalities=())["info"] for s in (11, 12, 13, 14)]
    wt = [i["volumes_ml"]["WT"] for i in infos]
    centres = np.array([i["centre_kji"] for i in infos])
    assert max(wt) > 2 * min(wt) and np.ptp(centres, 0).max() > 10


# ------------------------------------------------------------------------------------------- preprocessing
def test_zscore_over_brain_voxels_only():
    from deepsegrecon.brain.preprocess import zscore

    a = np.zeros((10, 10, 10), np.float32)
    a[2:8, 2:8, 2:8] = np.random.default_rng(0).uniform(100, 200, (6, 6, 6))
    z = zscore(a)
    inside = a != 0
    assert abs(z[inside].mean()) < 1e-5 and abs(z[inside].std() - 1) < 1e-4 and not z[~inside].any()


def test_inputs_resampled_onto_first_and_model_grid_geometry():
    from deepsegrecon.brain.preprocess import model_grid, on_common_grid, resample_to, to_network_input

    arr = np.zeros((20, 30, 40), np.float32)
    k, j, i = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
    arr[4:16, 5:25, 6:34] = (1.0 + 0.05 * i + 0.03 * j + 0.1 * k)[4:16, 5:25, 6:34]
    first = Image(arr, spacing=(0.9, 1.1, 2.5), origin=(10.0, -20.0, 5.0), direction=oblique_direction())
    other_grid = Image(np.zeros((45, 45, 36), np.float32), spacing=(1.5, 1.5, 1.5), origin=(-10.0, -40.0, 2.0),
                       direction=np.eye(3))  # covers the first one, axis-aligned
    other = resample_to(first, other_grid)
    common = on_common_grid({"t1c": first, "flair": other})
    assert common["flair"].same_grid(first)
    inner = arr > 0
    from scipy.ndimage import binary_erosion

    core = binary_erosion(inner, iterations=3)
    assert np.corrcoef(common["flair"].array[core], arr[core])[0, 1] > 0.95
    g = model_grid(first, 2.0)
    assert np.allclose(g.direction, first.direction) and np.allclose(g.spacing, 2.0, atol=0.3)
    # the model grid covers the same physical box
    span = lambda im: np.array(im.size) * np.array(im.spacing)
    assert np.allclose(span(g), span(first))
    c0 = first.physical_points(np.array([[-0.5, -0.5, -0.5]]))
    c1 = g.physical_points(np.array([[-0.5, -0.5, -0.5]]))
    assert np.allclose(c0, c1)
    x, grid, ref, brain, used = to_network_input({"t1c": first, "flair": other}, ["t1", "t1c", "t2", "flair"], 2.0)
    assert x.shape[1] == 4 and not x[0, 0].any() and not x[0, 2].any() and x[0, 1].abs().sum() > 0
    assert used == ["t1c", "flair"] and ref is first and brain.shape == arr.shape


def test_inputs_without_overlap_are_refused():
    from deepsegrecon.brain.preprocess import on_common_grid

    a = Image(np.ones((8, 8, 8), np.float32))
    b = Image(np.ones((8, 8, 8), np.float32), origin=(500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="does not overlap"):
        on_common_grid({"t1c": a, "flair": b})
