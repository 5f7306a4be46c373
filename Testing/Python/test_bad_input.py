"""Bad input through every subcommand (generated inputs): a clear message naming the problem, the right exit
code, nothing written in OUT, the model stores unchanged and no temporary files left anywhere. Faults while
running (disk full, out of memory, SIGTERM) map to exit 5 / 4 and leave nothing behind. Paths with spaces and
non-ASCII work."""

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from deepsegrecon import cli
from deepsegrecon.image import Image
from deepsegrecon.io import write_image
from deepsegrecon.results import SegmentationResult

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


# ------------------------------------------------------------------------------------ every subcommand
UID_A, UID_B = "1.2.826.0.1.3680043.99.2.1", "1.2.826.0.1.3680043.99.2.2"
SETS = ["--set", "patch_size=[16,16,16]", "--set", "batch_size=1", "--set", "samples_per_case=1",
        "--set", "iterations_per_epoch=1"]


def _nhdr(folder: Path, name: str, directions: str) -> Path:
    RNG.normal(size=(10, 10, 10)).astype(np.float32).tofile(folder / "v.raw")
    (folder / name).write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n"
                               "endian: little\nspace: left-posterior-superior\n"
                               f"space directions: {directions}\nspace origin: (0,0,0)\ndata file: v.raw\n")
    return folder / name


def _dicom_series(folder: Path, uid: str, description: str, n: int) -> None:
    import SimpleITK as sitk

    folder.mkdir(exist_ok=True)
    for k in range(n):
        sl = sitk.GetImageFromArray(RNG.integers(-1000, 2000, size=(1, 16, 16)).astype(np.int16))
        sl.SetSpacing((0.5, 0.5, 1.0))
        sl.SetOrigin((0.0, 0.0, float(k)))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.99.1"), ("0020|000e", uid),
                           ("0008|103e", description), ("0020|0013", str(k + 1)), ("0020|0032", f"0\\0\\{k}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0008|0018", f"{uid}.{k + 1}")):
            sl.SetMetaData(tag, value)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"{uid[-1]}_{k:02d}.dcm"))
        w.Execute(sl)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Every bad (and good) input the table below uses, written once."""
    import SimpleITK as sitk

    from deepsegrecon.training.cases import write_case

    d = tmp_path_factory.mktemp("made inputs")
    p = {"good": write_image(GOOD, d / "good.nrrd"),
         "2d": write_image(Image(RNG.normal(size=(32, 32)).astype(np.float32)), d / "slice.nrrd"),
         "zero": _nhdr(d, "zero spacing.nhdr", "(0,0,0) (0,1,0) (0,0,1)"),
         "sheared": _nhdr(d, "sheared.nhdr", "(1,0,0) (0.5,1,0) (0,0,1)"),
         "xray": write_image(Image(RNG.normal(size=(20, 20)).astype(np.float32)), d / "xray.nrrd"),
         "dicom": d / "two series", "cases": d / "cases", "lm": d / "labels.json", "pose": d / "pose.json",
         "label": write_image(GOOD.with_array((GOOD.array > 1).astype(np.uint8)), d / "label.nrrd")}
    sitk.WriteImage(sitk.GetImageFromArray(RNG.normal(size=(3, 10, 10, 10)).astype(np.float32), isVector=False),
                    str(d / "four-d.nrrd"))
    p["4d"] = d / "four-d.nrrd"
    _dicom_series(p["dicom"], UID_A, "axial soft tissue", 8)
    _dicom_series(p["dicom"], UID_B, "axial bone", 9)
    p["one"] = d / "one series"
    _dicom_series(p["one"], UID_B + ".7", "", 8)
    for i in range(2):
        lab = np.zeros((16, 16, 16), np.uint8)
        lab[4:10, 4:10, 4:10] = 1
        img = Image(RNG.normal(size=(16, 16, 16)).astype(np.float32))
        write_case(p["cases"] / f"c{i}", {"image": img}, img.with_array(lab), {"blob": 1})
    p["lm"].write_text(json.dumps({"blob": 1}))
    p["pose"].write_text(json.dumps({"parameterization": "euler_angles", "convention": "ZXY",
                                     "rotation": [0, 0, 0], "translation": [0, 0, 0]}))
    return p


def _tree(*folders) -> dict:
    return {str(f): sorted((str(p.relative_to(f)), p.stat().st_size if p.is_file() else -1) for p in f.rglob("*"))
            for f in folders if f.exists()}


def _refused(capsys, env, argv, code, messages, inputs=()):
    """Run the CLI; it must exit ``code`` with one ``error:`` line holding every message, and leave OUT, the
    temp folder, the model stores and the inputs exactly as they were."""
    homes = [env["root"] / "home", env["builtin"]]
    before = (_tree(*homes), _tree(*inputs), _state(env["out"]))
    tmp_before = sorted(env["tmp"].iterdir())  # empty, but for torch's own cache after a setup run
    got = cli.main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert got == code, err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    assert all(m in err for m in messages), err
    assert (_tree(*homes), _tree(*inputs), _state(env["out"])) == before, "a refused run changed something"
    assert sorted(env["tmp"].iterdir()) == tmp_before, "temporary files were left behind"
    return err


TABLE = [  # (id, argv (with {placeholders}), exit code, messages)
    ("teeth 4-D", "teeth {4d} -o {out}", 2, ["four-d.nrrd is 4-D (size 10 x 10 x 10 x 3)"]),
    ("teeth zero spacing", "teeth {zero} -o {out}", 2, ["spacing is zero or invalid (0, 1, 1 mm)"]),
    ("teeth sheared", "teeth {sheared} -o {out}", 2, ["direction matrix is not orthonormal", "[1 0.4472 0; 0 0.8944"]),
    ("teeth DICOM series", "teeth {dicom} -o {out}", 2,
     ["holds 2 DICOM series; choose one with --series UID", f"{UID_A}  axial soft tissue  (8 files)",
      f"{UID_B}  axial bone  (9 files)"]),
    ("teeth unknown series", "teeth {dicom} -o {out} --series 9.9.9", 2, ["holds no series 9.9.9", UID_A]),
    ("teeth series of a file", f"teeth {{good}} -o {{out}} --series {UID_A}", 2, ["no input DICOM folder holds"]),
    ("teeth series chosen", f"teeth {{dicom}} -o {{out}} --series {UID_B}", 3, ["no model for task 'teeth'"]),
    ("brain 4-D", "brain-tumor --flair {4d} --t1c {good} -o {out}", 2, ["is 4-D"]),
    ("brain one input", "brain-tumor --flair {good} -o {out}", 2, ["at least two MRI inputs"]),
    ("brain DICOM series", "brain-tumor --flair {dicom} --t1c {good} -o {out}", 2, ["holds 2 DICOM series"]),
    ("brain series chosen", f"brain-tumor --flair {{dicom}} --t1c {{one}} --series {UID_A} -o {{out}}", 3,
     ["no model for task 'brain-tumor'"]),
    ("brain series nowhere", "brain-tumor --flair {one} --t1c {good} --series 9.9.9 -o {out}", 2,
     ["--series 9.9.9: no input DICOM folder holds this series"]),
    ("slices 2-D", "slices {2d} -o {out}", 2, ["is 2-D (shape (32, 32))"]),
    ("slices batch 0", "slices {good} -o {out} --batch 0", 2, ["--batch must be 1 or more"]),
    ("slices sheared", "slices {sheared} -o {out}", 2, ["not orthonormal"]),
    ("cbct 2-D CT", "cbct-recon --simulate-from {2d} --views 4 -o {out}", 2, ["CT is 2-D"]),
    ("cbct 4-D CT", "cbct-recon --simulate-from {4d} --views 4 -o {out}", 2, ["is 4-D"]),
    ("cbct photons -5", "cbct-recon --simulate-from {good} --views 4 --photons -5 -o {out}", 2,
     ["photons must be a finite number above 0, got -5.0"]),
    ("cbct photons 0", "cbct-recon --simulate-from {good} --views 4 --photons 0 -o {out}", 2,
     ["photons must be a finite number above 0, got 0.0"]),
    ("cbct photons nan", "cbct-recon --simulate-from {good} --views 4 --photons nan -o {out}", 2,
     ["photons must be a finite number above 0, got nan"]),
    ("cbct no views", "cbct-recon --simulate-from {good} -o {out}", 2, ["--simulate-from needs --views N"]),
    ("xray missing", "xray-register --ct {good} --xray {root}/none.dcm -o {out}", 2, ["none.dcm does not exist"]),
    ("xray 4-D CT", "xray-register --ct {4d} --xray {xray} --pixel-spacing 1 -o {out}", 2, ["is 4-D"]),
    ("drr no pose", "drr --ct {good} --pose {root}/none.json -o {out}", 2, ["pose file", "does not exist"]),
    ("drr zero spacing", "drr --ct {zero} --pose {pose} -o {out}", 2, ["spacing is zero or invalid"]),
    ("train unknown setting", "train blob --cases {cases} --label-map {lm} --set lr=1", 2,
     ["unknown training setting 'lr'; allowed: epochs, minutes,", "learning_rate"]),
    ("train wrong type", "train blob --cases {cases} --label-map {lm} --set learning_rate=abc", 2,
     ["training setting 'learning_rate' must be a finite number, got 'abc'; allowed keys: epochs"]),
    ("train patch size", "train blob --cases {cases} --label-map {lm} --set patch_size=5", 2,
     ["'patch_size' must be a list of whole numbers, got 5"]),
    ("train part setting", "train blob --cases {cases} --label-map {lm} --set model.amp=1", 2,
     ["'model.amp' must be true or false, got 1"]),
    ("train no cases", "train blob --cases {root}/nowhere --label-map {lm}", 2, ["does not exist or is not a folder"]),
    ("train zero minutes", "train blob --cases {cases} --label-map {lm} --minutes 0", 2, ["must be positive"]),
    ("finetune no base", "finetune blob --cases {cases} --base nope --name n1 --label-map {lm}", 3, ["blob"]),
    ("models remove", "models remove teeth nope", 3, ["teeth"]),
    ("models import", "models import {root}/none.pt --task teeth --version v1", 2, ["none.pt does not exist"]),
    ("add-case 4-D", "add-case blob --image image={4d} --label {label} --label-map {lm} -o {root}/case", 2, ["is 4-D"]),
    ("add-case DICOM series", "add-case blob --image image={dicom} --label {label} --label-map {lm} -o {root}/case", 2,
     ["holds 2 DICOM series"]),
    ("add-case zero spacing", "add-case blob --image image={good} --label {zero} --label-map {lm} -o {root}/case", 2,
     ["spacing is zero or invalid"]),
]


@pytest.mark.parametrize("case, argv, code, messages", TABLE, ids=[t[0] for t in TABLE])
def test_every_subcommand_refuses_bad_input(capsys, env, made, case, argv, code, messages):
    import shlex

    words = [w.format(**made, out=env["out"], root=env["root"]) for w in shlex.split(argv)]
    if words[0] in ("teeth", "brain-tumor", "slices", "cbct-recon", "train", "finetune"):
        words += ["--device", "cpu"]
    if words[0] in ("train", "finetune"):
        given = {w.split("=")[0] for w in words}
        words += [w for i, w in enumerate(SETS) if SETS[i | 1].split("=")[0] not in given]  # the case's own wins
        words += [] if "--minutes" in words else ["--epochs", "1"]
    _refused(capsys, env, words, code, messages, inputs=[made["cases"], made["dicom"]])
    assert not (env["root"] / "case").exists()


# ------------------------------------------------------------------------------------ faults while running
def _fake_teeth(monkeypatch, env, run=None):
    """A tiny teeth model in the user store and a stand-in task (``run`` replaces its body); the surface export
    and the preview are stubbed so that a whole run takes a moment."""
    import torch

    from deepsegrecon.capability import import_task_modules

    import_task_modules()  # the real tasks first, so ours replaces "teeth"
    from deepsegrecon import preview
    from deepsegrecon import task as T
    from deepsegrecon.scene import export
    from deepsegrecon.store import ModelStore
    from deepsegrecon.teeth import labels as L

    w = env["root"] / "net.pt"
    torch.save({"w": torch.zeros(1)}, w)
    ModelStore().import_file(w, task="teeth", version="tiny")
    w.unlink()

    class StandIn(T.Task):
        name = "teeth"
        inputs = (T.InputSpec("cbct"),)

        def run(self, images, params, ctx):
            if run is not None:
                run()
            img = images["cbct"]
            return SegmentationResult(img.with_array((img.array > 0).astype(np.uint8) * 11), L.segment_infos([11]))

    monkeypatch.setitem(T._REGISTRY, "teeth", StandIn)
    monkeypatch.setattr(export, "export_segmentation_result", lambda *a, **k: {})
    monkeypatch.setattr(preview, "write_preview", lambda image, result, path, **k: Path(path).write_bytes(b"png"))
    return _volume(env, "scan.nrrd", GOOD.array, spacing=GOOD.spacing)


def _writer_fails(monkeypatch, error, after=None):
    from deepsegrecon import segio

    original = segio.write_seg_nrrd

    def write(result, path, **k):
        if after is not None:  # the file is written, then the fault
            original(result, path, **k)
            after()
        raise error

    monkeypatch.setattr(segio, "write_seg_nrrd", write)


def test_disk_full_while_writing_is_a_resource_error(capsys, env, monkeypatch):
    import errno

    scan = _fake_teeth(monkeypatch, env)
    _writer_fails(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(env["out"] / "x.seg.nrrd")))
    err = _refused(capsys, env, ["teeth", scan, "-o", env["out"], "--device", "cpu"], 5,
                   ["the disk is full: could not write", "x.seg.nrrd", "MiB free"])
    assert "Traceback" not in err and not env["out"].exists()

    # quota exceeded, in an output folder that exists already: it keeps only what it had
    env["out"].mkdir()
    (env["out"] / "mine.txt").write_text("kept")
    _writer_fails(monkeypatch, OSError(errno.EDQUOT, "Disk quota exceeded"))
    _refused(capsys, env, ["teeth", scan, "-o", env["out"], "--device", "cpu"], 5, ["the disk is full"])
    assert sorted(p.name for p in env["out"].iterdir()) == ["mine.txt"]


def test_writer_failing_on_a_nearly_full_disk_names_the_disk(capsys, env, monkeypatch):
    """ITK and VTK writers fail with a RuntimeError that does not say why: a full disk is still named."""
    import collections
    import shutil

    scan = _fake_teeth(monkeypatch, env)
    _writer_fails(monkeypatch, RuntimeError("ITK ERROR: NrrdImageIO: Could not write file"))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    _refused(capsys, env, ["teeth", scan, "-o", env["out"], "--device", "cpu"], 5,
             ["the disk is full", "0 MiB free"])


@pytest.mark.parametrize("error", ["torch", "cpu allocator", "cuda", "python"])
def test_out_of_memory_in_the_network_is_a_resource_error(capsys, env, monkeypatch, error):
    import torch

    made_error = {"torch": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  "cpu allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 8589934592 bytes"),
                  "cuda": RuntimeError("CUDA error: out of memory"), "python": MemoryError()}[error]

    def network():
        raise made_error

    scan = _fake_teeth(monkeypatch, env, run=network)
    err = _refused(capsys, env, ["teeth", scan, "-o", env["out"], "--device", "cpu"], 5,
                   ["teeth: out of memory", "try a smaller image"])
    assert "Traceback" not in err


def test_sigterm_while_writing_cancels_and_leaves_nothing(capsys, env, monkeypatch):
    import os
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    scan = _fake_teeth(monkeypatch, env)
    _writer_fails(monkeypatch, AssertionError("SIGTERM was not handled"),
                  after=lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)))
    _refused(capsys, env, ["teeth", scan, "-o", env["out"], "--device", "cpu"], 4,
             ["error: cancelled (terminated by SIGTERM)"])
    assert not env["out"].exists()
    assert signal.getsignal(signal.SIGTERM) == handler  # the CLI put the handler back


def test_sigterm_during_finetune_cancels_and_removes_the_work_folder(capsys, env, made, monkeypatch):
    import os
    import signal

    base = ["--cases", made["cases"], "--device", "cpu", "--epochs", "1", "--val-fraction", "0.5", *SETS]
    assert cli.main([str(a) for a in ["train", "blob", "--label-map", made["lm"], "--name", "b1", *base]]) == 0
    capsys.readouterr()

    def sigterm(self, event):
        if event.get("stage") == "train":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    monkeypatch.setattr(cli.TrainingProgressPrinter, "__call__", sigterm)
    _refused(capsys, env, ["finetune", "blob", "--base", "b1", "--name", "b2", *base], 4,
             ["cancelled (terminated by SIGTERM)"], inputs=[made["cases"]])
    assert sorted(p.name for p in (env["root"] / "home" / "models" / "blob").iterdir()) == ["b1"]


def test_stale_staging_folders_are_removed_by_the_next_run(capsys, env, monkeypatch):
    import os
    import subprocess
    import sys

    scan = _fake_teeth(monkeypatch, env)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    env["out"].mkdir()
    killed = env["out"] / f".staging-{int(dead.stdout)}-abcd1234"  # a run killed while writing
    alive = env["out"] / f".staging-{os.getppid()}-abcd1234"  # a run still writing (a live process)
    for d in (killed, alive):
        d.mkdir()
        (d / "scan.seg.nrrd").write_bytes(b"partial")
    old = env["out"] / ".staging-q1w2e3r4"  # the older naming, from before this process started
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    code = cli.main(["teeth", str(scan), "-o", str(env["out"]), "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in env["out"].iterdir()) == sorted([alive.name, "scan.seg.nrrd", "scan_preview.png"])
    assert list(env["tmp"].iterdir()) == []


def test_reports_are_valid_json_and_nan_scores_fail_loudly():
    from deepsegrecon.cbct.recon import metrics
    from deepsegrecon.files import json_text

    text = json_text({"psnr_db": float("nan"), "ssim": np.float32(0.5), "list": [np.inf, 1], "n": np.int64(3)})
    assert json.loads(text) == {"psnr_db": None, "ssim": 0.5, "list": [None, 1], "n": 3}
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(TypeError):
        json_text({"x": {1, 2}})  # anything JSON cannot hold fails here, never half-written
    vol = np.zeros((8, 8, 8), np.float32)
    assert metrics(vol, vol)["psnr_db"] == 99.0  # identical volumes
    with pytest.raises(ValueError, match="NaN"):
        metrics(np.full((8, 8, 8), np.nan, np.float32), vol)  # never a made-up 99 dB for an all-NaN volume
