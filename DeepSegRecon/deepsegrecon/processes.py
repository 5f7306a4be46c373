"""Start, watch and stop background processes the same way on Windows, macOS and Linux.

- :func:`popen_options`: how a worker is started (Windows: no console window; elsewhere: its own session);
- :func:`terminate_tree`: stop a process and everything it started (terminate, then kill after a grace period),
  with ``psutil`` on every platform and ``os.killpg`` on POSIX only;
- :func:`watch_process`: call a function when a process (the application that started a worker) has ended;
- :func:`pid_alive`: whether a process id is in use (``os.kill(pid, 0)`` would send CTRL_C_EVENT on Windows).

On Windows ``PythonSlicer.exe`` is a launcher that starts the real Python as its child, so stopping only the
launcher would leave the worker running: the whole tree is stopped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

CREATE_NO_WINDOW = 0x08000000  # subprocess.CREATE_NO_WINDOW, which only Windows' subprocess defines


def is_windows(platform: str | None = None) -> bool:
    return (platform or sys.platform).startswith("win")


def popen_options(platform: str | None = None) -> dict:
    """``subprocess.Popen`` keyword arguments for a background worker on ``platform`` (default ``sys.platform``).

    Windows: ``CREATE_NO_WINDOW``, so no console window opens (and closing one cannot kill the job); the worker and
    the processes it starts share that hidden console. Elsewhere: a new session, so a Ctrl-C in the terminal that
    started Slicer does not reach the worker, and its process group can be stopped as a whole.
    """
    if is_windows(platform):
        return {"creationflags": CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _descendants(proc) -> list:
    """psutil.Process objects of everything ``proc`` (a Popen) started and that still runs; [] if it has ended."""
    if proc.poll() is not None:  # ended (and reaped): its pid may belong to another process by now
        return []
    try:
        import psutil
    except ImportError:  # every module's requirements include psutil; without it only proc itself is stopped
        return []
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _each(procs, method: str) -> None:
    for p in procs:
        with contextlib.suppress(Exception):  # gone already, or not ours to stop
            getattr(p, method)()


def _wait(proc, children, timeout: float) -> list:
    """Wait up to ``timeout`` s in all for ``proc`` and ``children`` to end; the children still alive."""
    end = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)  # through Popen, so its exit code is kept (psutil's wait would reap it)
    if not children:
        return []
    import psutil

    return psutil.wait_procs(children, timeout=max(0.0, end - time.monotonic()))[1]


def terminate_tree(proc, timeout: float = 0.4, platform: str | None = None) -> None:
    """Stop ``proc`` (a ``subprocess.Popen``) and every process it started.

    All are asked to terminate (SIGTERM on POSIX, ``TerminateProcess`` on Windows); what still runs after
    ``timeout`` s is killed. On POSIX the process group of ``proc`` (started with :func:`popen_options`) is killed
    last, for children whose own parent has ended already. Never raises for processes that are gone.
    """
    children = _descendants(proc)  # before anything stops: an orphan can no longer be found through its parent
    _each([proc] + children, "terminate")
    alive = _wait(proc, children, timeout)
    if proc.poll() is None or alive:
        _each([proc] + alive, "kill")
        _wait(proc, alive, timeout)
    if not is_windows(platform):
        import signal

        with contextlib.suppress(OSError):  # the group is gone already (or it was never a group of its own)
            os.killpg(proc.pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as ended)."""
    import psutil

    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, owned by someone else
        return True


def watch_process(pid: int, on_gone: Callable[[], None], interval: float = 1.0) -> threading.Thread:
    """Call ``on_gone()`` once, from a daemon thread, when the process ``pid`` has ended (or is a zombie).

    The process is identified by its id and start time, so a new process that gets the same id does not count.
    """
    import psutil

    try:
        target = psutil.Process(int(pid))
    except psutil.Error:
        target = None

    def running() -> bool:
        try:
            return target.is_running() and target.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while target is not None and running():
            time.sleep(interval)
        on_gone()

    thread = threading.Thread(target=watch, name=f"deepsegrecon-watch-{pid}", daemon=True)
    thread.start()
    return thread
