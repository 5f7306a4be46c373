"""cbct-recon task and CLI: outputs on the CT grid, projection folders round trip, bad input writes nothing."""

import json

import numpy as np
import pytest
import torch

from deepsegrecon import cli
from deepsegrecon.cbct.geometry import ConeGeometry, geometry_for_grid
from deepsegrecon.cbct.net import DIFGaussian
from deepsegrecon.cbct.projio import read_projections
from deepsegrecon.image import Image
from deepsegrecon.io import read_image, write_image

TINY = {"features": [4, 8, 8, 16], "out_ch": 8, "det_res": 32, "gs_res": 6, "decoder": [16, 8, 1]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    """An untrained tiny DIF-Gaussian version in an empty user store (the task, not the weights, is tested)."""
    from deepsegrecon.cbct.net import default_network
    from deepsegrecon.cbct.train import write_version

    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    torch.manual_seed(0)
    cfg = {**default_network(), **TINY}
    write_version(DIFGaussian(cfg), cfg, [], 0, None, "tiny", 0, 0)
    return "tiny"


@pytest.fixture
def ct(oblique_image, tmp_path):
    """HU phantom on an oblique, anisotropic grid (an ellipsoid body with a denser insert)."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (18, 22, 26)], indexing="ij")
    hu = np.where((i / 0.8) ** 2 + (j / 0.7) ** 2 + (k / 0.9) ** 2 < 1, 0.0, -1000.0)
    hu[(i - 0.2) ** 2 + (j + 0.1) ** 2 + k ** 2 < 0.06] = 800.0
    img = Image(hu.astype(np.float32), (1.1, 0.9, 1.4), (-12.5, 33.25, 101.0), oblique_image.direction)
    path = write_image(img, tmp_path / "ct.nrrd")
    return img, path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def with_refiner(tmp_path, tiny_model):
    """The shipped SART refiner (cbct-recon v4) in the test's built-in store."""
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[3] / "Resources" / "Models" / "cbct-recon" / "v4"
    shutil.copytree(src, tmp_path / "builtin" / "cbct-recon" / "v4")
    return tiny_model


def test_simulate_then_reconstruct_from_the_saved_projections(capsys, tmp_path, with_refiner, ct):
    img, path = ct
    code, out, err = run(capsys, "cbct-recon", "--simulate-from", path, "--views", 8, "--detector", 40,
                         "-o", tmp_path / "sim", "--device", "cpu")
    assert code == 0, err
    sim = tmp_path / "sim"
    m = json.loads((sim / "metrics.json").read_text())
    default = m["method"].replace("-", "_")
    others = {"dif_gaussian", "sart", "cg", "admm_tv", "sart_unet"} - {default}
    assert sorted(p.name for p in sim.iterdir()) == sorted(["fdk.nrrd", "metrics.json", "preview.png", "projections",
                                                            "recon.nrrd"] + [f"{k}.nrrd" for k in others])
    assert m["backend"] == "rtk" and set(m["metrics"]) >= {"fdk", "sart", "cg", "admm_tv", "dif_gaussian", "sart_unet"}
    assert m["method"] == "sart-unet" and m["refiner_model"] == "v4"  # the default: SART + refiner
    assert all(f"{k}_s" in m["timings_s"] for k in others | {default, "fdk"})
    assert f"backend: rtk, method: {m['method']}" in out
    recon, fdk = read_image(sim / "recon.nrrd"), read_image(sim / "fdk.nrrd")
    assert recon.same_grid(img) and fdk.same_grid(img)  # oblique direction, anisotropic spacing kept
    assert m["views"] == 8 and m["simulated"] and m["model"] == "tiny"
    for key in ("dif_gaussian", "fdk"):
        assert set(m["metrics"][key]) >= {"psnr_db", "ssim"}
    assert 8.0 < m["metrics"]["fdk"]["psnr_db"] < 60.0  # 8 noisy views: FDK is far from perfect, but not noise
    assert "fdk: PSNR" in out and "dif_gaussian_network_only: PSNR" in out
    # the saved folder reconstructs again; FDK of the same projections is the same volume
    stack, geo = read_projections(sim / "projections")
    assert stack.array.shape == (8, 40, 40) and geo.grid_image().same_grid(img)
    code, out, err = run(capsys, "cbct-recon", "--projections", sim / "projections", "--reference", path,
                         "-o", tmp_path / "again", "--device", "cpu", "--compare", "none")
    assert code == 0, err
    again = read_image(tmp_path / "again" / "fdk.nrrd")
    assert again.same_grid(img) and np.abs(again.array - fdk.array).max() < 1.0  # HU
    m2 = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert m2["metrics"]["fdk"]["psnr_db"] == pytest.approx(m["metrics"]["fdk"]["psnr_db"], abs=0.05)
    assert not m2["simulated"]


def test_fdk_improves_with_views_and_without_noise(tiny_model, ct):
    from deepsegrecon.runner import run_inline

    img, _ = ct
    psnr = {}
    for views, noise in ((6, True), (60, True), (60, False)):
        r = run_inline("cbct-recon", {"ct": img}, {"views": views, "detector": 40, "noise": noise, "device": "cpu",
                                                   "method": "fdk", "compare": [], "filter": "ram-lak"})
        psnr[(views, noise)] = r.report["metrics"]["fdk"]["psnr_db"]
        assert r.volumes["recon"].same_grid(img)
    assert psnr[(60, True)] > psnr[(6, True)] + 3
    assert psnr[(60, False)] >= psnr[(60, True)]


def test_data_consistency_steps_are_reported_and_can_be_turned_off(tiny_model, ct):
    from deepsegrecon.cbct.methods import DC
    from deepsegrecon.errors import InputError
    from deepsegrecon.runner import run_inline

    img, _ = ct
    params = {"views": 8, "detector": 40, "device": "cpu", "method": "dif-gaussian", "compare": []}
    full = run_inline("cbct-recon", {"ct": img}, params)
    plain = run_inline("cbct-recon", {"ct": img}, {**params, "refine_iters": 0})
    assert full.report["refine_iters"] == DC["iters"] and plain.report["refine_iters"] == 0
    assert full.report["methods"] == ["dif-gaussian", "fdk"] and DC["solver"] in full.report["data_consistency"]
    m = full.report["metrics"]
    assert "dif_gaussian_network_only" in m and "dif_gaussian_network_only" not in plain.report["metrics"]
    assert m["dif_gaussian_network_only"] == plain.report["metrics"]["dif_gaussian"]  # the same network output
    # an untrained network is far off: the steps pull it towards the measured projections
    assert m["dif_gaussian"]["psnr_db"] > m["dif_gaussian_network_only"]["psnr_db"] + 3
    assert full.volumes["recon"].same_grid(img) and "dif_gaussian_s" in full.report["timings_s"]
    for bad in (-1, 2.5, True, 99):
        with pytest.raises(InputError, match="refine_iters"):
            run_inline("cbct-recon", {"ct": img}, {**params, "refine_iters": bad})


def _projection_folder(tmp_path, ct, views=6, det=24):
    img, _ = ct
    geo = geometry_for_grid(img, views, detector=det)
    folder = tmp_path / "proj"
    folder.mkdir()
    geo.save(folder / "geometry.json")
    for n in range(views):
        write_image(Image(np.full((det, det), 0.5, np.float32), (1.0, 1.0)), folder / f"view_{n:02d}.nrrd")
    return folder, geo


def _refused(capsys, tmp_path, *argv, match):
    out = tmp_path / "out"
    code, _, err = run(capsys, "cbct-recon", *argv, "-o", out, "--device", "cpu")
    assert code == 2, err
    assert match in err, err
    assert not out.exists()


def test_bad_input_is_refused_and_nothing_is_written(capsys, tmp_path, tiny_model, ct):
    img, path = ct
    folder, geo = _projection_folder(tmp_path, ct)
    # fewer than 2 projections
    for f in sorted(folder.glob("view_*"))[1:]:
        f.unlink()
    _refused(capsys, tmp_path, "--projections", folder, match="at least 2 projections")
    _refused(capsys, tmp_path, "--simulate-from", path, "--views", 1, match="2 or more")
    # projections of unequal size
    for n in range(1, 6):
        write_image(Image(np.zeros((24, 24 if n != 3 else 20), np.float32)), folder / f"view_{n:02d}.nrrd")
    _refused(capsys, tmp_path, "--projections", folder, match="unequal size")
    write_image(Image(np.zeros((24, 24), np.float32)), folder / "view_03.nrrd")
    # geometry JSON missing a field; source inside the volume
    d = geo.to_dict()
    del d["dso"]
    (folder / "geometry.json").write_text(json.dumps(d))
    _refused(capsys, tmp_path, "--projections", folder, match="missing the field dso")
    d = geo.to_dict()
    d["dso"], d["dsd"] = 5.0, 50.0
    (folder / "geometry.json").write_text(json.dumps(d))
    _refused(capsys, tmp_path, "--projections", folder, match="inside the volume")
    # a reference of another geometry
    geo.save(folder / "geometry.json")
    other = Image(img.array, (1.0, 0.9, 1.4), img.origin, img.direction)
    write_image(other, tmp_path / "other.nrrd")
    _refused(capsys, tmp_path, "--projections", folder, "--reference", tmp_path / "other.nrrd",
             match="reference has another geometry")
    _refused(capsys, tmp_path, "--simulate-from", path, "--views", 6, "--reference", tmp_path / "other.nrrd",
             match="reference has another geometry")
    # a detector that does not match the geometry
    d = geo.to_dict()
    d["detector_shape"] = [24, 30]
    (folder / "geometry.json").write_text(json.dumps(d))
    _refused(capsys, tmp_path, "--projections", folder, match="detector is 24 x 30")
    # with a good folder it runs, but not with a negative number of data-consistency steps
    geo.save(folder / "geometry.json")
    _refused(capsys, tmp_path, "--projections", folder, "--refine-iters", -1, match="refine_iters must be")
    code, _, err = run(capsys, "cbct-recon", "--projections", folder, "-o", tmp_path / "ok", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["metrics"] is None


def test_geometry_json_of_a_stack_volume_and_task_validation(tiny_model, ct):
    from deepsegrecon.errors import InputError
    from deepsegrecon.task import get_task

    img, _ = ct
    task = get_task("cbct-recon")
    with pytest.raises(InputError, match="either a projection stack"):
        task.validate({"ct": img, "projections": img}, task.default_params())
    with pytest.raises(InputError, match="need a geometry"):
        task.validate({"projections": Image(np.zeros((4, 8, 8), np.float32))}, task.default_params())
    d = ConeGeometry.from_dict(json.loads(json.dumps(geometry_for_grid(img, 4, detector=8).to_dict())))
    with pytest.raises(InputError, match="lists 4 angles"):
        task.validate({"projections": Image(np.zeros((5, 8, 8), np.float32))},
                      {**task.default_params(), "geometry": d.to_dict()})


def test_methods_and_the_torch_fallback(tiny_model, ct, monkeypatch):
    from deepsegrecon.cbct import rtk_backend
    from deepsegrecon.errors import InputError
    from deepsegrecon.runner import run_inline

    img, _ = ct
    params = {"views": 8, "detector": 40, "device": "cpu", "compare": []}
    r = run_inline("cbct-recon", {"ct": img}, {**params, "method": "sart"})
    assert r.report["backend"] == "rtk" and r.report["methods"] == ["fdk", "sart"]
    assert set(r.volumes) == {"recon", "fdk"} and r.report["metrics"]["sart"]["psnr_db"] > \
        r.report["metrics"]["fdk"]["psnr_db"]
    with pytest.raises(InputError, match="unknown method"):
        run_inline("cbct-recon", {"ct": img}, {**params, "method": "art"})
    monkeypatch.setattr(rtk_backend, "rtk", None)  # RTK absent: torch runs and says so
    r = run_inline("cbct-recon", {"ct": img}, {**params, "method": "cg", "compare": ["sart"]})
    assert r.report["backend"] == "torch" and r.report["methods"] == ["fdk", "cg"]
    assert r.report["skipped"] == ["sart (needs itk-rtk; backend torch)"]
    assert r.report["metrics"]["cg"]["psnr_db"] > r.report["metrics"]["fdk"]["psnr_db"]
    with pytest.raises(InputError, match="needs itk-rtk"):
        run_inline("cbct-recon", {"ct": img}, {**params, "method": "sart"})
