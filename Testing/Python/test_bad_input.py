"""Bad input through `deepsegrecon teeth`: a clear message naming the problem, the right exit code,
nothing written in OUT and no temporary files left anywhere. Paths with spaces and non-ASCII work."""

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from deepsegrecon import cli
from deepsegrecon.image import Image
from deepsegrecon.io import write_image

RNG = np.random.default_rng(7)
GOOD = Image(RNG.normal(size=(16, 17, 18)).astype(np.float32), spacing=(0.5, 0.5, 0.6))


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty model stores and a private temp dir (to prove no temp file is left behind)."""
    tmp = tmp_path / "system tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))  # child processes (preview rendering) too
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return {"tmp": tmp, "inputs": inputs, "out": tmp_path / "out", "builtin": tmp_path / "builtin", "root": tmp_path}


def _state(path: Path):
    if path.is_dir():
        return sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    return path.read_bytes() if path.exists() else None


def _teeth(capsys, env, inp, *extra, out=None):
    out = env["out"] if out is None else out
    before, out_before = sorted(p.name for p in env["inputs"].iterdir()), _state(out)
    code = cli.main(["teeth", str(inp), "-o", str(out), "--device", "cpu", *map(str, extra)])
    stdout, stderr = capsys.readouterr()
    if code != 0:
        assert _state(out) == out_before, "a failed run changed OUT"
        assert stderr.count("error: ") == 1 and stderr.rstrip().splitlines()[-1].startswith("error: ")
        assert list(env["tmp"].iterdir()) == [], "temporary files were left behind"
        assert sorted(p.name for p in env["inputs"].iterdir()) == before
    return code, stdout, stderr


def _volume(env, name, array, **kw):
    return write_image(Image(array, **kw), env["inputs"] / name)


def _install(env, task_in_manifest="teeth", data=None, sha=None, version="v1"):
    """A built-in teeth model version whose weights may be corrupt, mismatched or for another task."""
    import torch

    d = env["builtin"] / "teeth" / version
    d.mkdir(parents=True)
    if data is None:
        torch.save({"w": torch.zeros(2)}, d / "net.pt")
        data = (d / "net.pt").read_bytes()
    (d / "net.pt").write_bytes(data)
    (d / "manifest.json").write_text(json.dumps({"task": task_in_manifest, "version": version,
                                                 "files": {"net.pt": sha or hashlib.sha256(data).hexdigest()}}))
    return d


@pytest.mark.parametrize("case, array, code, message", [
    ("2-D image", RNG.normal(size=(64, 64)).astype(np.float32), 2, "is 2-D (shape (64, 64)); a 3-D image is needed"),
    ("constant volume", np.full((12, 12, 12), 7, np.int16), 2, "is constant (every voxel is 7)"),
    ("empty volume", np.zeros((12, 12, 12), np.uint8), 2, "is constant (every voxel is 0)"),
    ("NaN voxels", np.where(RNG.random((12, 12, 12)) < 0.01, np.nan, 1.0).astype(np.float32), 2, "NaN or infinite"),
    ("tiny volume", RNG.normal(size=(3, 40, 40)).astype(np.float32), 2, "too small"),
])
def test_unusable_images_are_refused(capsys, env, case, array, code, message):
    path = _volume(env, f"{case}.nrrd", array)
    got, _, err = _teeth(capsys, env, path)
    assert got == code and message in err and f"input {path.name}" in err


def test_unreadable_files_are_refused(capsys, env):
    good = write_image(GOOD, env["inputs"] / "good.nrrd", compress=False)
    data = good.read_bytes()
    trunc = env["inputs"] / "truncated.nrrd"
    trunc.write_bytes(data[: len(data) // 2])
    code, _, err = _teeth(capsys, env, trunc)
    assert code == 2 and "truncated or corrupt" in err and "truncated.nrrd" in err

    text = env["inputs"] / "report.pdf"
    text.write_text("%PDF-1.4 not an image at all")
    code, _, err = _teeth(capsys, env, text)
    assert code == 2 and "cannot read" in err and "not an image file" in err

    code, _, err = _teeth(capsys, env, env["inputs"] / "missing.nii.gz")
    assert code == 2 and "missing.nii.gz does not exist" in err

    empty_dir = env["inputs"] / "no dicom here"
    empty_dir.mkdir()
    code, _, err = _teeth(capsys, env, empty_dir)
    assert code == 2 and "holds no DICOM series" in err


def test_huge_volume_is_refused_before_allocating(capsys, env):
    hdr = env["inputs"] / "huge.nhdr"
    hdr.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 5000 5000 5000\nencoding: raw\nendian: little\n"
                   "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                   "space origin: (0,0,0)\ndata file: huge.raw\n")
    (env["inputs"] / "huge.raw").write_bytes(b"")
    code, _, err = _teeth(capsys, env, hdr)
    assert code == 5 and "too large" in err and "125,000,000,000 voxels" in err


def test_missing_corrupt_mismatched_and_foreign_weights(capsys, env):
    path = _volume(env, "scan.nrrd", GOOD.array, spacing=GOOD.spacing)
    code, _, err = _teeth(capsys, env, path)
    assert code == 3 and "no model for task 'teeth' is installed" in err

    d = _install(env, data=b"PK\x03\x04 this is not a torch file", version="corrupt")
    code, _, err = _teeth(capsys, env, path, "--model", "corrupt")
    assert code == 3 and "net.pt in model teeth corrupt is corrupt" in err

    d = _install(env, version="mismatch")
    (d / "net.pt").write_bytes((d / "net.pt").read_bytes() + b"\0")
    code, _, err = _teeth(capsys, env, path, "--model", "mismatch")
    assert code == 3 and "checksum mismatch for net.pt in model teeth mismatch" in err

    _install(env, task_in_manifest="brain", version="foreign")
    code, _, err = _teeth(capsys, env, path, "--model", "foreign")
    assert code == 3 and "holds weights for task 'brain', not 'teeth'" in err

    code, _, err = _teeth(capsys, env, path, "--model", "v7")
    assert code == 3 and "no model version 'v7'" in err and "corrupt, foreign, mismatch" in err


def test_output_problems(capsys, env, readonly_dir):
    path = _volume(env, "scan.nrrd", GOOD.array)
    code, _, err = _teeth(capsys, env, path, out=readonly_dir / "results")
    assert code == 2 and "read-only" in err
    assert list(readonly_dir.iterdir()) == []

    a_file = env["root"] / "taken"
    a_file.write_text("a file, not a folder")
    code, _, err = _teeth(capsys, env, path, out=a_file)
    assert code == 2 and "not a folder" in err and a_file.read_text() == "a file, not a folder"

    code, _, err = _teeth(capsys, env, path, "--smoothing", 3)
    assert code == 2 and "--smoothing" in err


def test_unavailable_device_is_an_input_error(capsys, env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    path = _volume(env, "scan.nrrd", GOOD.array)
    before = sorted(p.name for p in env["inputs"].iterdir())
    code = cli.main(["teeth", str(path), "-o", str(env["out"]), "--device", "cuda"])
    _, err = capsys.readouterr()
    assert code == 2 and "no CUDA GPU is available" in err and not env["out"].exists()
    assert sorted(p.name for p in env["inputs"].iterdir()) == before


# ------------------------------------------------------------------------------------ needs the teeth task
def _teeth_ready():
    from deepsegrecon.errors import DeepSegReconError
    from deepsegrecon.store import ModelStore
    from deepsegrecon.task import get_task

    try:
        get_task("teeth")
    except DeepSegReconError as e:
        pytest.skip(f"the teeth task is not available yet: {e}")
    import deepsegrecon.store

    shipped = Path(deepsegrecon.store.__file__).resolve().parents[2] / "Resources" / "Models"  # not the env override
    try:
        return ModelStore(root=shipped / ".no-user-store", builtin_root=shipped).get("teeth")
    except DeepSegReconError as e:
        pytest.skip(f"no shipped teeth weights yet: {e}")


@pytest.mark.slow
def test_paths_with_spaces_and_non_ascii_work(capsys, env, monkeypatch):
    entry = _teeth_ready()
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(entry.dir.parents[1]))
    from deepsegrecon.teeth.phantom import write_phantom

    src = env["root"] / "Patiënt 01 – CBCT"
    write_phantom(11, src, shape=(80, 72, 56))
    scan = src / "mâchoire scan.nrrd"
    (src / "cbct.nrrd").rename(scan)
    out = env["root"] / "résultats é 1"
    monkeypatch.chdir(env["root"])  # relative paths, as typed on a command line
    code, stdout, stderr = _teeth(capsys, env, scan.relative_to(env["root"]), "--mrb", "--format", "stl", "obj",
                                  out=out.relative_to(env["root"]))
    assert code == 0, stderr
    stem = "mâchoire scan"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{stem}.seg.nrrd", f"{stem}_models", f"{stem}.mrb", f"{stem}_preview.png"])
    assert list((out / f"{stem}_models").glob("*.stl")) and list((out / f"{stem}_models").glob("*.obj"))
    assert "found (FDI)" in stdout and "absent teeth" in stdout
    assert "%" in stderr and "ETA" in stderr  # progress lines
    assert list(env["tmp"].iterdir()) == []
    from deepsegrecon.segio import read_seg_nrrd

    seg = read_seg_nrrd(out / f"{stem}.seg.nrrd")
    assert seg.labelmap.array.shape == (56, 72, 80)
