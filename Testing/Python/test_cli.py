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
    assert cli.output_stem("a/scan 1.nii.gz") == "scan 1"
    assert cli.output_stem("cbct.seg.nrrd") == "cbct"
    assert cli.output_stem("Zähne.NRRD") == "Zähne"
    assert cli.output_stem("x.mha") == "x" and cli.output_stem("x.nii") == "x"
    (tmp_path / "DICOM séries").mkdir()
    assert cli.output_stem(tmp_path / "DICOM séries") == "DICOM séries"


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
