"""The background worker: a real separate process, driven through its job folder."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from deepsegrecon import processes, runner, worker
from deepsegrecon.errors import Cancelled, DeepSegReconError, InputError
from deepsegrecon.image import Image
from deepsegrecon.progress import ProgressReporter, format_progress
from deepsegrecon.task import CancelToken

PLUGIN = textwrap.dedent('''
    """Test tasks, registered in the worker process through params.json "plugins"."""
    import time

    from deepsegrecon.errors import InputError
    from deepsegrecon.task import InputSpec, Task, register
    from deepsegrecon.results import VolumeResult


    @register
    class SleepTask(Task):
        name = "test_sleep"
        inputs = (InputSpec("image"),)
        result_kind = "volume"
        uses_device = False

        def run(self, images, params, ctx):
            n, dt = params.get("steps", 10), params.get("dt", 0.05)
            for i in range(n):
                ctx.step("sleeping", i / n, f"step {i + 1} of {n}")
                if params.get("fail_input") and i == 1:
                    raise InputError("the test image has no teeth in it (on purpose)")
                if params.get("raise_runtime") and i == 1:  # e.g. torch out of memory
                    raise RuntimeError(params["raise_runtime"])
                if params.get("disk_full") and i == 1:
                    raise OSError(28, "No space left on device", "/no/space/x.nrrd")
                time.sleep(dt)
            ctx.step("sleeping", 1.0)
            img = images["image"]
            return VolumeResult({"doubled": img.with_array(img.array * 2)}, report={"steps": n})


    @register
    class TreeTask(Task):
        """Starts a child that starts a grandchild which ignores SIGTERM, then waits in one long step."""
        name = "test_tree"
        inputs = (InputSpec("image"),)
        result_kind = "volume"
        uses_device = False

        def run(self, images, params, ctx):
            import json, os, subprocess, sys
            from pathlib import Path

            grandchild = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(120)")
            child = ("import subprocess, sys, time; "
                     f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=subprocess.PIPE, text=True); "
                     "p.stdout.readline(); print(p.pid, flush=True); time.sleep(120)")
            proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
            pids = [os.getpid(), proc.pid, int(proc.stdout.readline())]
            Path(params["pids_file"]).write_text(json.dumps(pids))
            ctx.step("sleeping", 0.5, "a child and a grandchild are running")
            time.sleep(60)  # never sees the cancel flag
''')


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "dsr_test_tasks.py").write_text(PLUGIN)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image(rng.normal(size=(9, 10, 11)).astype(np.float32), spacing=(0.5, 0.6, 0.7), origin=(1, 2, 3))


def _start(tmp_path, image, plugin_env, **params):
    root = tmp_path / "jobs"
    job = worker.create_job("test_sleep", {"image": image}, {"device": "cpu", **params}, job_root=root,
                            plugins=["dsr_test_tasks"])
    return root, worker.start_job(job, env=plugin_env)


def _wait_for_progress(handle, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = handle.poll()
        if s.stage == "sleeping" or s.done:
            return s
        time.sleep(0.02)
    raise AssertionError(f"no progress from the worker; log: {(handle.job_dir / 'worker.log').read_text()}")


def _lines(job):
    return [json.loads(line) for line in (job / "progress.jsonl").read_text().splitlines()]


def test_job_runs_reports_progress_and_moves_output_into_place(tmp_path, image, plugin_env):
    root, h = _start(tmp_path, image, plugin_env, steps=20, dt=0.05)
    job = h.job_dir
    assert json.loads((job / "params.json").read_text())["inputs"] == {"image": "inputs/image.nrrd"}
    seen = []

    def on_progress(status):
        seen.append(status)
        out = job / "output"
        if status.state == "running" and status.fraction < 1.0:
            assert not out.exists()
        if out.exists():  # it appears complete or not at all
            assert sorted(p.name for p in out.iterdir()) == ["doubled.nrrd", "result.json"]

    status = h.wait(timeout=60, on_progress=on_progress, poll_interval=0.05)
    assert status.state == "succeeded" and status.exit_code == 0, (job / "worker.log").read_text()
    assert status.fraction == 1.0 and status.error is None

    running = [s for s in seen if s.state == "running" and s.stage == "sleeping"]
    assert len(running) >= 3 and any(s.eta_s is not None and s.eta_s > 0 for s in running)
    lines = _lines(job)
    steps = [e for e in lines if e.get("stage") == "sleeping"]
    assert len(steps) == 21 and all({"fraction", "elapsed_s", "eta_s", "message"} <= set(e) for e in steps)
    fr = [e["fraction"] for e in steps]
    assert fr == sorted(fr) and fr[0] == 0.0 and fr[-1] == 1.0
    assert steps[10]["eta_s"] is not None and 0.2 < steps[10]["eta_s"] < 10  # about 0.5 s left
    assert steps[3]["message"] == "step 4 of 20"
    assert lines[-1]["state"] == "succeeded" and lines[-1]["exit_code"] == 0

    assert sorted(p.name for p in job.iterdir() if p.name.startswith(".")) == []  # staging renamed away
    result = h.result()
    assert np.array_equal(result.volumes["doubled"].array, image.array * 2)
    assert result.volumes["doubled"].same_grid(image) and result.report == {"steps": 20}

    h.cleanup()
    assert list(root.iterdir()) == []


def test_cancel_stops_the_job_within_two_seconds(tmp_path, image, plugin_env):
    root, h = _start(tmp_path, image, plugin_env, steps=400, dt=0.05)
    _wait_for_progress(h)
    t0 = time.monotonic()
    status = h.cancel()
    took = time.monotonic() - t0
    assert took < 2.0
    assert status.state == "cancelled" and status.exit_code == 4, (h.job_dir / "worker.log").read_text()
    assert h.process.poll() == 4
    assert not (h.job_dir / "output").exists() and not list(h.job_dir.glob(".*"))
    assert _lines(h.job_dir)[-1]["state"] == "cancelled"
    with pytest.raises(Cancelled):
        h.result()
    h.cleanup()
    assert list(root.iterdir()) == []


def test_sigterm_cancels_a_task_that_does_not_check(tmp_path, image, plugin_env):
    # one long step: the cancel flag is not seen in time, SIGTERM interrupts it
    root, h = _start(tmp_path, image, plugin_env, steps=2, dt=30)
    _wait_for_progress(h)
    t0 = time.monotonic()
    status = h.cancel(grace=0.3)
    assert time.monotonic() - t0 < 2.0
    assert status.state == "cancelled" and status.exit_code == 4, (h.job_dir / "worker.log").read_text()
    assert "SIGTERM" in status.error and not (h.job_dir / "output").exists()
    h.cleanup()
    assert list(root.iterdir()) == []


def test_killed_worker_is_reported_as_failed(tmp_path, image, plugin_env):
    root, h = _start(tmp_path, image, plugin_env, steps=400, dt=0.05)
    _wait_for_progress(h)
    os.killpg(h.pid, signal.SIGKILL)  # as the out-of-memory killer would
    status = h.wait(timeout=10)
    assert status.state == "failed" and status.exit_code == -9
    assert "the worker process was killed (signal 9" in status.error
    assert not (h.job_dir / "output").exists()
    with pytest.raises(DeepSegReconError, match="killed"):
        h.result()
    h.cleanup()
    assert list(root.iterdir()) == []


def test_input_error_in_the_task_exits_2_with_its_message(tmp_path, image, plugin_env):
    root, h = _start(tmp_path, image, plugin_env, steps=10, dt=0.01, fail_input=True)
    status = h.wait(timeout=30)
    assert status.state == "failed" and status.exit_code == 2
    assert status.error == "the test image has no teeth in it (on purpose)" and status.error_type == "InputError"
    assert "no teeth" in (h.job_dir / "worker.log").read_text()
    assert not (h.job_dir / "output").exists()
    with pytest.raises(InputError, match="no teeth"):
        h.result()
    h.cleanup()
    assert list(root.iterdir()) == []


def test_worker_main_refuses_bad_jobs_before_running(tmp_path, image, plugin_env):
    """In-process worker entry (no extra process): unknown task, invalid input, missing plugin."""
    root = tmp_path / "jobs"
    job = worker.create_job("no_such_task", {"image": image}, {"device": "cpu"}, job_root=root)
    assert worker.main(job, install_signals=False) == 2
    last = _lines(job)[-1]
    assert last["state"] == "failed" and "unknown task 'no_such_task'" in last["error"]

    flat = Image(np.zeros((10, 10, 10), np.float32))
    job = worker.create_job("test_sleep", {"image": flat}, {"device": "cpu"}, job_root=root,
                            plugins=[str(tmp_path / "missing_plugin.py")])
    assert worker.main(job, install_signals=False) == 1
    assert "cannot import the plugin" in _lines(job)[-1]["error"]

    assert worker.main(tmp_path / "not a job", install_signals=False) == 2
    with pytest.raises(InputError, match="plain JSON"):
        worker.create_job("test_sleep", {"image": image}, {"x": object()}, job_root=root)
    assert len(list(root.iterdir())) == 2  # the refused job left no folder


def test_run_inline_validates_first_and_honours_cancel(tmp_path, image, plugin_env, monkeypatch):
    import importlib
    import sys

    monkeypatch.syspath_prepend(plugin_env["PYTHONPATH"].split(os.pathsep)[0])
    importlib.import_module("dsr_test_tasks")
    events = []
    with pytest.raises(InputError, match="2-D"):
        runner.run_inline("test_sleep", {"image": Image(np.ones((20, 20)))}, {"device": "cpu"}, progress=events.append)
    assert events == []  # refused before running
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        runner.run_inline("test_sleep", {"image": image}, {"device": "cpu"}, cancel=token)
    res = runner.run_inline("test_sleep", {"image": image}, {"device": "cpu", "steps": 4, "dt": 0},
                            progress=events.append)
    assert np.array_equal(res.volumes["doubled"].array, image.array * 2)
    assert [e["fraction"] for e in events] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert "dsr_test_tasks" in sys.modules


@pytest.mark.parametrize("fault, words", [
    ({"raise_runtime": "CUDA out of memory. Tried to allocate 2.00 GiB"}, "test_sleep: out of memory"),
    ({"raise_runtime": "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"}, "out of memory"),
    ({"disk_full": True}, "the disk is full: could not write /no/space/x.nrrd"),
    ({"save": True}, "the disk is full"),
])
def test_out_of_memory_and_disk_full_exit_5(tmp_path, image, plugin_env, monkeypatch, fault, words):
    """The worker maps errors like the CLI: torch / allocator out of memory and a full disk are exit 5."""
    import errno
    from pathlib import Path

    from deepsegrecon.results import VolumeResult

    if fault.pop("save", False):  # the disk fills up while the result is saved
        def save(self, folder):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(VolumeResult, "save", save)
    plugin = Path(plugin_env["PYTHONPATH"].split(os.pathsep)[0]) / "dsr_test_tasks.py"
    job = worker.create_job("test_sleep", {"image": image}, {"device": "cpu", "steps": 3, "dt": 0, **fault},
                            job_root=tmp_path / "jobs", plugins=[str(plugin)])
    assert worker.main(job, install_signals=False) == 5
    last = _lines(job)[-1]
    assert last["state"] == "failed" and last["error_type"] == "ResourceError" and words in last["error"]
    assert sorted(p.name for p in job.iterdir()) == ["inputs", "params.json", "progress.jsonl"]  # no output, no stage


def test_progress_reporter_weights_stages():
    events = []
    rep = ProgressReporter({"load": 1, "segment": 8, "save": 1}, events.append)
    rep("load", 1.0)
    rep("segment", 0.5)
    rep("unknown stage", 0.0)  # keeps the fraction reached
    rep("save", 1.0)
    assert [e["fraction"] for e in events] == [0.1, 0.5, 0.5, 1.0]
    assert format_progress({"fraction": 0.42, "stage": "segment", "eta_s": 75, "message": ""}) == \
        " 42% segment  ETA 1 min 15 s"



# ------------------------------------------------------------------------------ process control on every OS
def test_popen_options_per_platform():
    assert processes.popen_options("win32") == {"creationflags": 0x08000000}  # CREATE_NO_WINDOW: no console
    assert getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000) == processes.CREATE_NO_WINDOW
    for platform in ("linux", "darwin"):
        assert processes.popen_options(platform) == {"start_new_session": True}


@pytest.mark.parametrize("platform", ["win32", "linux"])
def test_start_job_arguments_per_platform(tmp_path, image, monkeypatch, platform):
    """What start_job hands to Popen: on Windows no session argument (POSIX only) and no console window; on every
    platform the id of this process, which the worker watches."""
    calls = []

    class Recorder:
        pid = 12345

        def __init__(self, args, **kwargs):
            calls.append((args, kwargs))

    job = worker.create_job("test_sleep", {"image": image}, {}, job_root=tmp_path)
    monkeypatch.setattr(worker.subprocess, "Popen", Recorder)
    handle = worker.start_job(job, python="PythonSlicer.exe", platform=platform)
    (args, kwargs), = calls
    assert args == ["PythonSlicer.exe", "-m", "deepsegrecon.worker", str(job)]
    if platform == "win32":
        assert kwargs["creationflags"] == processes.CREATE_NO_WINDOW and "start_new_session" not in kwargs
    else:
        assert kwargs["start_new_session"] is True and "creationflags" not in kwargs
    assert kwargs["env"][worker.PARENT_PID_ENV] == str(os.getpid())
    assert kwargs["stdin"] is subprocess.DEVNULL and kwargs["cwd"] == str(job)
    assert handle.platform == platform


def _gone(pid, timeout=5.0):
    end = time.monotonic() + timeout
    while processes.pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not processes.pid_alive(pid)


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_cancel_stops_the_whole_process_tree(tmp_path, image, plugin_env, monkeypatch, platform):
    """A real tree (worker -> child -> grandchild that ignores SIGTERM) whose task never sees the cancel flag.
    The "win32" branch runs without os.killpg (as on Windows): psutil alone must stop every process."""
    killpg_calls = []
    if platform == "win32":
        monkeypatch.delattr(os, "killpg")
    else:
        real_killpg = os.killpg
        monkeypatch.setattr(os, "killpg", lambda pid, sig: (killpg_calls.append((pid, sig)), real_killpg(pid, sig)))
    pids_file = tmp_path / "pids.json"
    job = worker.create_job("test_tree", {"image": image}, {"pids_file": str(pids_file)}, job_root=tmp_path / "jobs",
                            plugins=["dsr_test_tasks"])
    h = worker.start_job(job, env=plugin_env)
    h.platform = platform  # how the handle stops it; the process itself was started the POSIX way (Popen refuses
    #                         Windows creation flags here)
    _wait_for_progress(h)
    pids = json.loads(pids_file.read_text())
    assert pids[0] == h.pid and all(processes.pid_alive(p) for p in pids)
    t0 = time.monotonic()
    status = h.cancel(grace=0.3)
    assert time.monotonic() - t0 < 2.5
    assert status.state == "cancelled" and status.error_type == "Cancelled", (h.job_dir / "worker.log").read_text()
    assert all(_gone(p) for p in pids), [p for p in pids if processes.pid_alive(p)]
    assert killpg_calls == ([] if platform == "win32" else [(h.pid, signal.SIGKILL)])
    h.cleanup()


def test_cancelled_is_reported_whatever_the_exit_code(tmp_path, image, plugin_env):
    """On Windows a terminated process exits with a positive code (no signal): still "cancelled", not "failed"."""
    root, h = _start(tmp_path, image, plugin_env, steps=2, dt=30)
    _wait_for_progress(h)
    h.cancel_requested = True
    h.process.kill()  # stopped before it could write its final line
    h.process.wait(5)
    h.process.returncode = 1  # TerminateProcess's exit code
    status = h.poll()
    assert status.state == "cancelled" and status.error == "cancelled (the worker was stopped)"
    h.cleanup()


@pytest.mark.skipif(sys.platform.startswith("win"), reason="kills the parent with SIGKILL")
def test_worker_cancels_its_job_when_the_application_dies(tmp_path, image, plugin_env):
    """A crashed Slicer must not leave a job (e.g. a fine-tune) running for its whole budget."""
    job = worker.create_job("test_sleep", {"image": image}, {"steps": 2000, "dt": 0.05}, job_root=tmp_path / "jobs",
                            plugins=["dsr_test_tasks"])
    app = textwrap.dedent("""
        import sys, time
        from deepsegrecon import worker
        print(worker.start_job(sys.argv[1]).pid, flush=True)
        time.sleep(120)
    """)
    engine = str(worker.Path(worker.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([engine, plugin_env["PYTHONPATH"]])}
    parent = subprocess.Popen([sys.executable, "-c", app, str(job)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker_pid = int(parent.stdout.readline())
        end = time.monotonic() + 30
        progress = job / "progress.jsonl"
        while not (progress.exists() and "sleeping" in progress.read_text()) and time.monotonic() < end:
            time.sleep(0.05)
        assert processes.pid_alive(worker_pid)
        os.kill(parent.pid, signal.SIGKILL)  # the application crashes
        parent.wait(5)
        assert _gone(worker_pid, timeout=8), "the worker outlived the application that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
    last = _lines(job)[-1]
    assert last["state"] == "cancelled" and last["exit_code"] == 4
    assert "has ended: cancelling" in (job / "worker.log").read_text()
