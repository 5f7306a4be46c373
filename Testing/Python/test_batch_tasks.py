"""Batch adapters of the other tasks: Register X-ray from a CSV of CT / X-ray pairs (the CT read once, its pose
regressor trained for the first X-ray and reused for the next)."""

import json

import pytest

from xray_testdata import landmarks, small_ct

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--set", "train_steps=1", "--set", "size=64", "--set", "ct_spacing_mm=0", "--set", "levels=[[32,60],[64,40]]"]


def test_xray_batch_reuses_the_ct_and_its_regressor(tmp_path, monkeypatch):
    from deepsegrecon import batch, io
    from deepsegrecon.cli import main

    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    ct = small_ct()
    io.write_image(ct, tmp_path / "ct.nrrd")
    (tmp_path / "landmarks.json").write_text(json.dumps(landmarks(ct).tolist()))
    rows = ["case,ct,xray,truth_pose,landmarks"]
    for n, rot in enumerate([(0.06, -0.04, 0.05), (-0.05, 0.03, 0.02)]):
        pose = {"parameterization": "euler_angles", "convention": "ZXY", "rotation": list(rot),
                "translation": [8.0, 858.0, -6.0]}
        (tmp_path / f"truth{n}.json").write_text(json.dumps(pose))
        assert main(["drr", "--ct", str(tmp_path / "ct.nrrd"), "--pose", str(tmp_path / f"truth{n}.json"),
                     "-o", str(tmp_path / f"drr{n}"), "--size", "64", "64", "--pixel-spacing", "4.5"]) == 0
        rows.append(f"view{n},ct.nrrd,drr{n}/drr.nrrd,truth{n}.json,landmarks.json")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    reads = []
    original = io.read_image
    monkeypatch.setattr(io, "read_image", lambda p, *a, **k: reads.append(str(p)) or original(p, *a, **k))
    out = tmp_path / "out"
    assert main(["batch", "xray-register", str(tmp_path / "pairs.csv"), "-o", str(out), *FAST]) == 0
    assert [r for r in reads if r.endswith("ct.nrrd")] == [str((tmp_path / "ct.nrrd").resolve())]  # CT read once
    reports = [json.loads((out / f"view{n}" / "report.json").read_text()) for n in (0, 1)]
    assert reports[0]["regressor"].startswith("trained now") and reports[1]["regressor"] == "from the model store"
    assert all(r["mtre_mm"] < 3.0 and r["ncc"] > 0.8 for r in reports), reports
    assert sorted(p.name for p in (out / "view1").iterdir()) == ["case.json", "drr.nrrd", "pose.h5", "report.json"]
    rows = batch.read_csv(out)
    assert [r["status"] for r in rows] == ["done", "done"] and all(r["summary"].startswith("NCC") for r in rows)
    assert main(["batch", "xray-register", str(tmp_path / "pairs.csv"), "-o", str(out), *FAST]) == 0
    assert [r["status"] for r in batch.read_csv(out)] == ["skipped", "skipped"]


@pytest.mark.parametrize("task", ["teeth", "slices", "brain-tumor", "cbct-recon"])
def test_each_network_is_built_once_per_batch(task):
    """Inside a batch a task's ``load_model`` builds the shipped weights once; after it, the task's own again."""
    import inspect
    import sys

    from deepsegrecon.batch import models_loaded_once
    from deepsegrecon.store import ModelStore
    from deepsegrecon.task import get_task

    cls = type(get_task(task))
    module = sys.modules[cls.__module__]
    assert "load_model(" in inspect.getsource(cls.run)  # the task's run goes through the module's loader
    entry = ModelStore().get(getattr(cls, "model_task", None) or task)
    original = module.load_model
    with models_loaded_once(task) as cache:
        first = module.load_model(entry)
        assert module.load_model(entry) is first and len(cache) == 1
    assert module.load_model is original
