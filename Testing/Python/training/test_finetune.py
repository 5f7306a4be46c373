"""Fine-tuning as a background job (the engine's ``finetune`` task): a tiny teeth fine-tune on two family-B
phantom cases through real worker processes writes a new version with its provenance and leaves the base
untouched; SIGKILL at several points and cancel leave the store exactly as it was; bad input is refused
with a clear message and nothing written; the ``deepsegrecon finetune`` / ``add-case`` commands.

Speed: the base version is a tiny two-stage net (coarse grids, 32-voxel patches), the phantoms are coarse,
and the six worker processes run at the same time (one driver loop kills / cancels them at their points).
"""

import hashlib
import json
import os
import shutil
import signal
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsegrecon import cli, runner, worker
from deepsegrecon.errors import Cancelled, InputError, ModelError
from deepsegrecon.image import Image
from deepsegrecon.io import write_image
from deepsegrecon.progress import ProgressReporter
from deepsegrecon.store import ModelStore
from deepsegrecon.task import CancelToken, TaskContext
from deepsegrecon.teeth import labels as L
from deepsegrecon.training import jobs
from deepsegrecon.training.cases import write_case

BASE = "tiny-base"
SEEDS = (3, 4)  # training seeds (family B); not held out, not used by the shipped weights' evaluation
FAST = {"iterations_per_epoch": 2, "cache_cases": 4, "learning_rate": 3e-3}
KILL_POINTS = ("check", "train", "before-write", "mid-write")

PAUSE_PLUGIN = textwrap.dedent('''
    """Test-only: pause the worker at one point (env DSR_TEST_PAUSE), after writing DSR_TEST_MARKER."""
    import os
    import shutil
    import time
    from pathlib import Path

    POINT, MARKER = os.environ.get("DSR_TEST_PAUSE"), os.environ.get("DSR_TEST_MARKER")


    def _pause(what):
        Path(MARKER).write_text(what)
        time.sleep(600)


    if POINT == "check":  # the first case has been read, the second not yet
        from deepsegrecon.training import cases as _cases

        _load = _cases.Case.load

        def load(self):
            out = _load(self)
            _pause("check")
            return out

        _cases.Case.load = load
    elif POINT == "train":  # stage 1 trained (its files in the work folder), stage 2 after its first epoch
        from deepsegrecon.training import jobs as _jobs

        _sink = _jobs._progress_sink

        def sink_factory(ctx, part, *a, **k):
            inner = _sink(ctx, part, *a, **k)

            def sink(event):
                inner(event)
                if part == "stage2" and event.get("event") == "epoch":
                    _pause("train")
            return sink

        _jobs._progress_sink = sink_factory
    elif POINT == "before-write":  # everything trained and exported, the store not yet touched
        from deepsegrecon import store as _store

        def write_version(self, *a, **k):
            _pause("before-write")

        _store.ModelStore.write_version = write_version
    elif POINT == "mid-write":  # the first weight file copied into the store's staging folder
        _copy = shutil.copyfile

        def copyfile(src, dst, *a, **k):
            out = _copy(src, dst, *a, **k)
            if ".staging-" in str(dst):
                _pause("mid-write")
            return out

        shutil.copyfile = copyfile
''')


# ------------------------------------------------------------------------------------------------ helpers
def tiny_network() -> dict:
    from deepsegrecon.teeth.nets import default_network

    net = default_network()
    net["stage1"].update(channels=[4, 8, 16], strides=[2, 2], roi=[32, 32, 32], spacing_mm=2.0)
    net["stage2"].update(channels=[4, 8, 16], strides=[2, 2], roi=[32, 32, 32], spacing_mm=1.5)
    return net


def tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def work_dirs(tmp: Path) -> list:
    """Training work folders left in a temp folder (torch may keep its own caches there)."""
    return sorted(tmp.glob(jobs.WORK_PREFIX + "*"))


def versions(home: Path) -> dict:
    """{version: manifest} of every visible version, after checking every one verifies."""
    store = ModelStore(root=home / "models", builtin_root=home.parent / "builtin")
    out = {}
    for e in store.list("teeth"):
        store.verify(e)
        out[e.version] = e.manifest
    return out


def phantom_case(folder: Path, seed: int):
    from deepsegrecon.teeth.phantom import generate_teeth_phantom

    cbct, lab, _ = generate_teeth_phantom(seed, spacing=1.6, family="B")
    names = {L.segment_name(int(v)): int(v) for v in np.unique(lab.array) if v}
    return write_case(folder, {"image": cbct}, lab, names, meta={"source": f"phantom B seed {seed}"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two annotated family-B cases and a user store holding the tiny base version."""
    from deepsegrecon.teeth.nets import build_nets, state_dict_fp16

    root = tmp_path_factory.mktemp("finetune world")
    for s in SEEDS:
        phantom_case(root / "cases" / f"case B{s}", s)
    net = tiny_network()
    torch.manual_seed(0)
    n1, n2 = build_nets(net)
    weights = root / "weights"
    weights.mkdir()
    torch.save(state_dict_fp16(n1), weights / "stage1.pt")
    torch.save(state_dict_fp16(n2), weights / "stage2.pt")
    home = root / "home"
    ModelStore(root=home / "models", builtin_root=root / "builtin").write_version(
        "teeth", BASE, {"stage1.pt": weights / "stage1.pt", "stage2.pt": weights / "stage2.pt"},
        {"network": net, "labels": {str(k): v for k, v in L.all_labels().items()}, "default": True,
         "description": "tiny untrained teeth nets for tests"})
    (root / "builtin").mkdir()
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "dsr_pause_plugin.py").write_text(PAUSE_PLUGIN)
    return {"root": root, "cases": root / "cases", "home": home, "plugins": plugins,
            "base_hashes": tree_hashes(home / "models" / "teeth" / BASE)}


def _params(world, name, **kw):
    return {"task": "teeth", "cases": str(world["cases"]), "base": BASE, "name": name, "epochs": 1, "device": "cpu",
            "val_fraction": 0.5, "seed": 0, "settings": dict(FAST), **kw}


@pytest.fixture(scope="module")
def jobs_run(world):
    """Six worker processes at once, each with its own copy of the store: one runs to the end, four are
    SIGKILLed at their pause point, one is cancelled during training. Returns what happened to each."""
    root = world["root"] / "jobs"
    runs = {}
    for kind in ("ok", *KILL_POINTS, "cancel"):
        base = world["root"] / f"run-{kind}"
        shutil.copytree(world["home"], base / "home")
        (base / "builtin").mkdir()
        (base / "tmp").mkdir()
        env = {"DEEPSEGRECON_HOME": str(base / "home"), "DEEPSEGRECON_BUILTIN_MODELS": str(base / "builtin"),
               "TMPDIR": str(base / "tmp"), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(world["plugins"]), os.environ.get("PYTHONPATH")) if p)}
        plugins = [jobs.PLUGIN]
        if kind in KILL_POINTS:
            env.update(DSR_TEST_PAUSE=kind, DSR_TEST_MARKER=str(base / "paused"))
            plugins.append("dsr_pause_plugin")
        job = worker.create_job("finetune", {}, _params(world, f"ft-{kind}"), job_root=root, plugins=plugins)
        runs[kind] = {"dir": base, "home": base / "home", "tmp": base / "tmp", "handle": worker.start_job(job, env=env),
                      "statuses": [], "t0": time.monotonic()}
    end = time.monotonic() + 400
    while time.monotonic() < end:
        pending = 0
        for kind, r in runs.items():
            h = r["handle"]
            if "final" in r:
                continue
            st = h.poll()
            r["statuses"].append(st)
            if st.done:
                r["final"], r["wall_s"] = st, time.monotonic() - r["t0"]
                continue
            pending += 1
            if kind in KILL_POINTS and (r["dir"] / "paused").exists():
                r["killed_at"] = (r["dir"] / "paused").read_text()
                os.killpg(h.pid, signal.SIGKILL)
                h.process.wait(10)
            elif kind == "cancel" and st.stage == "train" and "cancelled" not in r:
                r["cancelled"] = st
                h.cancel(grace=1.5)
        if not pending:
            break
        time.sleep(0.1)
    for r in runs.values():
        if "final" not in r:
            r["handle"].cleanup()
            r["final"] = None
    yield runs
    for r in runs.values():
        r["handle"].cleanup()


# ------------------------------------------------------------------------------------------------ the job
def test_finetune_job_writes_a_new_version_with_provenance(world, jobs_run):
    from deepsegrecon.store import entry_from_dir
    from deepsegrecon.teeth.task import load_model

    r = jobs_run["ok"]
    h, st = r["handle"], r["final"]
    assert st is not None and st.state == "succeeded", (h.job_dir / "worker.log").read_text()[-3000:]
    result = h.result()
    assert result.kind == "model" and result.task == "teeth" and result.version == "ft-ok"

    # progress: checked cases, then per-epoch loss / validation Dice of each stage, in progress.jsonl
    lines = [json.loads(x) for x in (h.job_dir / "progress.jsonl").read_text().splitlines()]
    assert [e["message"] for e in lines if e.get("stage") == "check cases"][1:3] == [
        "checking case case B3 (1/2)", "checking case case B4 (2/2)"]
    epochs = jobs.read_epochs(h.job_dir)
    assert [(e["part"], e["epoch"]) for e in epochs] == [("stage1", 1), ("stage2", 1)]
    assert all(e["loss"] > 0 and 0 <= e["val_dice"] <= 1 and e["eta_s"] is not None for e in epochs)
    fr = [e["fraction"] for e in lines if "fraction" in e and "state" not in e]
    assert fr == sorted(fr) and lines[-1]["state"] == "succeeded"
    assert any(s.extra.get("part") for s in r["statuses"] if s.state == "running") or epochs  # JobStatus.extra

    # the version: both stage files, verified, loadable by the teeth method; provenance in the manifest
    vs = versions(r["home"])
    assert set(vs) == {BASE, "ft-ok"}
    m = vs["ft-ok"]
    assert result.manifest["files"] == m["files"] and set(m["files"]) == {"stage1.pt", "stage2.pt"}
    assert m["base_version"] == BASE and m["task"] == "teeth" and m["created"]
    assert m["network"] == tiny_network() and not m.get("default")
    assert m["trained_on"]["train"] and m["trained_on"]["validation"]
    assert set(m["trained_on"]["case_files_sha256"]) == {"case B3", "case B4"}
    for case, files in m["trained_on"]["case_files_sha256"].items():
        for name, digest in files.items():
            assert hashlib.sha256((world["cases"] / case / name).read_bytes()).hexdigest() == digest
    assert m["training"]["kind"] == "finetune" and m["training"]["parts_trained"] == ["stage1", "stage2"]
    assert m["training"]["parameters"]["base"] == BASE and m["training"]["parameters"]["epochs"] == 1
    assert m["training"]["config"]["stage2"]["flip_axes"] == [] and m["training"]["config"]["stage2"]["learning_rate"] == 3e-3
    assert set(m["metrics"]["parts"]) == {"stage1", "stage2"}
    assert all(0 <= p["best_val_dice"] <= 1 for p in m["metrics"]["parts"].values())
    assert [h_["part"] for h_ in result.history] == ["stage1", "stage2"]
    entry = ModelStore(root=r["home"] / "models", builtin_root=r["dir"] / "builtin").get("teeth", "ft-ok")
    model = load_model(entry_from_dir(entry.dir))  # what TeethTask --model ft-ok loads
    assert model.network == tiny_network()
    for part, net in (("stage1", model.net1), ("stage2", model.net2)):
        info = m["metrics"]["parts"][part]
        assert 0 <= info["base_val_dice"] <= 1 and info["kept_base"] == (info["base_val_dice"] >= info["best_val_dice"])
        base_state = torch.load(r["home"] / "models" / "teeth" / BASE / f"{part}.pt", weights_only=True)
        same = all(torch.equal(base_state[k], v.to(base_state[k].dtype)) for k, v in net.state_dict().items())
        assert same == info["kept_base"]  # fine-tuned weights, unless the base validated at least as well
        assert any(part in n and "kept the base" in n for n in m["training"]["notes"]) == info["kept_base"]

    # the base is byte-identical; nothing left in the temp folder or beside the versions
    assert tree_hashes(r["home"] / "models" / "teeth" / BASE) == world["base_hashes"]
    assert work_dirs(r["tmp"]) == []
    assert sorted(p.name for p in (r["home"] / "models" / "teeth").iterdir()) == sorted([BASE, "ft-ok"])


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_any_point_leaves_the_store_as_it_was(world, jobs_run, point):
    r = jobs_run[point]
    st = r["final"]
    assert r.get("killed_at") == point, (r["handle"].job_dir / "worker.log").read_text()[-3000:]
    assert st.state == "failed" and st.exit_code == -9 and "killed" in st.error
    assert set(versions(r["home"])) == {BASE}  # exactly the versions it had, each verifying
    assert tree_hashes(r["home"] / "models" / "teeth" / BASE) == world["base_hashes"]
    assert not (r["home"] / "models" / "teeth" / f"ft-{point}").exists()
    # a later job removes the work folder the killed one left behind
    left = list(r["tmp"].glob(jobs.WORK_PREFIX + "*"))
    if point != "check":
        assert left, "the killed job's work folder should still be there"
    old = tempfile.tempdir
    tempfile.tempdir = str(r["tmp"])
    try:
        assert sorted(jobs.clean_stale_work_dirs()) == sorted(left)
    finally:
        tempfile.tempdir = old
    assert list(r["tmp"].glob(jobs.WORK_PREFIX + "*")) == []


def test_cancel_during_training_writes_nothing(world, jobs_run):
    r = jobs_run["cancel"]
    st = r["final"]
    assert r.get("cancelled") is not None and st.state == "cancelled" and st.exit_code == 4, \
        (r["handle"].job_dir / "worker.log").read_text()[-3000:]
    with pytest.raises(Cancelled):
        r["handle"].result()
    assert set(versions(r["home"])) == {BASE}
    assert tree_hashes(r["home"] / "models" / "teeth" / BASE) == world["base_hashes"]
    assert sorted(p.name for p in (r["home"] / "models" / "teeth").iterdir()) == [BASE]
    assert work_dirs(r["tmp"]) == []  # the work folder is removed on cancel


# ------------------------------------------------------------------------------------------------ in process
@pytest.fixture
def inproc(world, tmp_path, monkeypatch):
    """This process on the world's store (a copy), one thread, a private temp folder."""
    home = tmp_path / "home"
    shutil.copytree(world["home"], home)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(home))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"home": home, "tmp": tmp, "root": tmp_path}
    torch.set_num_threads(old)


def _case_variant(world, dest: Path, damage) -> Path:
    shutil.copytree(world["cases"], dest)
    damage(dest / "case B4")
    return dest


def _plain_case(folder: Path, image: Image, label: Image):
    folder.mkdir(parents=True)
    write_image(image, folder / "cbct.nrrd")
    write_image(label, folder / "label.nrrd")


def _empty_label(case: Path):
    img = _read(case / "image.nrrd")
    shutil.rmtree(case)
    _plain_case(case, img, img.with_array(np.zeros(img.array.shape, np.uint8)))


def _moved_label(case: Path):
    from deepsegrecon import segio

    img = _read(case / "image.nrrd")
    lab = segio.read_seg_nrrd(case / "label.seg.nrrd").labelmap
    shutil.rmtree(case)
    _plain_case(case, img, Image(lab.array, spacing=tuple(s * 1.1 for s in lab.spacing), origin=lab.origin,
                                 direction=lab.direction))


def _read(path):
    from deepsegrecon.io import read_image

    return read_image(path)


BAD_CASES = {
    "empty label": (_empty_label, InputError, "is empty"),
    "geometry mismatch": (_moved_label, InputError, "does not match the image grid"),
    "missing modality": (lambda c: (c / "image.nrrd").unlink(), InputError, "case 'case B4': case.json names input 'image' 'image.nrrd', which does not exist"),
    "corrupt file": (lambda c: (c / "image.nrrd").write_bytes((c / "image.nrrd").read_bytes()[:400]), InputError,
                     "case 'case B4': modality 'image'"),
}


@pytest.mark.parametrize("what", list(BAD_CASES))
def test_bad_case_refused_and_nothing_written(world, inproc, what):
    damage, error, message = BAD_CASES[what]
    cases = _case_variant(world, inproc["root"] / "cases", damage)
    before = tree_hashes(inproc["home"])
    with pytest.raises(error, match=message):
        runner.run_inline("finetune", {}, {**_params(world, "ft-bad"), "cases": str(cases)})
    assert tree_hashes(inproc["home"]) == before and work_dirs(inproc["tmp"]) == []


@pytest.mark.parametrize("change, error, message", [
    ({"minutes": 0}, InputError, "budget must be positive: minutes = 0"),
    ({"epochs": 0}, InputError, "budget must be positive: epochs = 0"),
    ({"base": "no-such-version"}, ModelError, "has no model version 'no-such-version'; installed versions: tiny-base"),
    ({"name": BASE}, ModelError, f"model teeth {BASE} already exists"),
    ({"name": "../escape"}, InputError, "not a valid name"),
    ({"cases": "/no/such/cases"}, InputError, "does not exist"),
    ({"stages": ["stage3"]}, InputError, "has no part \\['stage3'\\]"),
])
def test_bad_parameters_refused_before_any_work(world, inproc, change, error, message):
    before = tree_hashes(inproc["home"])
    with pytest.raises(error, match=message):
        runner.run_inline("finetune", {}, {**_params(world, "ft-bad"), **change})
    assert tree_hashes(inproc["home"]) == before and work_dirs(inproc["tmp"]) == []


def test_inline_cancel_and_a_late_cancel_undo_the_write(world, inproc):
    """Cancel from the progress callback during training; and a cancel that arrives while the version is being
    written: the written version is removed again (the store keeps exactly its versions)."""
    token = CancelToken()

    def progress(event):
        if event.get("stage") == "train":
            token.cancel()

    with pytest.raises(Cancelled):
        runner.run_inline("finetune", {}, _params(world, "ft-c"), progress=progress, cancel=token)
    assert set(versions(inproc["home"])) == {BASE} and work_dirs(inproc["tmp"]) == []

    token = CancelToken()
    from deepsegrecon import store as store_mod

    original = store_mod.ModelStore.write_version

    def write_then_cancel(self, *a, **k):
        entry = original(self, *a, **k)
        token.cancel()  # arrives just after the rename
        return entry

    store_mod.ModelStore.write_version = write_then_cancel
    try:
        with pytest.raises(Cancelled):
            runner.run_inline("finetune", {}, _params(world, "ft-late", stages=["stage2"]), cancel=token)
    finally:
        store_mod.ModelStore.write_version = original
    assert set(versions(inproc["home"])) == {BASE}
    assert sorted(p.name for p in (inproc["home"] / "models" / "teeth").iterdir()) == [BASE]


def test_cli_finetune_end_to_end(world, inproc, capsys):
    code = cli.main(["finetune", "teeth", "--cases", str(world["cases"]), "--base", BASE, "--name", "clinic-1",
                     "--epochs", "1", "--device", "cpu", "--val-fraction", "0.5", "--stages", "stage2", "--no-base-check",
                     "--set", "iterations_per_epoch=2", "--set", "stage2.cache_cases=4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "wrote model teeth clinic-1" in out and "--model clinic-1" in out
    assert "[stage2] epoch 1/1  loss " in err and "val Dice " in err and "ETA" in err
    vs = versions(inproc["home"])
    assert set(vs) == {BASE, "clinic-1"}
    m = vs["clinic-1"]
    assert m["training"]["parts_trained"] == ["stage2"]
    assert m["training"]["config"]["stage2"]["cache_cases"] == 4
    assert m["training"]["config"]["stage2"]["learning_rate"] == 3e-5  # the teeth fine-tuning default
    assert "kept_base" not in m["metrics"]["parts"]["stage2"]  # --no-base-check
    base_dir = inproc["home"] / "models" / "teeth" / BASE
    assert m["files"]["stage1.pt"] == hashlib.sha256((base_dir / "stage1.pt").read_bytes()).hexdigest()  # kept
    assert m["files"]["stage2.pt"] != hashlib.sha256((base_dir / "stage2.pt").read_bytes()).hexdigest()
    code = cli.main(["models", "verify", "teeth"])
    out, _ = capsys.readouterr()
    assert code == 0 and "ok      teeth clinic-1" in out and f"ok      teeth {BASE}" in out
    assert tree_hashes(base_dir) == world["base_hashes"] and work_dirs(inproc["tmp"]) == []


def test_cli_refuses_zero_minutes_and_ctrl_c_cancels(world, inproc, capsys, monkeypatch):
    before = tree_hashes(inproc["home"])
    args = ["finetune", "teeth", "--cases", str(world["cases"]), "--base", BASE, "--name", "n1", "--device", "cpu"]
    code = cli.main(args + ["--minutes", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "error: the training budget must be positive: minutes = 0" in err

    def ctrl_c(self, event):  # the user presses Ctrl-C during the first epoch
        if event.get("stage") == "train":
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.TrainingProgressPrinter, "__call__", ctrl_c)
    code = cli.main(args + ["--epochs", "1", "--set", "iterations_per_epoch=2"])
    _, err = capsys.readouterr()
    assert code == 4 and "cancelled" in err.splitlines()[-1]
    assert tree_hashes(inproc["home"]) == before and work_dirs(inproc["tmp"]) == []


def test_add_case_cli(world, inproc, capsys):
    from deepsegrecon import segio
    from deepsegrecon.training.cases import find_cases

    src = world["cases"] / "case B3"
    out = inproc["root"] / "new cases" / "scan 7"
    code = cli.main(["add-case", "teeth", "--image", f"image={src / 'image.nrrd'}", "--label",
                     str(src / "label.seg.nrrd"), "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "wrote case scan 7" in stdout
    case = find_cases(out.parent, {"image": "*"}, {n: v for v, n in L.all_labels().items()})[0]
    data = case.load()
    ref = segio.read_seg_nrrd(src / "label.seg.nrrd").labelmap
    assert np.array_equal(data.label.array, ref.array)
    # a plain labelmap with a value that is no teeth label is refused, nothing written
    lab = _read(src / "image.nrrd")
    write_image(lab.with_array(np.full(lab.array.shape, 99, np.uint8)), inproc["root"] / "bad label.nrrd")
    code = cli.main(["add-case", "teeth", "--image", f"image={src / 'image.nrrd'}", "--label",
                     str(inproc["root"] / "bad label.nrrd"), "-o", str(inproc["root"] / "new cases" / "bad")])
    _, err = capsys.readouterr()
    assert code == 2 and "label values [99]" in err and not (inproc["root"] / "new cases" / "bad").exists()


def test_progress_extra_fields_reach_the_sink_and_old_sinks_still_work():
    events = []
    reporter = ProgressReporter({"a": 1, "b": 1}, events.append)
    ctx = TaskContext(progress=reporter)
    ctx.step("b", 0.5, "half", extra={"epoch": 3, "loss": 0.25, "fraction": 9})
    assert events[-1]["epoch"] == 3 and events[-1]["loss"] == 0.25 and events[-1]["fraction"] == 0.75
    old = []
    ctx = TaskContext(progress=lambda stage, fraction=0.0, message="": old.append((stage, fraction, message)))
    ctx.step("x", 0.1, "m", extra={"epoch": 1})
    TaskContext().step("x", 0.2, extra={"epoch": 1})  # the default sink takes extra too
    assert old == [("x", 0.1, "m")]
