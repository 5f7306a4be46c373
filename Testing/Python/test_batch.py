"""Batch (issue 21): case discovery, a broken case in the middle, resume, shards, the CLI and the public runner.

A cheap task registered here (a threshold) runs the cases, so these tests measure the batch machinery, not a
network; the DICOM SEG and the real-network batch are in test_batch_dicom.py."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from batch_testtask import RUNS, ThresholdTask
from conftest import oblique_direction
from deepsegrecon import batch, cli
from deepsegrecon.batch_cases import find_brain, find_images, parse_shard, shard
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.io import write_image
from deepsegrecon.results import SegmentationResult

TASK = ThresholdTask.name


def make_cases(folder, n=5, broken=None):
    """n small oblique volumes in case folders; case ``broken`` is a truncated NRRD."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"study{i:02d}"
        d.mkdir(parents=True)
        img = Image(rng.random((8, 9, 10)).astype(np.float32), (0.5, 0.6, 1.5), (10.0, -5.0, 3.0 * i),
                    oblique_direction())
        path = write_image(img, d / "scan.nrrd", compress=False)
        if i == broken:
            path.write_bytes(path.read_bytes()[:-200])
        (d / "labels.nrrd").write_bytes(b"not a case: a label file is skipped")
    return folder


def test_discovery_and_shards(tmp_path):
    make_cases(tmp_path / "in", 5)
    cases = find_images([tmp_path / "in"], modalities=None)
    assert [c.id for c in cases] == [f"study{i:02d}_scan" for i in range(5)]  # labels.nrrd skipped
    parts = [shard(cases, k, 2) for k in (1, 2)]
    ids = [c.id for p in parts for c in p]
    assert sorted(ids) == [c.id for c in cases] and len(set(ids)) == 5  # each case exactly once
    assert {len(p) for p in parts} == {2, 3}
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(InputError, match="K/N"):
            parse_shard(bad)
    with pytest.raises(InputError, match="does not exist"):
        find_images([tmp_path / "nowhere"])


def test_brain_cases_matched_by_name_and_csv(tmp_path):
    for case, names in (("a", ("a_t1.nii.gz", "a_t1ce.nii.gz", "a_t2.nii.gz", "a_flair.nii.gz")),
                        ("b", ("t1n.nrrd", "t1c.nrrd", "t2w.nrrd", "t2f.nrrd", "seg.nrrd"))):
        (tmp_path / case).mkdir()
        for n in names:
            (tmp_path / case / n).write_bytes(b"x")
    cases = {c.id: c.inputs for c in find_brain([tmp_path])}
    assert sorted(cases) == ["a", "b"]
    assert {m: os.path.basename(p) for m, p in cases["a"].items()} == {
        "t1": "a_t1.nii.gz", "t1c": "a_t1ce.nii.gz", "t2": "a_t2.nii.gz", "flair": "a_flair.nii.gz"}
    assert {m: os.path.basename(p) for m, p in cases["b"].items()} == {
        "t1": "t1n.nrrd", "t1c": "t1c.nrrd", "t2": "t2w.nrrd", "flair": "t2f.nrrd"}
    (tmp_path / "list.csv").write_text("case,flair,t1c\np1,a/a_flair.nii.gz,a/a_t1ce.nii.gz\n")
    (c,) = find_brain([tmp_path / "list.csv"])
    assert c.id == "p1" and c.inputs["flair"] == str(tmp_path / "a" / "a_flair.nii.gz")


def test_broken_case_resume_and_shards(tmp_path):
    make_cases(tmp_path / "in", 5, broken=2)
    out = tmp_path / "out"
    RUNS.clear()
    s = batch.run_batch(TASK, [tmp_path / "in"], out, {"threshold": 0.6})
    assert (s.total, s.done, s.failed, s.skipped) == (5, 4, 1, 0)
    assert s.exit_code == 2  # the broken case's input error
    rows = {r["case"]: r for r in batch.read_csv(out)}
    assert len(rows) == 5 and rows["study02_scan"]["status"] == "failed"
    assert "truncated" in rows["study02_scan"]["error"] or "corrupt" in rows["study02_scan"]["error"]
    assert not (out / "study02_scan").exists() and not list(out.glob(".partial-*"))  # nothing half-written
    assert rows["study03_scan"]["status"] == "done"  # the batch went on after it
    seg = out / "study03_scan" / "study03_scan.seg.nrrd"
    from deepsegrecon.segio import read_seg_nrrd

    back = read_seg_nrrd(seg)
    # the result sits on the source grid, oblique direction kept
    assert np.allclose(back.labelmap.direction, oblique_direction()) and back.labelmap.origin[2] == pytest.approx(9)
    assert json.loads((out / "study03_scan" / "report.json").read_text())["voxels"] == int(back.labelmap.array.sum())
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("study*/*")}
    assert len(RUNS) == 4

    # fix the broken case and rerun: only it runs, the finished ones are skipped and untouched
    make_cases(tmp_path / "fixed", 5)
    os.replace(tmp_path / "fixed" / "study02" / "scan.nrrd", tmp_path / "in" / "study02" / "scan.nrrd")
    s2 = batch.run_batch(TASK, [tmp_path / "in"], out, {"threshold": 0.6})
    assert (s2.done, s2.skipped, s2.failed) == (1, 4, 0) and s2.exit_code == 0
    assert len(RUNS) == 5 and RUNS[-1].endswith(os.path.join("study02", "scan.nrrd"))
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    statuses = {r["case"]: r["status"] for r in batch.read_csv(out)}
    assert statuses == {**{f"study{i:02d}_scan": "skipped" for i in (0, 1, 3, 4)}, "study02_scan": "done"}

    # other parameters are another key: everything runs again
    s3 = batch.run_batch(TASK, [tmp_path / "in"], out, {"threshold": 0.7}, shard="1/2")
    assert s3.done == 3 and s3.skipped == 0


def test_two_shards_cover_every_case_once(tmp_path):
    make_cases(tmp_path / "in", 5)
    out = tmp_path / "out"
    RUNS.clear()
    a = batch.run_batch(TASK, [tmp_path / "in"], out, shard="1/2")
    b = batch.run_batch(TASK, [tmp_path / "in"], out, shard=(2, 2))
    ran = [r["case"] for r in a.records + b.records]
    assert sorted(ran) == [f"study{i:02d}_scan" for i in range(5)] and len(RUNS) == 5
    assert {r["case"] for r in a.records}.isdisjoint(r["case"] for r in b.records)
    rows = batch.read_csv(out)  # both shards' cases in one batch.csv
    assert sorted(r["case"] for r in rows) == sorted(ran) and {r["status"] for r in rows} == {"done"}


def test_cli_batch(tmp_path, capsys):
    make_cases(tmp_path / "in", 3, broken=1)
    out = tmp_path / "out"
    code = cli.main(["batch", TASK, str(tmp_path / "in"), "-o", str(out), "--set", "threshold=0.4"])
    stdout, err = capsys.readouterr()
    assert code == 2, err
    assert "3 cases: 2 done, 0 skipped (finished before), 1 failed" in stdout and "failed study01_scan" in stdout
    assert "[3/3] done 2 skipped 0 failed 1" in err
    assert cli.main(["batch", TASK, str(tmp_path / "in"), "--list", "--shard", "2/2"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == "study01_scan"
    # whole-batch problems: clear message, exit 2, nothing written
    assert cli.main(["batch", TASK, str(tmp_path / "empty"), "-o", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert cli.main(["batch", TASK, str(tmp_path / "in"), "-o", str(tmp_path / "o3"), "--shard", "3/2"]) == 2
    assert "K/N" in capsys.readouterr().err
    assert cli.main(["batch", "no-such-task", str(tmp_path / "in"), "-o", str(tmp_path / "o4")]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert cli.main(["batch", TASK, str(tmp_path / "in"), "-o", str(out), "--format", "dicom-seg"]) == 2
    assert "needs a DICOM series" in capsys.readouterr().out


def test_public_runner(tmp_path):
    import deepsegrecon
    from deepsegrecon.task import CancelToken

    make_cases(tmp_path / "in", 2)
    events = []
    result = deepsegrecon.run(TASK, {"image": tmp_path / "in" / "study00" / "scan.nrrd"}, {"threshold": 0.9},
                              progress=events.append)
    assert isinstance(result, SegmentationResult) and events[-1]["stage"] == "threshold"
    token = CancelToken()
    token.cancel()
    s = deepsegrecon.run_batch(TASK, [tmp_path / "in"], tmp_path / "out", cancel=token)
    assert s.cancelled and s.exit_code == 4 and s.done == 0
    seen = []
    s = deepsegrecon.run_batch(TASK, [tmp_path / "in"], tmp_path / "out", progress=seen.append)
    assert s.done == 2 and seen[-1]["done"] == 2 and seen[-1]["total"] == 2


def test_worker_processes(tmp_path):
    """jobs=2: the cases run in two spawned processes (the plugin task imported there), records written here."""
    make_cases(tmp_path / "in", 4, broken=1)
    out = tmp_path / "out"
    s = batch.run_batch(TASK, [tmp_path / "in"], out, jobs=2,
                        plugins=[str(Path(__file__).with_name("batch_testtask.py"))])
    assert (s.done, s.failed) == (3, 1)
    done = [r["case"] for r in s.records if r["status"] == "done"]
    pids = {json.loads((out / c / "report.json").read_text())["pid"] for c in done}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert sorted(r["case"] for r in batch.read_csv(out)) == [f"study{i:02d}_scan" for i in range(4)]


def test_background_batch_progress_cancel_and_resume(tmp_path):
    """The Slicer panel's call: a batch in a background process, polled, cancelled in the middle of a case (the
    finished cases kept, nothing half-written), then resumed."""
    import time

    from deepsegrecon.batch_job import start_batch

    make_cases(tmp_path / "in", 4)
    out = tmp_path / "out"
    plugin = str(Path(__file__).with_name("batch_testtask.py"))
    job = start_batch("batch-test-slow", [tmp_path / "in"], out, {"seconds": 1.5}, plugins=[plugin],
                      job_root=tmp_path / "jobs")
    deadline = time.monotonic() + 60
    while job.poll().get("done", 0) < 1 and job.poll()["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    status = job.poll()
    assert status["state"] == "running" and status["total"] == 4 and status["done"] >= 1, status
    t = time.monotonic()
    status = job.cancel()
    assert time.monotonic() - t < 5 and status["state"] == "cancelled" and status["exit_code"] == 4, status
    finished = {r["case"] for r in batch.read_csv(out) if r["status"] == "done"}
    assert 1 <= len(finished) < 4 and not list(out.glob(".partial-*"))
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == finished | {"batch.csv"}
    job.cleanup()
    assert not job.job_dir.exists()
    s = batch.run_batch("batch-test-slow", [tmp_path / "in"], out, {"seconds": 1.5}, plugins=[plugin])
    assert {r["case"] for r in s.records if r["status"] == "skipped"} == finished and s.done == 4 - len(finished)
