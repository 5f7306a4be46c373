"""File-system helpers: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def staged_outputs(out_dir: Path):
    """Yield a hidden staging folder inside ``out_dir``; on success its entries move into ``out_dir``.

    Each entry is moved with ``os.replace`` (atomic per entry on one file system); on failure the
    staging folder is removed and ``out_dir`` is left as it was (created only if it did not exist).
    """
    out_dir = Path(out_dir)
    check_writable_dir(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield stage
        for entry in sorted(stage.iterdir()):
            target = out_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
