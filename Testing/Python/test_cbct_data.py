"""CBCT training data readers and the choice of weights by view count."""

import io
import json
import plistlib
import tarfile

import numpy as np
import pytest
import torch

from deepsegrecon.cbct.data import read_inv3, resample_iso
from deepsegrecon.cbct.geometry import circular_angles
from deepsegrecon.cbct.task import full_circle, model_for
from deepsegrecon.errors import InputError
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


def test_inv3_reader_names_a_bad_file(tmp_path):
    _inv3(tmp_path / "short.inv3", np.zeros((2, 2, 2), np.int16), shape=(3, 2, 2))
    with pytest.raises(InputError, match="header says"):
        read_inv3(tmp_path / "short.inv3")
    (tmp_path / "text.inv3").write_text("not a project")
    with pytest.raises(InputError, match="not a readable InVesalius project"):
        read_inv3(tmp_path / "text.inv3")


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
    from deepsegrecon.worker import model_for_job

    store = _store(tmp_path, [("any", "any", True), ("ten", [10], False)])
    ct = {"ct": Image(np.full((8, 8, 8), -1000.0, np.float32), (2.0, 2.0, 2.0))}
    assert model_for_job("cbct-recon", ct, {"views": 10}, store).version == "ten"
    assert model_for_job("cbct-recon", ct, {"views": 10, "arc_deg": 200.0}, store).version == "any"
    assert model_for_job("cbct-recon", ct, {"views": 6}, store).version == "any"
    assert model_for_job("cbct-recon", ct, {"views": 10, "model": "any"}, store).version == "any"
