"""File-system helpers: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError


def check_writable_dir(folder: Path) -> Path:
    """Make sure ``folder`` exists or can be created, and that we may write in it."""
    folder = Path(folder)
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output location {folder} is inside a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        raise InputError(f"output folder {parent} is read-only: choose a folder you can write to")
    return folder


def _can_create_in(folder: Path) -> bool:
    """os.access says yes to root everywhere; an immutable or read-only mount still refuses."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ""):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable_dir(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix or "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the user's umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_text(obj, indent: int = 1) -> str:
    """Valid JSON for a report or metrics file: NaN and infinities become null, numpy values plain ones;
    ``allow_nan=False`` makes anything left that JSON cannot hold fail here, never write ``NaN``."""
    return json.dumps(_plain(obj), indent=indent, allow_nan=False)


def _plain(o):
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if hasattr(o, "tolist") and not isinstance(o, (str, bytes)):  # numpy scalar or array
        return _plain(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


LOW_DISK = 8 * 2**20  # bytes: a writer that fails with less free space than this failed for want of disk
STAGING = ".staging-"


def disk_full_error(e: BaseException, folder):
    """A :class:`ResourceError` naming the disk when ``e`` is ENOSPC/EDQUOT, or any error while the disk of
    ``folder`` is (nearly) full: ITK and VTK writers do not say why they failed. Otherwise None."""
    from .errors import Cancelled, ResourceError, disk_full_message, is_disk_full

    if isinstance(e, (ResourceError, Cancelled)) or not isinstance(e, Exception):
        return None
    if is_disk_full(e):
        return ResourceError(disk_full_message(getattr(e, "filename", None) or folder))
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        low = shutil.disk_usage(probe).free < LOW_DISK
    except OSError:
        low = False
    return ResourceError(disk_full_message(folder)) if low else None


def _pid_alive(pid: int) -> bool:
    from .processes import pid_alive  # psutil: os.kill(pid, 0) would send CTRL_C_EVENT on Windows

    return pid_alive(pid)


def remove_stale_staging(out_dir: Path) -> list:
    """Remove staging folders that killed runs left in ``out_dir``: ``.staging-PID-*`` of a process that is gone,
    and older ``.staging-XXXXXXXX`` ones (no PID) made before this process started. Returns them."""
    removed = []
    try:
        entries = [p for p in Path(out_dir).iterdir() if p.name.startswith(STAGING) and p.is_dir()]
    except OSError:
        return removed
    for d in entries:
        rest = d.name[len(STAGING):]
        pid, _, suffix = rest.partition("-")
        if pid.isdigit() and len(suffix) == 8:  # ours: .staging-PID-XXXXXXXX
            stale = int(pid) != os.getpid() and not _pid_alive(int(pid))
        else:
            stale = len(rest) == 8 and _older_than_this_process(d)
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _older_than_this_process(path: Path) -> bool:
    import psutil

    try:
        return path.stat().st_mtime < psutil.Process().create_time() - 1
    except (OSError, psutil.Error):
        return False


@contextlib.contextmanager
def staged_outputs(out_dir: Path):
    """Yield a hidden staging folder inside ``out_dir``; on success its entries move into ``out_dir``.

    Each entry is moved with ``os.replace`` (atomic per entry on one file system); on failure the
    staging folder is removed and ``out_dir`` is left as it was (created only if it did not exist).
    Staging folders left by killed runs are removed first; a failure on a full disk is a ResourceError.
    """
    out_dir = Path(out_dir)
    check_writable_dir(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=out_dir))
    try:
        yield stage
        for entry in sorted(stage.iterdir()):
            target = out_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        full = disk_full_error(e, out_dir)
        if full is not None:
            raise full from e
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


STEM_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".dcm")


def output_stem(path) -> str:
    """Name of the outputs for an input: the file name without its image suffix; a folder's own name."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name or "volume"
    name = p.name
    for suffix in STEM_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return p.stem or name
