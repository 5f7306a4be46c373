"""A batch in a background process (what a Slicer "Batch" panel runs: folder in, folder out, progress, cancel).

``start_batch`` runs ``python -m deepsegrecon batch ... --job-dir JOB`` (``PythonSlicer`` in Slicer) started like
the worker (:mod:`deepsegrecon.processes`); ``poll`` reads JOB/status.json (cases done / skipped / failed, ETA,
the running case); ``cancel`` touches JOB/cancel (the running case stops at its next step, nothing half-written),
then stops the process tree after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import errors, processes
from .errors import InputError


class BatchJob:
    def __init__(self, job_dir: Path, process: subprocess.Popen, output: Path):
        self.job_dir, self.process, self.output = Path(job_dir), process, Path(output)

    def poll(self) -> dict:
        """{state: running | finished | cancelled | failed, total, done, skipped, failed, eta_s, case, exit_code,
        error}; ``finished`` may have failed cases (see OUT/batch.csv)."""
        try:
            status = json.loads((self.job_dir / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        status.setdefault("state", "running")
        code = self.process.poll()
        if code is not None:
            status["exit_code"] = code
            if code == errors.EXIT_CANCELLED:
                status["state"] = "cancelled"
            elif status.get("state") != "finished":  # the batch itself failed (no case, bad input, no model)
                status["state"], status["error"] = "failed", _last_error(self.job_dir / "batch.log")
        return status

    def wait(self, timeout: float | None = None) -> dict:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        return self.poll()

    def cancel(self, grace: float = 10.0) -> dict:
        """Ask the batch to stop (flag file); after ``grace`` s stop the process and everything it started."""
        if self.process.poll() is None:
            (self.job_dir / "cancel").touch()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                processes.terminate_tree(self.process, timeout=1.0)
        return self.poll()

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.cancel(grace=2.0)
        shutil.rmtree(self.job_dir, ignore_errors=True)


def _last_error(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    except OSError:
        return "the batch process ended without a result"
    return lines[-1][len("error: "):] if lines else "the batch process ended without a result"


def start_batch(task: str, inputs, output, params: dict | None = None, *, shard: str | None = None,
                fmt: str = "auto", python: str = sys.executable, job_root=None, plugins=()) -> BatchJob:
    """Start ``deepsegrecon batch`` in a background process; returns the :class:`BatchJob`."""
    if not inputs:
        raise InputError("choose at least one input folder or file")
    root = Path(job_root) if job_root else Path(tempfile.gettempdir()) / "deepsegrecon-jobs"
    root.mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(prefix=f"batch-{task}-", dir=root))
    cmd = [python, "-m", "deepsegrecon", "batch", task, *map(str, inputs), "-o", str(output), "--format", fmt,
           "--job-dir", str(job)]
    for key, value in (params or {}).items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    if shard:
        cmd += ["--shard", str(shard)]
    for plugin in plugins:
        cmd += ["--plugin", str(plugin)]
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    with open(job / "batch.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=str(job), **processes.popen_options())
    return BatchJob(job, proc, Path(output))


class BatchLogic:
    """A panel's batch for one task, as a job of the panel's job controller (``DeepSegReconCommon.Jobs``):
    ``start`` (the Run button) calls :func:`start_batch`; ``poll`` says running, succeeded (the batch finished,
    failed cases included), failed or cancelled, with ``fraction`` (cases ended / total) and a ``message``."""

    def __init__(self, task: str, python: str = sys.executable, job_root=None, plugins=()):
        self.task, self.python, self.job_root, self.plugins = task, python, job_root, tuple(plugins)
        self.job: BatchJob | None = None

    def start(self, input_folder, output_folder, params: dict | None = None) -> BatchJob:
        if self.job is not None and self.job.process.poll() is None:
            raise InputError("a batch is already running; cancel it first")
        if not input_folder:
            raise InputError("choose an input folder")
        if not output_folder:
            raise InputError("choose an output folder")
        if self.job is not None:
            self.job.cleanup()  # the last batch's job folder (its log was read by its last poll)
        self.job = start_batch(self.task, [input_folder], output_folder, params, python=self.python,
                               job_root=self.job_root, plugins=self.plugins)
        return self.job

    def poll(self) -> dict:
        if self.job is None:
            return {"state": "idle"}
        status = self.job.poll()
        total = int(status.get("total") or 0)
        ended = sum(int(status.get(k) or 0) for k in ("done", "skipped", "failed"))
        state = "succeeded" if status["state"] == "finished" else status["state"]
        message = (f"{ended}/{total} cases: {status.get('done', 0)} done, {status.get('skipped', 0)} skipped, "
                   f"{status.get('failed', 0)} failed" if total else "finding the cases")
        if state == "running" and status.get("case"):
            message += f"; {status['case']}"
        return {**status, "state": state, "fraction": ended / total if total else 0.0, "message": message}

    def cancel(self) -> dict:
        return self.job.cancel() if self.job is not None else {"state": "idle"}
