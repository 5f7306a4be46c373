"""Annotate-then-fine-tune, scene side: corrected segmentations -> training cases -> a fine-tuned model version.

MRML only (``slicer-core`` wheel or 3D Slicer), no Qt; the "Improve the model" panel section of every segmentation
module calls these methods (a QTimer calls :meth:`TrainingLogic.poll`) and the tests call the same ones.
:class:`TrainingLogic` is the one entry point; its training-set methods are in :mod:`.training_set`, its curves in
:mod:`.curves`, the model selection in :mod:`.selection`; the job and the versions are here.

* :meth:`TrainingLogic.add_to_training_set` writes the current input volume(s) and the user-corrected segmentation
  as one case folder (:func:`deepsegrecon.training.cases.write_case`: all of it or nothing) in the training-set
  folder, default ``$DEEPSEGRECON_HOME/training/<task>/``. An optional ROI (a segment ID of the segmentation, a
  labelmap volume node, a segmentation node or a markups ROI box) marks the region the user reviewed; it is saved
  as the case's ROI mask and training leaves every voxel outside it out of the loss (the label there is kept as
  it was, never turned into background). Bad input raises :class:`InputError` before anything is written and
  adds no node to the scene.

  Geometry: the label is taken on the grid of the (first) input volume. A segmentation whose own grid is that
  grid, or a whole-voxel shift of it (Slicer crops a segmentation to its content), is copied exactly; one made on
  another grid (e.g. oversampled in the Segment Editor) is resampled onto the volume by nearest neighbour, as
  Slicer's "Export to labelmap" with a reference volume does, and the case records it (``meta.label_resampled``).
  A segmentation lying outside the volume (none, or more than 0.5 % of its labelled voxels inside the volume's
  box) was drawn on another image and is refused.

* :meth:`TrainingLogic.start_finetune` runs the engine's ``finetune`` task (``train``: :meth:`start_training`) in a
  worker process through :class:`~deepsegrecon.scene.logic.TaskLogic`. Every epoch line of the job's progress
  (``epoch``, ``loss``, ``val_dice``) becomes a row of a ``vtkMRMLTableNode`` shown by a ``vtkMRMLPlotChartNode``
  with one ``vtkMRMLPlotSeriesNode`` for the loss and one for the validation Dice; both are created when the job
  starts and fill in on each :meth:`poll`. On success the table is made to match the result's full history and
  the new version is listed by :meth:`model_versions` (it is not made active by itself: the user compares and
  chooses it with :meth:`set_active_version`). On cancel or failure the table and chart stay in the scene as the
  user's record, renamed "... (cancelled)" / "... (failed)"; the engine writes a version into the model store only
  on success, and nothing here writes to or removes from the store, so older versions are always kept.

* :meth:`TrainingLogic.set_active_version` (rollback): the chosen version is kept in the scene (a singleton
  ``vtkMRMLScriptedModuleNode``, saved with the scene) and :class:`~deepsegrecon.scene.logic.TaskLogic` passes it
  as ``params["model"]`` to the next segmentation run of that task unless the run names a model itself.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import DeepSegReconError, InputError, ModelError
from ..results import ModelResult
from ._mrml import check_scene
from .curves import TrainingCurves, as_number, epoch_row
from .logic import TaskLogic, _idle_status, poll_until_done
from .selection import active_model_version, set_active_model_version
from .training_set import SAFE_NAME, TrainingSet

ENGINE_TRAINING_TASKS = ("finetune", "train")


def describe_version(entry) -> str:
    """One line about a store entry: built-in / fine-tuned from, validation Dice, its description."""
    m = entry.manifest or {}
    parts = []
    if entry.builtin:
        parts.append("built-in")
    if m.get("base_version"):
        parts.append(f"fine-tuned from {m['base_version']}")
    metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
    for key, label in (("best_val_dice", "validation Dice"), ("val_dice", "validation Dice"),
                       ("mean_dice", "mean Dice")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            parts.append(f"{label} {value:.3f}")
            break
    if m.get("created"):
        parts.append(str(m["created"])[:16].replace("T", " "))
    if "error" in m:
        parts.append(f"unusable: {m['error']}")
    text = str(m.get("description") or "").strip()
    if text:
        first = re.split(r"(?<=[.;:])\s", text, maxsplit=1)[0]
        parts.append(first if len(first) <= 120 else first[:117] + "...")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ progress lines
class _ProgressTail:
    """New complete JSON lines of a job's ``progress.jsonl`` since the last read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.buffer = b""

    def read(self) -> list:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


class _TrainingJob(TaskLogic):
    """TaskLogic for a job without input volumes whose result is a model version (nothing to import).

    Every progress line is read (``TaskLogic`` keeps only the latest), including the lines written just before
    the job ends: :meth:`_finish` reads them before the job folder is removed."""

    needs_inputs = False
    uses_model_selection = False

    def __init__(self, scene, task_name, on_events: Callable[[list], None], **kw):
        super().__init__(scene, task_name, **kw)
        self._on_events = on_events
        self._tail: _ProgressTail | None = None

    def start(self, inputs: dict, params: dict, output_node=None) -> None:
        from ..worker import PROGRESS

        super().start({}, params)
        self._tail = _ProgressTail(self._handle.job_dir / PROGRESS)

    def poll(self) -> dict:
        self._drain()
        return super().poll()

    def _finish(self, handle) -> None:
        try:
            self._drain()
        finally:
            self._tail = None
            super()._finish(handle)

    def _drain(self) -> None:
        if self._tail is None:
            return
        events = self._tail.read()
        if events:
            self._on_events(events)

    def _import_result(self, result) -> list:
        if isinstance(result, ModelResult):
            return []
        raise DeepSegReconError(f"a training job returned a {type(result).__name__}, not a model version")


# ------------------------------------------------------------------------------------------ the logic
class TrainingLogic(TrainingSet, TrainingCurves):
    """Training set, fine-tuning jobs and model versions of one segmentation task (``task_name``, e.g. "teeth").

    ``training_root``: the training-set folder (default ``$DEEPSEGRECON_HOME/training/<task>``, home default
    ``~/.deepsegrecon``); ``python`` / ``job_root`` / ``plugins`` / ``env``: as :class:`TaskLogic` (worker
    interpreter, job folders, test-only task modules, extra environment); ``store``: the
    :class:`~deepsegrecon.store.ModelStore` to list (default: the user store and the built-in one, which is
    where the worker writes); ``modalities``: the input names every case must have (default: those of the cases
    already in the training set).
    """

    finetune_task = "finetune"  # worker task names (the engine's deepsegrecon.training.jobs)
    train_task = "train"

    def __init__(self, scene, task_name: str, training_root=None, python: str = None, job_root=None,
                 plugins=(), env=None, store=None, modalities=None):
        check_scene(scene)
        if not task_name or not SAFE_NAME.match(str(task_name)):
            raise InputError(f"'{task_name}' is not a task name")
        self.scene = scene
        self.task_name = str(task_name)
        if training_root is None:
            home = os.environ.get("DEEPSEGRECON_HOME")
            base = Path(home).expanduser() if home else Path.home() / ".deepsegrecon"
            training_root = base / "training" / self.task_name
        self.training_root = Path(training_root).expanduser()
        self.modalities = list(modalities) if modalities else None
        self._store = store
        self._plugins = tuple(str(p) for p in plugins)
        self._job = _TrainingJob(scene, self.finetune_task, self._on_events, python=python, job_root=job_root,
                                 plugins=plugins, env=env)
        self.table_node = None
        self.chart_node = None
        self.series_nodes: dict = {}  # "loss" / "val_dice" -> vtkMRMLPlotSeriesNode
        self.history: list = []  # table rows of the current / last job: epoch (running), part, part_epoch, ...
        self._rows: dict = {}  # (part, epoch of the part) -> row
        self.result: ModelResult | None = None  # of the last succeeded job
        self.new_version: str | None = None  # the version the current / last job writes
        self.base_version: str | None = None
        self.last_case: dict | None = None  # what the last add_to_training_set wrote
        self._status = _idle_status()
        self._job_state = "idle"
        self._planned_epochs = None

    # ----------------------------------------------------------------------------------------- the store
    @property
    def store(self):
        if self._store is None:
            from ..store import ModelStore

            return ModelStore()  # roots from the environment at the time of the call, like the worker's
        return self._store

    def _entries(self) -> list:
        return [e for e in self.store.list(self.task_name) if e.task == self.task_name]

    def model_versions(self) -> list:
        """[(version, description)] of the installed versions of the task, the store's default version first."""
        entries = self._entries()
        if not entries:
            return []
        try:
            default = self.store.get(self.task_name).version
        except ModelError:
            default = None
        entries.sort(key=lambda e: e.version != default)  # stable: the rest stays in version order
        return [(e.version, describe_version(e)) for e in entries]

    def active_version(self) -> str | None:
        """The version the next segmentation run uses: the one chosen in the scene, else the store's default."""
        chosen = active_model_version(self.scene, self.task_name)
        if chosen and any(e.version == chosen for e in self._entries()):
            return chosen
        try:
            return self.store.get(self.task_name).version
        except ModelError:
            return None

    def set_active_version(self, version: str | None) -> str:
        """Use ``version`` for the next segmentation runs of the task in this scene (also a rollback to an older
        version); None goes back to the store's default. Returns the version now active."""
        if version is not None:
            version = str(version)
            known = [e.version for e in self._entries()]
            if version not in known:
                raise InputError(f"task '{self.task_name}' has no model version '{version}'; installed versions: "
                                 f"{', '.join(known) or 'none'}")
        set_active_model_version(self.scene, self.task_name, version)
        return self.active_version()

    def _label_map(self) -> dict | None:
        """{name: value} of the active model's labels, if its manifest has them."""
        from ..training.labels import read_label_map

        version = self.active_version()
        if version is None:
            return None
        try:
            labels = self.store.get(self.task_name, version).manifest.get("labels")
            return read_label_map(labels) if isinstance(labels, dict) and labels else None
        except (ModelError, InputError):
            return None

    # ----------------------------------------------------------------------------------------- fine-tuning
    @property
    def running(self) -> bool:
        return self._job.running

    def default_version_name(self, base_version: str | None) -> str:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{base_version}-ft-{stamp}" if base_version else f"trained-{stamp}"
        taken = {e.version for e in self._entries()}
        out, n = name, 2
        while out in taken:
            out, n = f"{name}-{n}", n + 1
        return out

    def start_finetune(self, base_version: str | None = None, new_name: str | None = None,
                       minutes: float | None = None, epochs: int | None = None, device: str = "auto",
                       val_fraction: float | None = None, seed: int | None = None,
                       options: dict | None = None) -> str:
        """Fine-tune ``base_version`` (default: the active version) on the training set into ``new_name``
        (default ``<base>-ft-<date-time>``) for ``minutes`` or ``epochs``; returns the new version's name.
        ``options``: further task parameters, passed to the worker task as they are.

        Checked before anything starts (InputError / ModelError, no node added): a job already running, an empty
        training set, an unknown base, a taken or invalid new name, no or a bad budget."""
        if base_version is None:
            base_version = self.active_version()
            if base_version is None:
                raise ModelError(f"no {self.task_name} model is installed to fine-tune; import one first")
        base_version = str(base_version)
        known = [e.version for e in self._entries()]
        if base_version not in known:
            raise ModelError(f"task '{self.task_name}' has no model version '{base_version}' to fine-tune; installed "
                             f"versions: {', '.join(known) or 'none'}")
        return self._start(self.finetune_task, base_version, new_name, minutes, epochs, device, val_fraction, seed,
                           options)

    def start_training(self, new_name: str | None = None, minutes: float | None = None,
                       epochs: int | None = None, device: str = "auto", val_fraction: float | None = None,
                       seed: int | None = None, options: dict | None = None) -> str:
        """Train a new version from scratch on the training set (the engine's ``train`` task); as
        :meth:`start_finetune` otherwise."""
        return self._start(self.train_task, None, new_name, minutes, epochs, device, val_fraction, seed, options)

    def _start(self, worker_task, base_version, new_name, minutes, epochs, device, val_fraction, seed,
               options) -> str:
        from ..store import _check_name

        if self.running:
            raise InputError(f"a {self.task_name} training job is already running: cancel it or wait for it to end")
        cases = self.case_count()
        if cases == 0:
            raise InputError(f"the {self.task_name} training set ({self.training_root}) has no cases yet: add "
                             "corrected segmentations with 'Add to training set' first")
        new_name = self.default_version_name(base_version) if not new_name else _check_name(new_name, "version")
        if any(e.version == new_name for e in self._entries()):
            raise ModelError(f"model {self.task_name} {new_name} already exists; choose another name")
        params = {k: v for k, v in dict(options or {}).items()}
        params.update({"task": self.task_name, "cases": str(self.training_root), "name": new_name,
                       "device": str(device or "auto")})
        if base_version is not None:
            params["base"] = base_version
        if minutes is None and epochs is None:
            raise InputError("give a training budget: minutes or epochs")
        if minutes is not None:
            m = as_number(minutes)
            if m is None or m <= 0:
                raise InputError(f"the time budget must be a positive number of minutes, got {minutes!r}")
            params["minutes"] = m
        if epochs is not None:
            e = as_number(epochs)
            if e is None or e < 1 or e != int(e):
                raise InputError(f"epochs must be a whole number of at least 1, got {epochs!r}")
            params["epochs"] = int(e)
        if val_fraction is not None:
            v = as_number(val_fraction)
            if v is None or not 0 <= v < 1:
                raise InputError(f"the validation fraction must be in [0, 1), got {val_fraction!r}")
            params["val_fraction"] = v
        if seed is not None:
            params["seed"] = int(seed)

        self._job.task_name = worker_task
        from ..training.jobs import PLUGIN  # the worker imports it to register the engine's training tasks

        self._job.plugins = self._plugins + ((PLUGIN,) if worker_task in ENGINE_TRAINING_TASKS
                                             and PLUGIN not in self._plugins else ())
        self._job.start({}, params)
        self.history = []
        self._rows = {}
        self.result = None
        self.new_version = new_name
        self.base_version = base_version
        self._planned_epochs = params.get("epochs")
        self._job_state = "running"
        self._status = {**_idle_status(), "state": "running", "stage": "starting"}
        try:
            self._create_curve_nodes(new_name, base_version)
        except BaseException:
            self._job.cancel()
            raise
        return new_name

    # ---- polling
    def poll(self) -> dict:
        """The job's state (as :meth:`TaskLogic.poll`) plus ``epoch``, ``epochs``, ``loss``, ``val_dice`` (latest
        row), ``rows`` (table rows) and ``version`` (the new version; written into the store only on success)."""
        if self._job_state == "running":
            status = self._job.poll()
            if status["state"] == "running" and not status.get("stage"):  # a line without a stage (the last one)
                status["stage"] = self._status.get("stage")
            if status["state"] == "idle":  # cancelled through the job logic directly
                status = {**status, "state": "cancelled", "error": "cancelled"}
            if status["state"] != "running":
                status = self._end(status)
            self._status = status
        return self._with_curves(self._status)

    def _end(self, status: dict) -> dict:
        state = status["state"]
        if state == "succeeded":
            result = self._job.result
            if isinstance(result, ModelResult):
                self.result = result
                history = [r for r in (epoch_row({**h, "event": "epoch"}) for h in (result.history or [])
                                       if isinstance(h, dict)) if r is not None]
                if history:  # the result's history is the full record: the table shows exactly it
                    self._rows = {}
                    self._add_rows(history)
                if result.version:
                    self.new_version = result.version
            if not self._version_installed():
                status = {**status, "state": "failed", "error_type": "ModelError",
                          "error": f"the job ended but model {self.task_name} {self.new_version} is not in the "
                                   f"model store {self.store.root}"}
        self._job_state = status["state"]
        self._finish_curves(status["state"])
        return status

    def cancel(self) -> None:
        """Stop the training job (within about 2 s); no model version is written. The curves stay."""
        if self._job_state != "running":
            return
        if self.poll()["state"] != "running":  # it has just ended: nothing to cancel
            return
        self._job.cancel()
        status = {**self._job.poll(), "state": "cancelled"}
        if self._version_installed():  # it finished between the last poll and the cancel
            status.update(state="succeeded", error=None, error_type=None,
                          message="the job finished before it could be cancelled")
        self._status = self._end(status)

    def _version_installed(self) -> bool:
        return self.new_version is not None and any(e.version == self.new_version for e in self._entries())

    def wait(self, timeout: float | None = None, on_progress: Callable[[dict], None] | None = None,
             poll_interval: float = 0.2) -> dict:
        """Poll until the job ends or ``timeout`` seconds pass (then the state is still "running")."""
        return poll_until_done(self.poll, timeout, on_progress, poll_interval,
                               keys=("state", "fraction", "stage", "message", "rows"))


