"""CBCT training data readers and the choice of weights by view count."""

import io
import json
import plistlib
import tarfile

import numpy as np
import pytest
import torch

from deepsegrecon.cbct.data import HEAD_CT, resample_iso
from deepsegrecon.cbct.geometry import circular_angles, full_circle
from deepsegrecon.cbct.task import model_for
from deepsegrecon.errors import InputError
from deepsegrecon.io import INV3_DIRECTION, read_image, read_inv3, write_image
from deepsegrecon.store import ModelStore


def _inv3(path, arr, spacing=(0.9, 0.9, 1.5), shape=None):
    info = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(shape or arr.shape)},
            "spacing": list(spacing), "modality": "CT"}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("main.plist", plistlib.dumps(info)), ("matrix.dat", arr.astype("<i2").tobytes())):
            ti = tarfile.TarInfo(f"tmpabc/{name}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


def test_inv3_reader_keeps_voxel_order_and_spacing(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 1000  # (k, j, i)
    _inv3(tmp_path / "head.inv3", arr)
    img = read_inv3(tmp_path / "head.inv3")
    assert np.array_equal(img.array, arr) and img.array.dtype == np.float32
    assert np.allclose(img.spacing, (0.9, 0.9, 1.5))
    iso = resample_iso(img)
    assert np.allclose(iso.spacing, 2.0) and iso.array.shape == (2, 2, 2)  # 4.5 x 3.6 x 4.5 mm at 2 mm


def test_inv3_geometry(tmp_path):
    """read_image reads a .inv3 too: voxel order kept, spacing (i, j, k) from the plist, rows posterior -> anterior
    (direction diag(1, -1, 1)), slices from the feet up; the geometry survives a NRRD round trip."""
    arr = np.full((4, 6, 5), -1000, np.int16)  # (k, j, i)
    arr[0, 5, 2] = 2000  # lowest slice, last row: a front tooth
    arr[3, 0, 2] = 500  # top slice, first row: the back of the head
    _inv3(tmp_path / "head.inv3", arr, spacing=(0.5, 0.75, 1.5))
    img = read_image(tmp_path / "head.inv3")
    import deepsegrecon.cbct.data as data

    assert data.read_inv3 is read_inv3  # the CBCT training data uses the shared reader
    assert np.array_equal(img.array, arr) and img.array.shape == (4, 6, 5)
    assert np.allclose(img.spacing, (0.5, 0.75, 1.5)) and np.allclose(img.origin, 0.0)
    assert np.array_equal(img.direction, np.diag([1.0, -1.0, 1.0])) and np.array_equal(img.direction, INV3_DIRECTION)
    tooth, back = img.physical_points(np.array([[2, 5, 0], [2, 0, 3]]))  # (i, j, k)
    assert np.allclose(tooth, (1.0, -3.75, 0.0)) and np.allclose(back, (1.0, 0.0, 4.5))
    assert tooth[1] < back[1] and tooth[2] < back[2]  # LPS: the tooth is anterior (smaller y) and inferior
    write_image(img, tmp_path / "head.nrrd")
    again = read_image(tmp_path / "head.nrrd")
    assert again.same_grid(img) and np.array_equal(again.array, arr)


def test_inv3_reader_names_a_bad_file(tmp_path):
    _inv3(tmp_path / "short.inv3", np.zeros((2, 2, 2), np.int16), shape=(3, 2, 2))
    with pytest.raises(InputError, match="header says"):
        read_inv3(tmp_path / "short.inv3")
    (tmp_path / "text.inv3").write_text("not a project")
    with pytest.raises(InputError, match="not a readable InVesalius project"):
        read_image(tmp_path / "text.inv3")
    _inv3(tmp_path / "flat.inv3", np.zeros((2, 2, 2), np.int16), spacing=(0.9, 0.0, 1.5))
    with pytest.raises(InputError, match="spacing is zero"):
        read_image(tmp_path / "flat.inv3")
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.inv3")


@pytest.mark.skipif(not HEAD_CT.is_file(), reason=f"{HEAD_CT} is missing: apt-get install invesalius-examples "
                    "(make test installs it when it can)")
def test_cranium_inv3_face_is_anterior():
    """Debian's Cranium.inv3 read as LPS: the teeth (brightest voxels of the lowest slices) lie in front of the
    middle of the head and in its lowest 20 mm."""
    img = read_image(HEAD_CT)
    assert img.array.shape == (108, 256, 256) and np.allclose(img.spacing, (0.957031, 0.957031, 1.5), atol=1e-5)
    head = np.argwhere(img.array > -300)[:, ::-1]  # (i, j, k)
    teeth = np.argwhere(img.array[:8] > 1800)[:, ::-1]
    y_head, y_teeth = img.physical_points(head)[:, 1], img.physical_points(teeth)[:, 1]
    middle = (y_head.min() + y_head.max()) / 2
    assert len(teeth) > 500 and np.all(y_teeth < middle)  # LPS: anterior = smaller y


def test_full_circle():
    assert full_circle(circular_angles(10)) and full_circle([(a + 33) % 360 for a in circular_angles(7)])
    assert not full_circle(circular_angles(10, 180.0)) and not full_circle([0.0, 10.0, 20.0])


def _store(tmp_path, versions) -> ModelStore:
    """A model store of tiny cbct-recon versions: ``versions`` = [(version, input_spec views, default)]."""
    from deepsegrecon.cbct.net import DIFGaussian

    cfg = {"arch": "dif-gaussian", "features": [4, 8, 8, 16], "out_ch": 8, "det_res": 32, "gs_res": 6,
           "decoder": [16, 8, 1]}
    weights = tmp_path / "dif_gaussian.pt"
    torch.save(DIFGaussian(cfg).state_dict(), weights)
    store = ModelStore(root=tmp_path / "store", builtin_root=tmp_path / "none")
    for version, views, default in versions:
        store.write_version("cbct-recon", version, {"dif_gaussian.pt": weights},
                            {"task": "cbct-recon", "network": cfg, "default": default,
                             "input_spec": {"views": views, "arc_deg": 360}})
    return store


def test_weights_chosen_by_view_count(tmp_path):
    store = _store(tmp_path, [("any", "any", True), ("ten", [10], False), ("six-eight", [6, 8], False)])
    assert model_for(store, None, circular_angles(10)).version == "ten"
    assert model_for(store, None, [(a + 17) % 360 for a in circular_angles(8)]).version == "six-eight"
    assert model_for(store, None, circular_angles(7)).version == "any"
    assert model_for(store, None, circular_angles(10, 180.0)).version == "any"  # a short scan: not what "ten" learnt
    assert model_for(store, "six-eight", circular_angles(10)).version == "six-eight"  # asked for by name
    assert json.loads((store.get("cbct-recon", "ten").dir / "manifest.json").read_text())["input_spec"]["views"] == [10]


def test_a_job_gets_the_weights_for_its_view_count(tmp_path):
    from deepsegrecon.image import Image
    from deepsegrecon.runner import model_for_job

    store = _store(tmp_path, [("any", "any", True), ("ten", [10], False)])
    ct = {"ct": Image(np.full((8, 8, 8), -1000.0, np.float32), (2.0, 2.0, 2.0))}
    assert model_for_job("cbct-recon", ct, {"views": 10}, store).version == "ten"
    assert model_for_job("cbct-recon", ct, {"views": 10, "arc_deg": 200.0}, store).version == "any"
    assert model_for_job("cbct-recon", ct, {"views": 6}, store).version == "any"
    assert model_for_job("cbct-recon", ct, {"views": 10, "model": "any"}, store).version == "any"
