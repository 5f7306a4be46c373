"""Run a task in a separate process, through a job folder.

Job folder::

    <job>/params.json      {"task", "params", "inputs": {name: file}, "plugins": [module, ...]}
    <job>/inputs/<name>.nrrd
    <job>/progress.jsonl   one JSON object a line: stage, fraction, elapsed_s, eta_s, message (and any
                           task-specific fields, e.g. epoch, loss, val_dice of a training job);
                           the last line has "state" (succeeded | failed | cancelled), "exit_code"
                           and, on failure, "error" and "error_type"
    <job>/cancel           flag file: its existence asks the task to stop at its next step
    <job>/output/          the saved result; appears only on success, renamed from a hidden staging folder
    <job>/worker.log       the worker's stdout and stderr

The caller uses :func:`create_job`, :func:`start_job` and the :class:`JobHandle` it returns
(``poll``, ``wait``, ``cancel``, ``result``, ``cleanup``). The worker process is
``python -m deepsegrecon.worker JOB_DIR`` (also ``deepsegrecon worker JOB_DIR``); its exit code is
the one in :mod:`deepsegrecon.errors` (0 ok, 1 internal, 2 input, 3 model, 4 cancelled, 5 resources).
SIGTERM is handled as a cancel request. The worker cancels itself when the process that started it (Slicer) ends:
:func:`start_job` passes that process's id in ``DEEPSEGRECON_PARENT_PID``. Starting and stopping work the same on
Windows, macOS and Linux (:mod:`deepsegrecon.processes`).

Progress: a task reports ``ctx.step(stage, fraction)``. If the task class declares
``stages = {stage: weight}``, ``fraction`` is the fraction within that stage and the overall
fraction is weighted over the stages; otherwise ``fraction`` is the overall fraction.
:func:`deepsegrecon.runner.run_inline` runs a task in the calling process (the CLI uses it) with the same checks;
the worker runs its job through it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import (
    EXIT_CANCELLED,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    Cancelled,
    DeepSegReconError,
    InputError,
    ModelError,
    ResourceError,
    resource_error,
)
from .processes import popen_options, terminate_tree, watch_process
from .results import load_result
from .runner import run_inline
from .task import CancelToken, get_task

PARAMS = "params.json"
PROGRESS = "progress.jsonl"
CANCEL = "cancel"
OUTPUT = "output"
LOG = "worker.log"
INPUTS = "inputs"
PARENT_PID_ENV = "DEEPSEGRECON_PARENT_PID"  # the worker cancels itself when this process has ended
PARENT_GONE_GRACE_S = 10.0  # then it exits even if the task has not reached its next cancel check
FINAL_STATES = ("succeeded", "failed", "cancelled")
_STANDARD_KEYS = ("stage", "fraction", "elapsed_s", "eta_s", "message", "pid", "state", "exit_code", "error",
                  "error_type")
ERROR_TYPES = {c.__name__: c for c in (DeepSegReconError, InputError, ModelError, Cancelled, ResourceError)}


def default_job_root() -> Path:
    return Path(tempfile.gettempdir()) / "deepsegrecon-jobs"


# ---------------------------------------------------------------------------------------- job folder
def create_job(task: str, images: dict, params: dict, job_root=None, plugins=()) -> Path:
    """Write a job folder (inputs as NRRD, params.json) and return its path."""
    from .io import write_image
    from .store import _check_name

    try:
        params_text = json.dumps({"task": task, "params": params or {},
                                  "inputs": {n: f"{INPUTS}/{n}.nrrd" for n in images},
                                  "plugins": [str(p) for p in plugins]}, indent=1)
    except (TypeError, ValueError) as e:
        raise InputError(f"job parameters must be plain JSON values: {e}") from e
    for name in images:
        _check_name(name, "input name")
    root = Path(job_root) if job_root is not None else default_job_root()
    root.mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(prefix=f"{task}-", dir=root))
    try:
        (job / INPUTS).mkdir()
        for name, img in images.items():
            write_image(img, job / INPUTS / f"{name}.nrrd", compress=False)
        (job / PARAMS).write_text(params_text, encoding="utf-8")
    except BaseException:
        shutil.rmtree(job, ignore_errors=True)
        raise
    return job


@dataclass
class JobStatus:
    state: str  # running | succeeded | failed | cancelled
    fraction: float = 0.0
    stage: str | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    message: str = ""
    error: str | None = None
    exit_code: int | None = None
    error_type: str | None = None
    extra: dict = field(default_factory=dict)  # task-specific fields of the last progress event (epoch, loss ...)

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES


class JobHandle:
    """A running (or finished) worker process and its job folder."""

    def __init__(self, job_dir: Path, process: subprocess.Popen, platform: str | None = None):
        self.job_dir = Path(job_dir)
        self.process = process
        self.platform = platform or sys.platform
        self.cancel_requested = False
        self._offset = 0
        self._buffer = b""
        self._last: dict = {}
        self._final: dict | None = None
        self._status: JobStatus | None = None
        self._started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_progress(self) -> None:
        path = self.job_dir / PROGRESS
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()  # an incomplete last line waits for the rest
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                if event.get("state") in FINAL_STATES:
                    self._final = event
                else:
                    self._last = event

    def poll(self) -> JobStatus:
        if self._status is not None and self._status.done:
            return self._status
        code = self.process.poll()
        self._read_progress()
        last = self._final or self._last
        status = JobStatus("running", fraction=last.get("fraction") or 0.0, stage=last.get("stage"),
                           eta_s=last.get("eta_s"), elapsed_s=last.get("elapsed_s") or round(time.monotonic() - self._started, 2),
                           message=last.get("message") or "",
                           extra={k: v for k, v in self._last.items() if k not in _STANDARD_KEYS})
        if code is None:
            self._status = status
            return status
        status.exit_code = code
        final = self._final
        if final is not None:
            status.state = final["state"]
            status.error = final.get("error")
            status.error_type = final.get("error_type")
        elif self.cancel_requested and not (code == EXIT_OK and (self.job_dir / OUTPUT).is_dir()):
            status.state, status.error_type = "cancelled", "Cancelled"  # stopped before it could say so itself
            status.error = (f"cancelled (the worker was stopped with signal {-code})" if code < 0
                            else "cancelled (the worker was stopped)")
        elif code < 0:
            status.state, status.error_type = "failed", "DeepSegReconError"
            status.error = (f"the worker process was killed (signal {-code}{_signal_name(-code)}), for example because "
                            f"the system ran out of memory; see {self.job_dir / LOG}")
        elif code == EXIT_OK and (self.job_dir / OUTPUT).is_dir():
            status.state = "succeeded"
        elif code == EXIT_CANCELLED:
            status.state, status.error_type, status.error = "cancelled", "Cancelled", "cancelled by the user"
        else:
            status.state, status.error_type = "failed", "DeepSegReconError"
            status.error = f"the worker exited with code {code} without a result; log: {_tail(self.job_dir / LOG)}"
        if status.state == "succeeded":
            status.fraction, status.eta_s = 1.0, 0.0
        self._status = status
        return status

    def wait(self, timeout: float | None = None, on_progress: Callable[[JobStatus], None] | None = None,
             poll_interval: float = 0.2) -> JobStatus:
        """Poll until the job ends (or ``timeout`` passes: the status is then still running)."""
        end = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            status = self.poll()
            key = (status.state, status.fraction, status.stage, status.message)
            if on_progress is not None and key != seen:
                on_progress(status)
            seen = key
            if status.done or (end is not None and time.monotonic() >= end):
                return status
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(poll_interval if end is None else max(0.0, min(poll_interval, end - time.monotonic())))

    def cancel(self, grace: float = 1.0) -> JobStatus:
        """Ask the task to stop (flag file); after ``grace`` s terminate the worker and every process it started,
        and kill what is left 0.4 s later (:func:`~deepsegrecon.terminate_tree`). The state is then
        "cancelled" (or "succeeded" if the job had finished just before)."""
        self.cancel_requested = True
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                (self.job_dir / CANCEL).touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        terminate_tree(self.process, timeout=0.4, platform=self.platform)  # children it left, too
        return self.poll()

    def result(self):
        """The result of a succeeded job; for a failed or cancelled one, raise its error here."""
        status = self.poll()
        if status.state == "running":
            raise DeepSegReconError(f"job {self.job_dir.name} is still running")
        if status.state == "succeeded":
            return load_result(self.job_dir / OUTPUT)
        if status.state == "cancelled":
            raise Cancelled(status.error or "cancelled by the user")
        raise ERROR_TYPES.get(status.error_type or "", DeepSegReconError)(status.error or "the job failed")

    def cleanup(self) -> None:
        """Stop the worker if it still runs, then remove the job folder."""
        if self.process.poll() is None:
            self.cancel(grace=0.5)
        shutil.rmtree(self.job_dir, ignore_errors=True)


def _signal_name(sig: int) -> str:
    try:
        return f", {signal.Signals(sig).name}"
    except ValueError:
        return ""


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip() or "(empty)"
    except OSError:
        return "(no log)"


def start_job(job_dir, python: str = sys.executable, env: dict | None = None,
              platform: str | None = None) -> JobHandle:
    """Start ``python -m deepsegrecon.worker JOB_DIR``; output goes to worker.log.

    Started with :func:`~deepsegrecon.popen_options` for ``platform`` (default ``sys.platform``): no
    console window on Windows, its own session elsewhere. The worker watches this process and cancels its job
    when it ends."""
    job_dir = Path(job_dir)
    if not (job_dir / PARAMS).is_file():
        raise InputError(f"{job_dir} is not a job folder (no {PARAMS})")
    full_env = dict(os.environ)
    full_env.update(env or {})
    pkg_parent = str(Path(__file__).resolve().parents[1])  # so the worker finds this package
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, full_env.get("PYTHONPATH")) if p)
    full_env.setdefault("PYTHONIOENCODING", "utf-8")
    full_env[PARENT_PID_ENV] = str(os.getpid())
    with open(job_dir / LOG, "ab") as log:
        proc = subprocess.Popen([python, "-m", "deepsegrecon.worker", str(job_dir)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(job_dir),
                                **popen_options(platform))
    return JobHandle(job_dir, proc, platform)


# ---------------------------------------------------------------------------------------- worker process
def _import_plugin(spec: str) -> None:
    try:
        if spec.endswith(".py"):
            path = Path(spec)
            mspec = importlib.util.spec_from_file_location(f"deepsegrecon_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mspec.name] = module
            mspec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except Exception as e:
        raise DeepSegReconError(f"cannot import the plugin '{spec}': {type(e).__name__}: {e}") from e


def main(job_dir, install_signals: bool = True) -> int:
    """The worker process: run the job in ``job_dir``; returns the exit code."""
    job = Path(job_dir)
    if not (job / PARAMS).is_file():
        print(f"error: {job} is not a job folder (no {PARAMS})", file=sys.stderr)
        return EXIT_INPUT
    start = time.monotonic()
    token = CancelToken(flag_file=job / CANCEL)
    guard = {"armed": True}
    previous = None

    def on_sigterm(signum, frame):
        try:
            token.cancel()
        except OSError:
            token._set = True
        if guard["armed"]:
            guard["armed"] = False
            raise Cancelled("cancelled (the worker received SIGTERM)")

    if install_signals:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        _watch_parent(token)

    progress_file = open(job / PROGRESS, "a", encoding="utf-8")  # noqa: SIM115 - closed in the finally below

    writing = {"cut": False}

    def emit(event: dict) -> None:
        line = json.dumps(event, ensure_ascii=False) + "\n"
        writing["cut"] = True  # still True if a SIGTERM interrupts the write
        progress_file.write(line)
        progress_file.flush()
        writing["cut"] = False

    stage = None
    try:
        try:
            spec = json.loads((job / PARAMS).read_text(encoding="utf-8"))
            emit({"stage": "starting", "fraction": 0.0, "elapsed_s": 0.0, "eta_s": None, "message": "", "pid": os.getpid()})
            for plugin in spec.get("plugins", []):
                _import_plugin(plugin)
            get_task(spec.get("task", ""))  # an unknown task fails before the inputs are read
            token.raise_if_cancelled()
            from .io import read_image

            images = {name: read_image(job / rel) for name, rel in spec.get("inputs", {}).items()}
            token.raise_if_cancelled()
            result = run_inline(spec["task"], images, spec.get("params", {}), progress=emit, cancel=token)
            token.raise_if_cancelled()
            stage = Path(tempfile.mkdtemp(prefix=".output-staging-", dir=job))
            try:
                result.save(stage)
            except Exception as e:
                from .files import disk_full_error

                full = disk_full_error(e, job)  # ITK writers do not say the disk is full
                if full is None:
                    raise
                raise full from e
            token.raise_if_cancelled()
            guard["armed"] = False  # from here on the job is done: a late SIGTERM changes nothing
            os.rename(stage, job / OUTPUT)
            stage = None
            code, final = EXIT_OK, {"state": "succeeded", "fraction": 1.0, "eta_s": 0.0}
        except json.JSONDecodeError as e:
            raise DeepSegReconError(f"{job / PARAMS} is not valid JSON: {e}") from e
        except Exception as e:
            mapped = resource_error(e)  # the same map as the CLI: disk full, out of memory -> exit 5
            if mapped is None or mapped is e:
                raise
            raise mapped from e
    except (Cancelled, KeyboardInterrupt) as e:
        msg = str(e) if isinstance(e, Cancelled) else "cancelled (interrupted)"
        code, final = EXIT_CANCELLED, {"state": "cancelled", "error": msg, "error_type": "Cancelled"}
    except DeepSegReconError as e:
        code = e.exit_code
        final = {"state": "failed", "error": str(e), "error_type": _error_type(e)}
        print(f"error: {e}", file=sys.stderr)
    except BaseException as e:  # a bug: keep the traceback in the log
        traceback.print_exc()
        code = EXIT_INTERNAL
        final = {"state": "failed", "error": f"internal error: {type(e).__name__}: {e}", "error_type": "DeepSegReconError"}
    finally:
        guard["armed"] = False
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    final.update(exit_code=code, elapsed_s=round(time.monotonic() - start, 2))
    try:
        if writing["cut"]:
            progress_file.write("\n")  # end the line a SIGTERM cut short, so the final line parses
        emit(final)
        progress_file.close()
    except OSError:
        pass
    if install_signals and previous is not None:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _watch_parent(token: CancelToken) -> None:
    """When the process named in ``DEEPSEGRECON_PARENT_PID`` (Slicer) ends, cancel the job; exit if the task has
    not stopped ``PARENT_GONE_GRACE_S`` seconds later (so a crashed Slicer leaves no fine-tune running)."""
    try:
        parent = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return

    def on_parent_gone() -> None:
        print(f"the process that started this job ({parent}) has ended: cancelling", file=sys.stderr, flush=True)
        try:
            token.cancel()
        except OSError:
            token._set = True
        time.sleep(PARENT_GONE_GRACE_S)
        os._exit(EXIT_CANCELLED)

    watch_process(parent, on_parent_gone)


def _error_type(e: BaseException) -> str:
    for cls in type(e).__mro__:
        if cls.__name__ in ERROR_TYPES:
            return cls.__name__
    return "DeepSegReconError"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m deepsegrecon.worker JOB_DIR", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    rc = main(sys.argv[1])
    os._exit(rc)  # do not wait for non-daemon threads a library may have left running
