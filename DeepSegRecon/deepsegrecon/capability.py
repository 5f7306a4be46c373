"""What each capability subpackage declares about itself (``CAPABILITY`` in its ``__init__.py``), and the one
registry over them: which package owns a task, its CLI, its training recipe and its label hook. Packages are
imported by name when first needed, so no engine module imports a capability."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

PACKAGES = ("teeth", "slices", "cbct", "xray", "brain")  # the one list of capabilities


@dataclass(frozen=True)
class Capability:
    """``tasks``: the task names registered by importing ``task_module``; ``cli``: the module with ``COMMANDS``
    and ``add_parsers(sub)``; ``recipes``: task -> "module:attribute" of its training recipe; ``batch_adapters``:
    task -> "module:class" of its :class:`deepsegrecon.batch.Adapter`; ``region_label_hooks``: task ->
    "module:function" turning overlapping region segments into its stored label; ``params``: task ->
    "module:class" of its typed parameters, in a module without torch (hosts check a job with it before starting
    it). Modules are relative to the package."""

    package: str
    tasks: tuple
    task_module: str = "task"
    cli: str | None = "cli"
    recipes: dict = field(default_factory=dict)
    batch_adapters: dict = field(default_factory=dict)
    region_label_hooks: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def module(self, name: str) -> str:
        return f"deepsegrecon.{self.package}.{name}"


def capabilities() -> list:
    return [importlib.import_module(f"deepsegrecon.{p}").CAPABILITY for p in PACKAGES]


def capability_of(task: str) -> Capability | None:
    return next((c for c in capabilities() if task in c.tasks), None)


def import_task_modules(task: str | None = None) -> None:
    """Import the module that registers ``task`` (every capability's when ``task`` is None or unknown)."""
    owner = capability_of(task) if task else None
    for c in [owner] if owner else capabilities():
        importlib.import_module(c.module(c.task_module))


def cli_modules() -> list:
    return [importlib.import_module(c.module(c.cli)) for c in capabilities() if c.cli]


def recipe_ref(task: str) -> str | None:
    """``"deepsegrecon.<package>.<module>:<attribute>"`` of the task's training recipe, or None."""
    c = capability_of(task)
    ref = c.recipes.get(task) if c else None
    return c.module(ref) if ref else None


def trainable_tasks() -> list:
    return sorted(t for c in capabilities() for t in c.recipes)


def batch_tasks() -> list:
    return [t for c in capabilities() for t in c.batch_adapters]


def batch_adapter(task: str):
    """The task's batch adapter class, or None (a task without one gets the default)."""
    return _attribute(task, "batch_adapters")


def region_label_hook(task: str):
    """The task's hook ``(seg_name, names, known, read_mask) -> (label array, {name: value}) or None``, or None."""
    return _attribute(task, "region_label_hooks")


def params_type(task: str):
    """The task's :class:`deepsegrecon.params.Params` class (its module imports no torch), or None."""
    return _attribute(task, "params")


def _attribute(task: str, table: str):
    c = capability_of(task)
    ref = getattr(c, table).get(task) if c else None
    if ref is None:
        return None
    module, name = c.module(ref).split(":")
    return getattr(importlib.import_module(module), name)
