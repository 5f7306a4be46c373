"""The deepsegrecon command: parser, models subcommands, phantom, hidden worker, console script."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepsegrecon import cli
from deepsegrecon.files import output_stem
from deepsegrecon.image import Image
from deepsegrecon.results import SegmentationResult

VENV_BIN = Path(sys.executable).parent


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def stores(tmp_path, monkeypatch):
    home, builtin = tmp_path / "home", tmp_path / "builtin"
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(home))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(builtin))
    d = builtin / "teeth" / "shipped"
    d.mkdir(parents=True)
    (d / "w.pt").write_bytes(b"built-in weights")
    (d / "manifest.json").write_text(json.dumps({
        "task": "teeth", "version": "shipped", "default": True, "description": "phantom-trained",
        "files": {"w.pt": hashlib.sha256(b"built-in weights").hexdigest()}}))
    return home / "models", builtin


def test_output_stem(tmp_path):
    assert output_stem("a/scan 1.nii.gz") == "scan 1"
    assert output_stem("cbct.seg.nrrd") == "cbct"
    assert output_stem("Zähne.NRRD") == "Zähne"
    assert output_stem("x.mha") == "x" and output_stem("x.nii") == "x"
    (tmp_path / "DICOM séries").mkdir()
    assert output_stem(tmp_path / "DICOM séries") == "DICOM séries"


def test_help_and_usage_errors(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("phantom", "teeth", "models", "train-teeth-phantoms"):
        assert name in out
    assert "worker" not in out  # hidden
    code, _, err = run(capsys, "teeth")
    assert code == 2 and "INPUT" in err
    code, _, err = run(capsys, "teeth", "x.nrrd", "-o", "out", "--device", "tpu")
    assert code == 2 and "invalid choice" in err


def test_models_subcommands(capsys, stores, tmp_path):
    user, builtin = stores
    weights = tmp_path / "my weights.pt"
    weights.write_bytes(b"user weights")
    sha = hashlib.sha256(b"user weights").hexdigest()

    code, _, err = run(capsys, "models", "import", weights)
    assert code == 2 and "error: " in err and "needs the task" in err
    code, _, err = run(capsys, "models", "import", weights, "--task", "teeth", "--version", "mine", "--sha256", "0" * 64)
    assert code == 3 and "checksum mismatch" in err and not user.exists()
    code, out, _ = run(capsys, "models", "import", weights, "--task", "teeth", "--version", "mine", "--sha256", sha)
    assert code == 0 and "imported teeth mine" in out
    assert (user / "teeth" / "mine" / "my weights.pt").read_bytes() == b"user weights"
    code, _, err = run(capsys, "models", "import", "--url", "http://127.0.0.1:9/x.pt", "--task", "teeth")
    assert code == 2 and "--sha256" in err
    code, _, err = run(capsys, "models", "import", weights, "--url", "http://127.0.0.1:9/x.pt")
    assert code == 2 and "either a PATH or --url" in err

    code, out, _ = run(capsys, "models", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TASK", "VERSION", "DEFAULT", "SOURCE"]
    shipped = next(line for line in lines if "shipped" in line).split()
    assert shipped[:4] == ["teeth", "shipped", "*", "built-in"]  # the manifest-declared default
    assert next(line for line in lines if " mine " in line).split()[:3] == ["teeth", "mine", "user"]
    code, out, _ = run(capsys, "models", "list", "--task", "brain")
    assert code == 0 and "no models installed for task brain" in out

    code, out, _ = run(capsys, "models", "verify")
    assert code == 0 and "ok      teeth mine" in out and "ok      teeth shipped (built-in)" in out
    (builtin / "teeth" / "shipped" / "w.pt").write_bytes(b"tampered")
    code, out, err = run(capsys, "models", "verify", "teeth")
    assert code == 3 and "FAILED  teeth shipped (built-in): checksum mismatch for w.pt" in out
    assert "1 of 2 model versions failed" in err
    code, out, _ = run(capsys, "models", "verify", "teeth", "mine")
    assert code == 0 and out.strip() == "ok      teeth mine"
    code, _, err = run(capsys, "models", "verify", "teeth", "v9")
    assert code == 3 and "no model version 'v9'" in err and "mine, shipped" in err

    code, _, err = run(capsys, "models", "remove", "teeth", "shipped")
    assert code == 3 and "built in" in err and (builtin / "teeth" / "shipped" / "w.pt").exists()
    code, out, _ = run(capsys, "models", "remove", "teeth", "mine")
    assert code == 0 and "removed teeth mine" in out and not (user / "teeth").exists()


def test_phantom_teeth(capsys, tmp_path):
    pytest.importorskip("deepsegrecon.teeth.phantom")
    out = tmp_path / "phantom out"
    code, stdout, err = run(capsys, "phantom", "teeth", "--seed", 3, "--shape", 48, 40, 32, "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cbct.nrrd", "labels.seg.nrrd"]
    from deepsegrecon.io import read_image

    img = read_image(out / "cbct.nrrd")
    assert img.size == (48, 40, 32)
    assert "missing teeth" in stdout
    code, _, err = run(capsys, "phantom", "teeth", "--seed", 3, "--shape", 4, 40, 32, "-o", tmp_path / "bad")
    assert code == 2 and "error: " in err


def test_hidden_worker_subcommand(capsys, tmp_path):
    from deepsegrecon import worker
    from deepsegrecon.image import Image

    img = Image(np.random.default_rng(1).normal(size=(9, 9, 9)).astype(np.float32))
    job = worker.create_job("no_such_task", {"image": img}, {"device": "cpu"}, job_root=tmp_path)
    code, _, err = run(capsys, "worker", job)
    assert code == 2 and "unknown task 'no_such_task'" in err
    last = json.loads((job / "progress.jsonl").read_text().splitlines()[-1])
    assert last["state"] == "failed" and last["exit_code"] == 2


def test_console_script_and_module(stores):
    env = dict(os.environ)
    exe = VENV_BIN / "deepsegrecon"
    if not exe.exists():
        pytest.skip("the deepsegrecon console script is not installed in this environment")
    r = subprocess.run([str(exe), "models", "verify", "teeth", "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and r.stderr.startswith("error: task 'teeth' has no model version 'nope'")
    r = subprocess.run([sys.executable, "-m", "deepsegrecon", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("deepsegrecon ")


def _stand_in_teeth(monkeypatch, wrong_grid=False):
    """A small threshold "teeth" task in place of the network (the real one is tested in test_bad_input)."""
    from deepsegrecon.capability import import_task_modules

    import_task_modules()  # the real tasks first, so ours replaces "teeth"
    from deepsegrecon import task as T
    from deepsegrecon.teeth import labels as L

    class StandIn(T.Task):
        name = "teeth"
        inputs = (T.InputSpec("cbct"),)
        stages = {"segment": 1.0}

        def run(self, images, params, ctx):
            img = images["cbct"]
            for i in range(4):
                ctx.step("segment", i / 4)
            lab = np.zeros(img.array.shape, np.uint8)
            lab[img.array > 1500] = 11
            lab[(img.array > 300) & (img.array <= 1500)] = 1
            ctx.step("segment", 1.0)
            if wrong_grid:
                img = Image(lab, spacing=(9, 9, 9))
            return SegmentationResult(img.with_array(lab), L.segment_infos([11, 1]), absent=["tooth_18", "tooth_48"])

    monkeypatch.setitem(T._REGISTRY, "teeth", StandIn)


def test_teeth_command_writes_every_output_or_nothing(capsys, stores, tmp_path, monkeypatch):
    pytest.importorskip("deepsegrecon.teeth.phantom")
    import torch

    from deepsegrecon.store import ModelStore
    from deepsegrecon.teeth.phantom import write_phantom

    w = tmp_path / "net.pt"
    torch.save({"w": torch.zeros(1)}, w)
    ModelStore().import_file(w, task="teeth", version="tiny")
    write_phantom(5, tmp_path / "in", shape=(48, 44, 32))
    src = tmp_path / "in" / "cbct.nrrd"

    _stand_in_teeth(monkeypatch, wrong_grid=True)
    out = tmp_path / "out"
    code, _, err = run(capsys, "teeth", src, "-o", out, "--model", "tiny", "--device", "cpu", "--mrb")
    assert code == 2 and "not on the grid" in err and not out.exists()  # seg.nrrd was staged, then dropped

    _stand_in_teeth(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, "teeth", "in/cbct.nrrd", "-o", "out", "--model", "tiny", "--device", "cpu",
                            "--mrb", "--format", "stl", "obj", "--smoothing", "0.2")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cbct.mrb", "cbct.seg.nrrd", "cbct_models", "cbct_preview.png"]
    models = sorted(p.name for p in (out / "cbct_models").iterdir())
    assert {"tooth_11.stl", "tooth_11.obj", "maxilla.stl", "maxilla.obj"} <= set(models)
    assert "cbct.nrrd: 1 tooth found (FDI): 11" in stdout and "absent teeth: 18 48" in stdout
    assert "other segments: maxilla" in stdout
    assert "model teeth tiny" in err and " 50% segment  ETA" in err and "100% segment" in err


def test_models_average(capsys, stores, tmp_path):
    import torch

    user, _ = stores
    for name, value in (("a", 1.0), ("b", 3.0)):
        path = tmp_path / name / "net.pt"
        path.parent.mkdir()
        torch.save({"w": torch.full((2,), value)}, path)
        code, _, err = run(capsys, "models", "import", path, "--task", "seg", "--version", name)
        assert code == 0, err
    code, out, err = run(capsys, "models", "average", "seg", "a", "b", "--name", "ab", "--weights", "1", "3")
    assert code == 0 and "averaged a, b into seg ab" in out, err
    state = torch.load(user / "seg" / "ab" / "net.pt", weights_only=True)
    assert torch.allclose(state["w"], torch.full((2,), 2.5))
    code, _, err = run(capsys, "models", "average", "seg", "a", "b", "--name", "x", "--weights", "1")
    assert code == 2 and "one positive weight per version" in err and not (user / "seg" / "x").exists()
