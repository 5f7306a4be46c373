"""DIF-Gaussian network: Gaussian interpolation, nearest centres, view pooling, gradients, a tiny fit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepsegrecon.cbct.geometry import geometry_for_grid
from deepsegrecon.cbct.net import DIFGaussian, quaternion_to_matrix
from deepsegrecon.cbct.projector import forward_project, hu_to_mu
from deepsegrecon.cbct.recon import hu_to_value, proj_scale, projector_for, reconstruct
from deepsegrecon.image import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {"features": [4, 8, 8, 16], "out_ch": 8, "det_res": 32, "gs_res": 6, "decoder": [16, 8, 1]}


def _case(n=24, views=6, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    hu = -1000 + 1000 * ((x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1) + 600 * (
        (x - 0.2) ** 2 + (y + 0.1) ** 2 + z ** 2 < 0.05)
    img = Image(hu.astype(np.float32) + rng.normal(0, 5, hu.shape).astype(np.float32), (2.0, 2.0, 2.5))
    geo = geometry_for_grid(img, views, detector=32)
    proj = forward_project(hu_to_mu(torch.from_numpy(img.array)), geo, step_voxels=1.0)
    return img, geo, proj


def test_model_and_shipped_config_are_small():
    from deepsegrecon.cbct.net import default_network

    cfg = default_network()
    assert cfg["gs_res"] == 12 and DIFGaussian().gs_base.shape == (12 ** 3, 3)
    n = sum(p.numel() for p in DIFGaussian().parameters())
    assert n * 4 < 2e6  # under 2 MB of float32 weights


def test_quaternion_rotation():
    q = torch.tensor([[1.0, 0, 0, 0], [math.cos(0.5), 0, 0, math.sin(0.5)]])
    r = quaternion_to_matrix(q)
    assert torch.allclose(r[0], torch.eye(3), atol=1e-6)
    assert torch.allclose(r[1] @ r[1].T, torch.eye(3), atol=1e-6)
    assert torch.allclose(r[1][:2, :2], torch.tensor([[math.cos(1.0), -math.sin(1.0)], [math.sin(1.0), math.cos(1.0)]]),
                          atol=1e-6)


def test_gaussian_interpolation_is_density_weighted_sum_of_k_nearest():
    torch.manual_seed(0)
    model = DIFGaussian(TINY)
    G = model.gs_base.shape[0]
    scales = torch.rand(G, 3) * 0.2 + 0.1
    rot = quaternion_to_matrix(torch.randn(G, 4))
    enc = {"gs_feats": torch.randn(G, 5), "gs_centres": model.gs_base + 0.05 * torch.randn(G, 3),
           "gs_whiten": rot.transpose(1, 2) / scales[:, :, None],
           "gs_norm": model.cell ** 3 / ((2 * math.pi) ** 1.5 * scales.prod(-1))}
    pts = torch.rand(40, 3) * 2 - 1
    got = model.gaussian_features(enc, pts)
    # brute force: k nearest grid positions, full covariance R S^2 R^T, normalised density x cell volume
    cov = rot @ torch.diag_embed(scales ** 2) @ rot.transpose(1, 2)
    idx = torch.argsort(((pts[:, None] - model.gs_base[None]) ** 2).sum(-1), 1)[:, : TINY.get("k", 3)]
    want = torch.zeros(40, 5)
    for n in range(40):
        for g in idx[n]:
            dist = torch.distributions.MultivariateNormal(enc["gs_centres"][g], cov[g])
            want[n] += dist.log_prob(pts[n]).exp() * model.cell ** 3 * enc["gs_feats"][g]
    assert torch.allclose(got, F.leaky_relu(want, 0.1), atol=1e-4)
    # the candidate shortcut used for whole volumes finds the same neighbours
    box = torch.rand(200, 3) * 0.3 + 0.2
    cand = model.candidates_for(box.amin(0), box.amax(0))
    assert len(cand) < G
    assert torch.allclose(model.gaussian_features(enc, box, cand), model.gaussian_features(enc, box), atol=1e-6)


def test_any_view_count_view_order_and_gradients():
    model = DIFGaussian(TINY).eval()
    img, geo, proj = _case(views=6)
    pts = torch.rand(300, 3) * 2 - 1
    with torch.no_grad():
        project = projector_for(geo)
        a = model.query(model.encode(proj / proj_scale(geo), project), pts, project(pts))
        perm = [3, 0, 5, 1, 4, 2]
        geo2 = geometry_for_grid(img, 6, detector=32)
        geo2.angles_deg = [geo.angles_deg[i] for i in perm]
        p2 = projector_for(geo2)
        b = model.query(model.encode(proj[perm] / proj_scale(geo), p2), pts, p2(pts))
    assert a.shape == (300,) and torch.allclose(a, b, atol=1e-5)  # max-pooling over views: order-free
    _, geo10, proj10 = _case(views=10)
    model.train()
    p10 = projector_for(geo10)
    loss = model.query(model.encode(proj10 / proj_scale(geo10), p10), pts, p10(pts)).square().mean()
    loss.backward()
    for name in ("encoder.conv0", "gs_feats_mlp", "gs_params_mlp", "decoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads), name


def test_sgd_recipe_fits_one_case_and_reconstruct_uses_the_grid():
    torch.manual_seed(1)
    model = DIFGaussian(TINY)
    img, geo, proj = _case(n=16)
    project = projector_for(geo)
    vol = hu_to_value(torch.from_numpy(img.array))[None, None]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.98, weight_decay=1e-3)
    losses = []
    for _ in range(30):
        pts = torch.rand(1024, 3) * 2 - 1
        target = F.grid_sample(vol, pts[None, None, None], align_corners=True)[0, 0, 0, 0]
        loss = F.mse_loss(model.query(model.encode(proj / proj_scale(geo), project), pts, project(pts)), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    out = reconstruct(model, proj, geo, query_res=8)
    assert out.shape == img.array.shape
    full = reconstruct(model, proj, geo, query_res=None)
    assert float((out - full).abs().mean()) < 0.05  # the coarse query + trilinear stays close


def test_training_data_keeps_the_heldout_slab_out_and_training_runs():
    from deepsegrecon.cbct import train as T
    from deepsegrecon.cbct.data import GAP_SLICES, HELDOUT_SLICES, heldout_cases

    vols, weights, held = T.training_volumes()
    chest = vols[0]
    assert held.array.shape[0] == HELDOUT_SLICES and np.allclose(held.spacing, 2.0)
    # physical k extent: the held-out slab starts beyond the last training slice plus the gap
    k_train_end = chest.physical_points(np.array([[0, 0, chest.array.shape[0] - 1]]))[0]
    k_held_start = held.physical_points(np.array([[0, 0, 0]]))[0]
    gap = np.dot(k_held_start - k_train_end, chest.direction[:, 2])
    assert gap >= GAP_SLICES * 2.0
    for _, case in heldout_cases(held):
        assert case.array.shape == (64, 64, 64)
        z = case.physical_points(np.array([[0, 0, 0]]))[0]
        assert np.dot(z - k_train_end, chest.direction[:, 2]) > 0
    model, cfg, history, iters = T.train(minutes=5, max_iters=3, bank=2, log=lambda *a, **k: None,
                                         optimizer="adamw", lr=1e-3, network=TINY)
    assert iters == 3 and cfg["gs_res"] == 6
