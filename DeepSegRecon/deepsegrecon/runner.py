"""The public runner: one task on named inputs in this process (the weights found, checked and loaded, the device
resolved, progress and cancel wired); ``run_batch`` (:func:`deepsegrecon.batch.run_batch`) runs one over many cases.

    from deepsegrecon import run, run_batch
    result = run("teeth", {"image": "cbct.nrrd"}, {"device": "cpu"}, progress=print)
    summary = run_batch("teeth", ["/data/cbcts"], "/data/out", shard="1/4")

The CLI (``deepsegrecon batch``), ``PythonSlicer`` scripts and the Slicer panel call the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import ResourceError, resource_error
from .image import Image
from .progress import ProgressReporter
from .task import CancelToken, TaskContext, get_task


def run(task: str, inputs: dict, params: dict | None = None, *, progress: Callable[[dict], None] | None = None,
        cancel=None, model=None):
    """Run ``task`` on ``inputs`` ({name: Image or path}) and return its result. ``progress`` gets event dicts
    (stage, fraction, elapsed_s, eta_s, message); ``cancel`` is a :class:`~deepsegrecon.task.CancelToken`;
    ``model`` an already checked :class:`~deepsegrecon.store.ModelEntry` (else ``params['model']`` / the default)."""
    from .io import read_image

    images = {name: v if isinstance(v, Image) else read_image(Path(v).expanduser()) for name, v in inputs.items()}
    return run_inline(task, images, dict(params or {}), progress=progress, cancel=cancel, model=model)


def _resolve_device(name) -> str:
    name = str(name or "auto")
    if name == "cpu":  # no torch import needed
        return "cpu"
    from .device import resolve_device

    return str(resolve_device(name))


def check_model(task: str, version: str | None = None, store=None):
    """Find, checksum and read the weights of ``task``: every problem is a ModelError raised before any heavy work.
    Returns the :class:`~deepsegrecon.store.ModelEntry`, holding what it read: the task given it
    (``TaskContext.model``) takes those states instead of hashing and reading the files again."""
    from .store import ModelStore, check_task, load_state_dict

    store = store or ModelStore()
    entry = store.get(task, version)
    check_task(entry, task)
    store.verify(entry)
    for name in entry.files:
        if name.endswith((".pt", ".pth")):
            entry.loaded[name] = load_state_dict(entry, name, task=task)
    return entry


def model_for_job(task_name: str, images: dict, params: dict, store=None):
    """Check and return the weights a job will use: ``params['model']``, else the task's own choice for these inputs
    (:meth:`Task.model_version`), else the default version."""
    from .store import ModelStore

    task = get_task(task_name)
    store = store or ModelStore()
    version = params.get("model") or task.model_version(images, {**task.default_params(), **params}, store)
    return check_model(task.weights_task, version, store)


def run_inline(task_name: str, images: dict, params: dict, progress: Callable[[dict], None] | None = None,
               cancel: CancelToken | None = None, model=None):
    """Run ``task_name`` in this process: validate, resolve device and weights, run; returns the result.

    ``progress`` receives event dicts (stage, fraction, elapsed_s, eta_s, message). ``model`` is an
    already checked ModelEntry; otherwise, when the task declares ``uses_model = True`` or ``params``
    names a ``model`` version, the weights are checked here before the task runs.
    """
    task = get_task(task_name)
    params = task.parse_params(params)
    task.validate(images, params)
    cancel = cancel or CancelToken()
    cancel.raise_if_cancelled()
    device = _resolve_device(params.get("device", "auto" if task.uses_device else "cpu"))
    if "device" in params:
        params["device"] = device  # resolved once: the task finds "cpu" / "cuda:0", not "auto"
    if model is None and (task.uses_model or params.get("model")):
        model = model_for_job(task_name, images, params)
    if model is not None:
        params["model"] = model.version
    reporter = ProgressReporter(task.stages, progress)
    ctx = TaskContext(device=device, progress=reporter, cancel=cancel, model_dir=model.dir if model else None,
                      model=model)
    try:
        return task.run(images, params, ctx)
    except Exception as e:
        mapped = resource_error(e)  # out of memory (torch too) or disk full: exit 5
        if mapped is None or mapped is e:
            raise
        raise ResourceError(f"{task_name}: {mapped}") from e
