"""One interface for every method: segmentation, reconstruction and registration.

A :class:`Task` takes named input images and a parameter dict, reports progress through
``ctx.progress(stage, fraction)`` (optionally with ``extra={...}`` task-specific fields, see
:meth:`TaskContext.step`), checks ``ctx.cancel`` between steps, and returns a typed result.
Results save to and load from a folder, which is how they cross the worker's process boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Cancelled, InputError
from .params import Params


class CancelToken:
    """Set by the caller, checked by the task. Optionally backed by a flag file (for the worker)."""

    def __init__(self, flag_file: Path | None = None):
        self._set = False
        self.flag_file = Path(flag_file) if flag_file else None

    def cancel(self) -> None:
        self._set = True
        if self.flag_file:
            self.flag_file.touch()

    @property
    def cancelled(self) -> bool:
        if not self._set and self.flag_file is not None and self.flag_file.exists():
            self._set = True
        return self._set

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled by the user")


@dataclass
class TaskContext:
    device: str = "cpu"
    progress: Callable = field(default=lambda stage, fraction=0.0, message="", extra=None: None)
    cancel: CancelToken = field(default_factory=CancelToken)
    model_dir: Path | None = None  # resolved model version folder, if the task uses weights
    model: object = None  # the ModelEntry the runner checked (its files hashed once): see model_entry

    def model_entry(self, task: str, version: str | None = None):
        """This run's weights: the entry the runner checked, else the ``model_dir`` folder, else the store's
        ``version`` (``None``: its default)."""
        from .store import ModelStore, entry_from_dir

        if self.model is not None:
            return self.model
        if self.model_dir is not None:
            return entry_from_dir(self.model_dir)
        return ModelStore().get(task, version)

    def step(self, stage: str, fraction: float = 0.0, message: str = "", extra: dict | None = None) -> None:
        """Check for cancellation, then report progress. ``extra``: optional task-specific fields for the
        progress event (e.g. ``{"epoch": 3, "loss": 0.21, "val_dice": 0.84}``); a ``progress`` callable that
        takes only ``(stage, fraction, message)`` still works (the extra fields are then left out)."""
        self.cancel.raise_if_cancelled()
        self.report(stage, fraction, message, extra)

    def report(self, stage: str, fraction: float = 0.0, message: str = "", extra: dict | None = None) -> None:
        """Report progress (without the cancel check), passing ``extra`` where the sink accepts it."""
        if extra and _accepts_extra(self.progress):
            self.progress(stage, fraction, message, extra=extra)
        else:
            self.progress(stage, fraction, message)


def _accepts_extra(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "extra" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


@dataclass
class InputSpec:
    """What a task needs of one named input."""

    name: str
    ndim: int = 3
    required: bool = True
    description: str = ""


class Task:
    """Base class: subclasses set ``name``, ``inputs`` and implement :meth:`run`."""

    name: str = ""
    title: str = ""
    inputs: tuple = ()  # (InputSpec, ...)
    result_kind: str = "segmentation"
    params_type: type = Params  # the task's parameters (a Params dataclass)
    uses_model: bool = False  # needs weights from the model store: checked before the run
    model_task: str = ""  # the store's task name for its weights (default: the task's name)
    uses_device: bool = True  # False: no torch device (spares the torch import)
    stages: dict | None = None  # progress stages and their weights (see progress.ProgressReporter)

    @property
    def weights_task(self) -> str:
        return self.model_task or self.name

    def default_params(self) -> dict:
        """The defaults of the task's Params; none for a plug-in task that declares no Params of its own (its
        device then defaults to "auto", or to "cpu" with ``uses_device = False``)."""
        return self.params_type().to_dict() if self.params_type is not Params else {}

    def parse_params(self, params=None) -> Params | dict:
        """``params`` checked against :attr:`params_type` (unknown keys and wrong types refused), defaults filled.
        A task that declares no Params of its own (a plug-in) gets its ``default_params`` merged, unchecked."""
        if self.params_type is Params:
            return {**self.default_params(), **dict(params or {})}
        return self.params_type.parse(params, self.name)

    def validate(self, images: dict, params: dict) -> None:
        """Refuse bad input with a message that names the problem (before any heavy work)."""
        from .validate import check_image

        known = {s.name for s in self.inputs}
        unknown = set(images) - known
        if unknown:
            raise InputError(f"{self.name} does not take inputs {sorted(unknown)}; it takes {sorted(known)}")
        for spec in self.inputs:
            if spec.name not in images:
                if spec.required:
                    raise InputError(f"{self.name} needs the input '{spec.name}' ({spec.description or 'image'})")
                continue
            check_image(images[spec.name], spec.name, ndim=spec.ndim)

    def model_version(self, images: dict, params: dict, store) -> str | None:
        """The model version for this job when ``params`` names none (None: the store's default)."""
        return None

    def run(self, images: dict, params: dict, ctx: TaskContext):
        raise NotImplementedError


_REGISTRY: dict = {}


def register(cls):
    """Class decorator: make a task available by name to the worker, CLI and Slicer modules."""
    _REGISTRY[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    if name not in _REGISTRY:  # import the capability that owns it (every one for an unknown name)
        from .capability import import_task_modules

        import_task_modules(name)
    if name not in _REGISTRY:
        raise InputError(f"unknown task '{name}'; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
