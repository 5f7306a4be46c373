"""RTK backend: its projection matrices are ConeGeometry's mapping, its projector and FDK agree with the torch ones
(oblique direction, anisotropic voxels, detector offsets), the iterative methods beat FDK at 10 views, and the task
falls back to torch when RTK does not import."""

import numpy as np
import pytest
import torch

from deepsegrecon.cbct import methods, rtk_backend
from deepsegrecon.cbct.geometry import ConeGeometry
from deepsegrecon.cbct.projector import fdk, forward_project, mu_to_hu
from deepsegrecon.cbct.recon import metrics

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not rtk_backend.available(), reason="itk-rtk does not import")]


@pytest.fixture(autouse=True)
def one_itk_thread():
    if rtk_backend.available():
        rtk_backend.set_threads(1)


def _geo(angles, oblique):
    return ConeGeometry(300.0, 200.0, (40, 48), (1.3, 1.1), (2.0, -1.5), angles, (26, 22, 18), (1.1, 0.9, 1.4),
                        (-12.5, 33.25, 101.0), oblique)


def _phantom():
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (18, 22, 26)], indexing="ij")
    mu = np.where((i / 0.8) ** 2 + (j / 0.7) ** 2 + (k / 0.9) ** 2 < 1, 0.02, 0.0).astype(np.float32)
    mu[(i - 0.35) ** 2 + (j + 0.2) ** 2 + (k - 0.3) ** 2 < 0.04] = 0.05  # off-centre insert: catches flips
    return mu


def test_projection_matrices_are_cone_geometry_mapping(oblique_image):
    for angles in ([7, 50, 140, 200, 290, 330], list(np.linspace(0, 200, 9))):
        geo = _geo(angles, oblique_image.direction)
        pts = np.random.default_rng(0).uniform(-12, 12, (60, 3))
        h = np.c_[pts, np.ones(len(pts))] @ rtk_backend.projection_matrices(geo).transpose(0, 2, 1)
        assert np.abs(h[..., :2] / h[..., 2:] - geo.project(pts)).max() < 1e-9  # pixels


def test_forward_projection_agrees_with_torch(oblique_image):
    geo = _geo([7, 50, 140, 200, 290, 330], oblique_image.direction)
    mu = _phantom()
    p_rtk = rtk_backend.forward_project(mu, geo)
    p_torch = forward_project(torch.from_numpy(mu), geo).numpy()
    assert p_rtk.shape == p_torch.shape == (6, 40, 48)
    assert np.linalg.norm(p_rtk - p_torch) / np.linalg.norm(p_torch) < 0.02  # Joseph vs ray marching
    for a, b in zip(p_rtk, p_torch):  # the insert's shadow at the same pixel in every view
        assert np.abs(np.array(np.unravel_index(a.argmax(), a.shape)) - np.unravel_index(b.argmax(), b.shape)).max() <= 1


@pytest.mark.parametrize("window", ["ram-lak", "hann"])
def test_fdk_matches_torch_fdk(oblique_image, window):
    geo = _geo(list(np.arange(0, 360, 4.0)), oblique_image.direction)
    proj = forward_project(torch.from_numpy(_phantom()), geo)
    ref = fdk(proj, geo, window).numpy()
    got = rtk_backend.fdk(proj.numpy(), geo, window)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def test_iterative_methods_beat_fdk_at_10_views(oblique_image, monkeypatch):
    # a fast test; the shipped TV weights (tuned on 3 mm CT) over-smooth this 1 mm, noise-free phantom
    monkeypatch.setattr(methods, "ADMM", {"iters": 4, "alpha": 0.02, "beta": 10.0, "cg_iters": 3})
    geo = _geo(list(np.arange(0, 360, 36.0)), oblique_image.direction)
    mu = _phantom()
    proj = rtk_backend.forward_project(mu, geo)
    hu = mu_to_hu(mu)
    scores = {m: metrics(mu_to_hu(methods.classical(m, proj, geo, "rtk")), hu)["psnr_db"]
              for m in methods.CLASSICAL}
    for m in ("sart", "cg", "admm-tv"):
        assert scores[m] > scores["fdk"] + 1.0, scores
    start = methods.data_consistency(mu * 0.8, proj, geo, 4)  # from a close start it moves closer
    assert metrics(mu_to_hu(start), hu)["psnr_db"] > metrics(mu_to_hu(mu * 0.8), hu)["psnr_db"]


def test_backend_choice_without_rtk(monkeypatch):
    assert methods.resolve_backend("auto", "cpu") == "rtk"
    assert methods.resolve_backend("auto", "cuda") == "rtk" and methods.resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setattr(rtk_backend, "rtk", None)
    assert methods.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="itk-rtk"):
        methods.resolve_backend("rtk", "cpu")
    assert "sart" not in methods.available("torch") and "cg" in methods.available("torch")
