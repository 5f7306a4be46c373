"""Forward projector against analytic line integrals; noise model; FDK on a smooth phantom (360 views)."""

import math

import numpy as np
import pytest
import torch

from deepsegrecon.cbct.geometry import ConeGeometry, geometry_for_grid
from deepsegrecon.cbct.projector import add_noise, fdk, forward_project
from deepsegrecon.cbct.recon import metrics
from deepsegrecon.image import Image

SPACING = (1.0, 1.2, 0.9)  # anisotropic voxels, (i, j, k) mm


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _geo(n=48, views=4, det=64):
    return geometry_for_grid(Image(np.zeros((n, n, n), np.float32), SPACING), views, detector=det)


def _rays(geo, view):
    """Source and unit ray directions (rows, columns, 3) written out independently of the projector."""
    a = geo.angles[view]
    e, uax = np.array([math.cos(a), math.sin(a), 0]), np.array([-math.sin(a), math.cos(a), 0])
    u, v = geo.detector_uv()
    src = geo.dso * e
    pix = src - geo.dsd * e + u[None, :, None] * uax + v[:, None, None] * np.array([0, 0, 1.0])
    d = pix - src
    return src, d / np.linalg.norm(d, axis=-1, keepdims=True)


def _voxelise(geo, inside, ss=4):
    """Partial-volume phantom: fraction of ss^3 sub-voxel centres inside (frame mm)."""
    I, J, K = geo.volume_size
    ax = [((np.arange(n * ss) + 0.5) / ss - 0.5) * s - h for n, s, h in zip((K, J, I), SPACING[::-1],
                                                                          geo.half_extent[::-1])]
    z, y, x = np.meshgrid(*ax, indexing="ij")
    m = inside(x, y, z).astype(np.float32)
    return m.reshape(K, ss, J, ss, I, ss).mean((1, 3, 5))


def _ellipsoid_chords(geo, view, c, semi):
    src, d = _rays(geo, view)
    s, dd = (src - c) / semi, d / semi
    A, B, C = (dd * dd).sum(-1), (s * dd).sum(-1), (s * s).sum() - 1.0
    disc = B * B - A * C
    return 2 * np.sqrt(np.clip(disc, 0, None)) / A


@pytest.mark.parametrize("semi", [(20.0, 20.0, 20.0), (21.0, 16.0, 13.0)], ids=["sphere", "ellipsoid"])
def test_line_integrals_match_analytic_chords(semi):
    geo = _geo(views=4)
    c = np.array([3.0, -2.0, 1.5])
    semi = np.array(semi)
    vol = _voxelise(geo, lambda x, y, z: ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2
                    + ((z - c[2]) / semi[2]) ** 2 <= 1.0) * 0.02
    proj = forward_project(torch.from_numpy(vol), geo, views=[0, 1, 3]).numpy()
    for out, view in zip(proj, (0, 1, 3)):
        chord = _ellipsoid_chords(geo, view, c, semi) * 0.02
        interior = chord >= 0.7 * chord.max()  # rays through the inner part (the edge is partial-volume)
        assert interior.sum() > 50
        rel = np.abs(out - chord)[interior] / chord[interior]
        assert rel.max() <= 0.01, rel.max()
        far = _ellipsoid_chords(geo, view, c, semi + 2.0) == 0  # rays missing it by 2 mm see nothing
        assert far.sum() > 50 and np.abs(out[far]).max() < 1e-6


def test_off_centre_point_lands_on_its_pixel():
    geo = _geo(views=12, det=64)
    p = np.array([11.0, -8.0, 6.0])
    sigma = 1.0
    vol = _voxelise(geo, lambda x, y, z: ((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) <= sigma ** 2, ss=3)
    views = [1, 4, 7]
    proj = forward_project(torch.from_numpy(vol), geo, views=views).numpy()
    for out, view in zip(proj, views):
        a = geo.angles[view]
        e, uax = np.array([math.cos(a), math.sin(a), 0]), np.array([-math.sin(a), math.cos(a), 0])
        mag = geo.dsd / (geo.dso - p @ e)
        col = (p @ uax) * mag / geo.detector_spacing[0] + (geo.detector_shape[1] - 1) / 2
        row = p[2] * mag / geo.detector_spacing[1] + (geo.detector_shape[0] - 1) / 2
        r, cc = np.mgrid[: out.shape[0], : out.shape[1]]
        w = out / out.sum()
        assert abs((w * cc).sum() - col) <= 0.5 and abs((w * r).sum() - row) <= 0.5
        assert np.hypot((w * cc).sum() - col, (w * r).sum() - row) < 0.25


def test_noise_is_poisson_plus_electronic():
    p = torch.full((4, 64, 64), 2.0)
    photons = 2e4
    noisy = add_noise(p, photons=photons, electronic_sd=10.0, seed=3)
    assert torch.equal(noisy, add_noise(p, photons=photons, electronic_sd=10.0, seed=3))
    counts = photons * torch.exp(-noisy.double())
    expected = photons * math.exp(-2.0)
    assert float(counts.mean()) == pytest.approx(expected, rel=0.01)
    assert float(counts.var()) == pytest.approx(expected + 100.0, rel=0.08)  # Poisson variance + sd^2
    assert float(add_noise(p, photons=1e9, electronic_sd=0.0).sub(p).abs().max()) < 1e-3


def _blob_projections(geo, blobs):
    """Analytic line integrals of isotropic Gaussian blobs (centre, sigma, amplitude)."""
    out = []
    for view in range(geo.n_views):
        src, d = _rays(geo, view)
        p = 0.0
        for c, s, amp in blobs:
            w = np.asarray(c) - src
            t = (w * d).sum(-1)
            dist2 = (w * w).sum() - t * t
            p = p + amp * s * math.sqrt(2 * math.pi) * np.exp(-dist2 / (2 * s * s))
        out.append(p)
    return torch.tensor(np.stack(out), dtype=torch.float32)


@pytest.mark.parametrize("filt", ["ram-lak", "shepp-logan"])
def test_fdk_smooth_phantom_360_views(filt):
    geo = _geo(n=40, views=360, det=64)
    blobs = [((0, 0, 0), 8.0, 0.02), ((6, -5, 3), 3.5, 0.01), ((-6, 5, -3), 3.0, 0.015)]
    I, J, K = geo.volume_size
    z, y, x = np.meshgrid(*[np.arange(n) * s - h for n, s, h in zip((K, J, I), SPACING[::-1], geo.half_extent[::-1])],
                          indexing="ij")
    truth = sum(a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s)) for c, s, a in blobs)
    rec = fdk(_blob_projections(geo, blobs), geo, filt).numpy()
    from skimage.metrics import peak_signal_noise_ratio

    psnr = peak_signal_noise_ratio(truth, rec.astype(np.float64), data_range=float(truth.max() - truth.min()))
    assert psnr >= 35.0, psnr


def test_fdk_short_scan_parker_and_sparse_views_degrade():
    """180 deg + fan with Parker weights still reconstructs; 8 views over 360 deg are much worse (streaks)."""
    geo = _geo(n=32, views=160, det=48)
    r = math.hypot(*(np.array(geo.volume_size[:2]) * np.array(SPACING[:2]) / 2))
    span = 180.0 + 2 * math.degrees(math.asin(r / geo.dso)) + 2
    geo.angles_deg = [span * i / 159 for i in range(160)]
    blobs = [((0, 0, 0), 6.0, 0.02), ((4, -4, 2), 2.5, 0.01)]
    I, J, K = geo.volume_size
    z, y, x = np.meshgrid(*[np.arange(n) * s - h for n, s, h in zip((K, J, I), SPACING[::-1], geo.half_extent[::-1])],
                          indexing="ij")
    truth = sum(a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s)) for c, s, a in blobs)
    from skimage.metrics import peak_signal_noise_ratio as psnr

    short = fdk(_blob_projections(geo, blobs), geo).numpy()
    rng = float(truth.max())
    assert psnr(truth, short.astype(np.float64), data_range=rng) >= 30.0
    sparse = ConeGeometry.from_dict({**geo.to_dict(), "angles_deg": [45.0 * i for i in range(8)]})
    coarse = fdk(_blob_projections(sparse, blobs), sparse).numpy()
    assert psnr(truth, coarse.astype(np.float64), data_range=rng) < psnr(truth, short.astype(np.float64),
                                                                         data_range=rng) - 5


def test_metrics_window():
    a = np.random.default_rng(0).uniform(-1000, 1000, (16, 16, 16))
    m = metrics(a, a)
    assert m["psnr_db"] >= 99 and m["ssim"] == pytest.approx(1.0)
    noisy = a + np.random.default_rng(1).normal(0, 20.0, a.shape)
    assert metrics(noisy, a)["psnr_db"] == pytest.approx(20 * math.log10(2000 / 20.0), abs=0.3)
