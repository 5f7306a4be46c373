"""Errors the engine raises on purpose, each with the worker/CLI exit code it maps to."""

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: unexpected exception
EXIT_INPUT = 2  # bad input image, parameter or path
EXIT_MODEL = 3  # missing, corrupt or wrong-task weights
EXIT_CANCELLED = 4  # the user cancelled
EXIT_RESOURCES = 5  # not enough memory or disk


class DeepSegReconError(Exception):
    exit_code = EXIT_INTERNAL


class InputError(DeepSegReconError, ValueError):
    """The input (image, parameter, path) cannot be used; the message names the problem."""

    exit_code = EXIT_INPUT


class ModelError(DeepSegReconError):
    """Weights are missing, corrupt, fail their checksum or belong to another task."""

    exit_code = EXIT_MODEL


class Cancelled(DeepSegReconError):
    exit_code = EXIT_CANCELLED


class ResourceError(DeepSegReconError):
    """The job would need more memory or disk than is available."""

    exit_code = EXIT_RESOURCES


# ------------------------------------------------------------------ one map for the CLI and the worker
def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError, or an allocator RuntimeError (CPU or GPU)."""
    if isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def is_disk_full(e: BaseException) -> bool:
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_message(path=None) -> str:
    """'the disk is full: ... (N MiB free on the disk of PATH)'."""
    import os
    import shutil

    where = os.path.abspath(str(path)) if path else os.getcwd()
    probe = where
    while probe and not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return f"the disk is full: could not write {where} ({free}); free some space or choose another output folder"


def resource_error(e: BaseException):
    """The :class:`ResourceError` (exit 5) for a disk-full or out-of-memory error, else None."""
    if isinstance(e, ResourceError):
        return e
    if is_disk_full(e):
        return ResourceError(disk_full_message(getattr(e, "filename", None)))
    if is_out_of_memory(e):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return ResourceError(f"out of memory ({first}); try a smaller image, another device or free memory")
    return None
