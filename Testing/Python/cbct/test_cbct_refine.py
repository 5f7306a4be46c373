"""Data-consistency steps after DIF-Gaussian: they pull a blurred volume back to the measured projections, stop when
the residual grows, and run on the network's query grid, which spans the same box as the volume grid."""

import numpy as np
import pytest
import torch

from deepsegrecon.cbct.geometry import geometry_for_grid
from deepsegrecon.cbct.projector import add_noise, fdk, forward_project, hu_to_mu, mu_to_hu
from deepsegrecon.cbct.recon import hu_to_value, metrics, query_geometry, refine, to_grid, value_to_hu
from deepsegrecon.image import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _phantom(n=40):
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    hu = -1000 + 1000 * ((x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1)
    hu += 700 * ((x - 0.3) ** 2 + (y + 0.1) ** 2 + (z / 0.5) ** 2 < 0.04) - 300 * ((x + 0.3) ** 2 + y ** 2 < 0.03)
    direction = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]])  # not the identity: the steps work in the frame
    return Image(hu.astype(np.float32), (2.0, 2.0, 2.5), (10.0, -5.0, 3.0), direction)


def _residual(values, proj, geo):
    return float((proj - forward_project(hu_to_mu(value_to_hu(values)), geo, step_voxels=1.0)).norm())


def test_refine_brings_a_blurred_volume_back_to_the_projections():
    img = _phantom()
    geo = geometry_for_grid(img, 10, detector=48)
    proj = add_noise(forward_project(hu_to_mu(torch.from_numpy(img.array)), geo), seed=3)
    truth = torch.from_numpy(img.array)
    # a stand-in for the network: the truth blurred (what a network trained on coarse crops gives) and shifted by 80 HU
    blurred = torch.nn.functional.avg_pool3d(truth[None, None], 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    start = hu_to_value(blurred + 80.0)
    out = refine(start, proj, geo, iters=4)
    assert out.shape == start.shape
    assert _residual(out, proj, geo) < 0.6 * _residual(start, proj, geo)
    before = metrics(value_to_hu(start).numpy(), img.array)["psnr_db"]
    after = metrics(value_to_hu(out).numpy(), img.array)["psnr_db"]
    assert after > before + 2.0, (before, after)
    assert float(value_to_hu(out).min()) >= -1000.0 - 1e-3  # attenuation stays >= 0


def test_refine_stops_when_the_residual_grows():
    img = _phantom(24)
    geo = geometry_for_grid(img, 8, detector=32)
    proj = forward_project(hu_to_mu(torch.from_numpy(img.array)), geo, step_voxels=1.0)
    start = hu_to_value(torch.full(img.array.shape, -200.0))
    r0 = _residual(start, proj, geo)
    # too large a step: the plain iteration diverges after its first step
    mu, plain = hu_to_mu(value_to_hu(start)), []
    for _ in range(6):
        r = proj - forward_project(mu, geo, step_voxels=1.0)
        plain.append(float(r.norm()))
        mu = (mu + 2.0 * fdk(r, geo, "shepp-logan")).clamp(min=0.0)
    assert plain[1] < 0.2 * r0 and plain[5] > 3 * plain[1], plain
    guarded = refine(start, proj, geo, iters=6, relax=2.0)
    assert _residual(guarded, proj, geo) == pytest.approx(plain[1], rel=1e-4)  # kept the volume before the growth
    assert torch.isfinite(guarded).all()
    assert torch.equal(refine(start, proj, geo, iters=0), hu_to_value(mu_to_hu(hu_to_mu(value_to_hu(start)))))


def test_query_grid_spans_the_volume_box():
    img = Image(np.zeros((100, 90, 130), np.float32), (0.8, 1.0, 1.5), (1.0, 2.0, 3.0),
                np.array([[0, 0, 1], [1, 0, 0], [0, 1.0, 0]]))
    geo = geometry_for_grid(img, 10, detector=64)
    q = query_geometry(geo, 64)
    assert q.volume_size == (64, 64, 64) and query_geometry(geo, None) is geo and query_geometry(geo, 200) is geo
    assert np.allclose(q.half_extent, geo.half_extent)
    corners = np.array([[-1, -1, -1], [1, 1, 1]]) * geo.half_extent
    assert np.allclose(q.frame_to_lps(corners), geo.frame_to_lps(corners))
    assert np.allclose(geo.frame_to_lps(corners)[0], img.origin)  # first voxel centre = the image origin
    # to_grid keeps the corner values: a ramp along i stays a ramp
    ramp = torch.linspace(0, 1, 64).expand(64, 64, 64).contiguous()
    full = to_grid(ramp, geo)
    assert tuple(full.shape) == (100, 90, 130)
    assert torch.allclose(full[0, 0], torch.linspace(0, 1, 130), atol=1e-5)
