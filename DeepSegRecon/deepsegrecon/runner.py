"""The public runner: one task on named inputs in this process, and the batch over many cases.

    from deepsegrecon import run, run_batch
    result = run("teeth", {"image": "cbct.nrrd"}, {"device": "cpu"}, progress=print)
    summary = run_batch("teeth", ["/data/cbcts"], "/data/out", shard="1/4")

The CLI (``deepsegrecon batch``), ``PythonSlicer`` scripts and the Slicer panel call the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .image import Image


def run(task: str, inputs: dict, params: dict | None = None, *, progress: Callable[[dict], None] | None = None,
        cancel=None, model=None):
    """Run ``task`` on ``inputs`` ({name: Image or path}) and return its result. ``progress`` gets event dicts
    (stage, fraction, elapsed_s, eta_s, message); ``cancel`` is a :class:`~deepsegrecon.task.CancelToken`;
    ``model`` an already checked :class:`~deepsegrecon.store.ModelEntry` (else ``params['model']`` / the default)."""
    from .io import read_image
    from .worker import run_inline

    images = {name: v if isinstance(v, Image) else read_image(Path(v).expanduser()) for name, v in inputs.items()}
    return run_inline(task, images, dict(params or {}), progress=progress, cancel=cancel, model=model)


def run_batch(task: str, inputs, output, params: dict | None = None, **options):
    """Run ``task`` on every case found in ``inputs`` into ``output``; see :func:`deepsegrecon.batch.run_batch`."""
    from .batch import run_batch as _run_batch

    return _run_batch(task, inputs, output, params, **options)
