"""Annotate-then-fine-tune, scene side: corrected segmentations -> training cases -> a fine-tuned model version.

MRML only (``slicer-core`` wheel or 3D Slicer), no Qt; the "Improve the model" panel section of every segmentation
module calls these methods (a QTimer calls :meth:`TrainingLogic.poll`) and the tests call the same ones.

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

import numpy as np

from ..errors import DeepSegReconError, InputError, ModelError
from ..image import Image
from ..results import ModelResult
from ._mrml import check_scene, np_matrix, slicer_module, vtk_matrix, world_matrix_of
from .logic import TaskLogic, _idle_status, poll_until_done
from .segmentations import BINARY_LABELMAP, segmentation_node_to_labelmap
from .selection import active_model_version, set_active_model_version
from .volumes import volume_node_to_image

OUTSIDE_TOLERANCE = 0.005  # fraction of labelled voxels that may lie outside the volume (edge rounding)
TABLE_COLUMNS = ("epoch", "loss", "val_dice", "part", "part_epoch")
ENGINE_TRAINING_TASKS = ("finetune", "train")
_SAFE = re.compile(r"[^A-Za-z0-9_.+\-]+")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")


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


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def epoch_row(event: dict) -> dict | None:
    """{"part", "epoch", "loss", "val_dice"} of an end-of-epoch progress event, else None.

    An end-of-epoch event has an integer ``epoch`` and a ``loss`` (or ``"event": "epoch"``); the per-batch
    ``"event": "iteration"`` lines also name the epoch but are not rows. ``part``: the network being trained,
    for tasks with several trained in turn (teeth: stage1, stage2; their epochs each count from 1), else "".
    """
    if not isinstance(event, dict) or event.get("state"):
        return None
    fields = event
    for key in ("metrics", "extra", "data"):  # the fields may come nested
        if "epoch" not in fields and isinstance(event.get(key), dict):
            fields = {**event[key], "event": event.get("event")}
    kind = fields.get("event")
    if kind not in (None, "epoch"):
        return None
    epoch = _number(fields.get("epoch"))
    if epoch is None or epoch != int(epoch) or (kind is None and "loss" not in fields):
        return None
    return {"part": str(fields.get("part") or ""), "epoch": int(epoch), "loss": _number(fields.get("loss")),
            "val_dice": _number(fields.get("val_dice"))}


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
class TrainingLogic:
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
        if not task_name or not _SAFE_NAME.match(str(task_name)):
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

    # ----------------------------------------------------------------------------------------- training set
    @property
    def training_folder(self) -> Path:
        return self.training_root

    def case_names(self) -> list:
        """Names of the cases in the training-set folder (sub-folders with a ``case.json``), sorted."""
        from ..training.cases import CASE_MANIFEST

        root = self.training_root
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "_")) and (p / CASE_MANIFEST).is_file())

    def case_count(self) -> int:
        return len(self.case_names())

    def required_modalities(self) -> list | None:
        """The input names a case must have: ``modalities`` if given, else those of the first existing case."""
        if self.modalities:
            return list(self.modalities)
        from ..training.cases import CASE_MANIFEST

        for name in self.case_names():
            try:
                inputs = json.loads((self.training_root / name / CASE_MANIFEST).read_text(encoding="utf-8"))["inputs"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(inputs, dict) and inputs:
                return list(inputs)
        return None

    def add_to_training_set(self, inputs: dict, segmentation_node, roi=None, case_name: str = None,
                            overwrite: bool = False) -> Path:
        """Write ``inputs`` ({modality: volume node}) and ``segmentation_node`` as a new training case; its folder.

        ``roi``: the reviewed region: a segment ID of ``segmentation_node`` (that segment is the region, not a
        label), a labelmap volume node (non-zero voxels), another segmentation node (all its segments), or a
        markups ROI node (the box); None: the whole volume was reviewed. ``case_name``: the folder name (default
        ``<volume name>-<date-time>``). Raises :class:`InputError` with nothing written and no node added for an
        empty segmentation, a segmentation not on the volume, a missing modality, an empty or outside ROI, or
        segments the model does not know.
        """
        from ..training.cases import write_case

        slicer = slicer_module()
        images, ref_node, ref = self._case_images(inputs)

        # ---- the label, on the grid of the first input
        if segmentation_node is None or not isinstance(segmentation_node, slicer.vtkMRMLSegmentationNode):
            raise InputError("choose the corrected segmentation to add (a segmentation node)")
        if segmentation_node.GetScene() is not self.scene:
            raise InputError(f"segmentation '{segmentation_node.GetName()}' is not in this scene")
        seg_name = segmentation_node.GetName()
        segmentation = segmentation_node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if not ids:
            raise InputError(f"segmentation '{seg_name}' is empty: it has no segments")
        roi_segment = None
        if isinstance(roi, str):
            if roi not in ids:
                raise InputError(f"segmentation '{seg_name}' has no segment '{roi}' to use as the reviewed region; "
                                 f"its segments: {', '.join(ids)}")
            roi_segment = roi
        label_ids = [i for i in ids if i != roi_segment]
        if not label_ids:
            raise InputError(f"segmentation '{seg_name}' has no segment besides the reviewed-region segment "
                             f"'{roi_segment}'")
        own, _ = segmentation_node_to_labelmap(segmentation_node)  # the segmentation's own grid, in world space
        if not np.any(own.array):
            raise InputError(f"segmentation '{seg_name}' is empty: none of its segments has a voxel; correct the "
                             "segmentation in the Segment Editor first")
        labelled, outside = _voxels_outside(own, ref)
        vol_name = ref_node.GetName()
        if outside >= labelled:
            raise InputError(f"segmentation '{seg_name}' does not overlap the volume '{vol_name}': it was drawn on "
                             "another image; choose the volume it was drawn on")
        if outside > OUTSIDE_TOLERANCE * labelled:
            raise InputError(f"{100.0 * outside / labelled:.1f}% of the labelled voxels of segmentation '{seg_name}' "
                             f"lie outside the volume '{vol_name}': it is not on this volume's geometry (drawn on "
                             "another image, or moved by a transform); choose the volume it was drawn on")
        resampled = not _same_lattice(own, ref)
        regions = self._region_label(segmentation_node, label_ids, ref_node, ref)
        if regions is not None:  # overlapping region segments (e.g. ET/TC/WT): the model's labels from them
            label, label_names = regions
        else:
            source = segmentation_node if roi_segment is None else _segments_copy(segmentation_node, label_ids)
            label, infos = segmentation_node_to_labelmap(source, ref_node)
            if not np.any(label.array):
                raise InputError(f"segmentation '{seg_name}' has no labelled voxel on the grid of the volume "
                                 f"'{vol_name}'")
            label_names = self._label_names(seg_name, label, infos)
            label = label_names.pop("__image__")

        # ---- the reviewed region
        roi_image, roi_kind = self._roi_mask(roi, segmentation_node, roi_segment, ref_node, ref)

        # ---- the case folder
        folder = self._case_folder(case_name, vol_name, overwrite)
        meta = {
            "source": {"volumes": {m: n.GetName() for m, n in inputs.items()}, "segmentation": seg_name},
            "task": self.task_name,
            "model_version": self.active_version(),
            "roi": roi_kind,
            "label_resampled": bool(resampled),
            "segments": sorted(label_names, key=label_names.get),
            "added_by": "DeepSegRecon TrainingLogic.add_to_training_set",
        }
        if resampled:
            meta["segmentation_grid"] = {"shape": list(own.array.shape), "spacing": list(own.spacing)}
        write_case(folder, images, label, label_names, roi=roi_image, meta=meta, overwrite=overwrite)
        self.last_case = {"folder": folder, "label_resampled": bool(resampled), "roi": roi_kind,
                          "label_names": dict(label_names)}
        return folder

    def _case_images(self, inputs):
        slicer = slicer_module()
        if not isinstance(inputs, dict) or not inputs:
            raise InputError("choose the input volume(s) of the case")
        required = self.required_modalities()
        if required:
            missing = [m for m in required if inputs.get(m) is None]
            if missing:
                raise InputError(f"the case lacks the input volume for modality {', '.join(repr(m) for m in missing)}"
                                 f" (the {self.task_name} training set uses {', '.join(required)})")
            extra = [m for m in inputs if m not in required]
            if extra:
                raise InputError(f"modality {', '.join(repr(m) for m in extra)} is not used by the {self.task_name} "
                                 f"training set (it uses {', '.join(required)})")
            inputs = {m: inputs[m] for m in required}
        images = {}
        for modality, node in inputs.items():
            if node is None:
                raise InputError(f"no volume selected for the modality '{modality}'")
            if not isinstance(node, slicer.vtkMRMLScalarVolumeNode) or isinstance(node, slicer.vtkMRMLLabelMapVolumeNode):
                raise InputError(f"the input '{modality}' must be a scalar volume node (an image, not a labelmap)")
            if node.GetScene() is not self.scene:
                raise InputError(f"volume '{node.GetName()}' is not in this scene")
            img = volume_node_to_image(node)
            if img.ndim != 3 or min(img.array.shape) < 1:
                raise InputError(f"volume '{node.GetName()}' is not a 3-D image")
            images[modality] = img
        first = next(iter(inputs))
        ref = images[first]
        for modality, img in images.items():
            if not img.same_grid(ref):
                raise InputError(f"volume '{inputs[modality].GetName()}' ({modality}) is not on the grid of "
                                 f"'{inputs[first].GetName()}' ({first}): resample it onto that volume first")
        return images, inputs[first], ref

    def _label_names(self, seg_name: str, label: Image, infos: list) -> dict:
        """{segment name: value}; with the model's label map known, values are the model's and unknown names are
        refused. The relabelled image is returned under the key ``"__image__"``."""
        names = [s.name for s in infos]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"segmentation '{seg_name}' has several segments named {dup}; rename them so each "
                             "structure has one segment")
        known = self._label_map()
        if not known:
            out = {s.name: int(s.label) for s in infos}
            out["__image__"] = label
            return out
        unknown = [n for n in names if n not in known]
        if unknown:
            shown = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
            raise InputError(f"segments {unknown} of '{seg_name}' are not labels of the {self.task_name} model "
                             f"(it knows {shown}); remove or rename them in the Segment Editor")
        arr = label.array
        hi = int(arr.max())
        lut = np.zeros(hi + 1, dtype=np.int64)
        for s in infos:
            if 0 < int(s.label) <= hi:
                lut[int(s.label)] = known[s.name]
        values = lut[arr]
        dtype = np.uint8 if values.max() < 256 else (np.uint16 if values.max() < 65536 else np.int32)
        out = {s.name: int(known[s.name]) for s in infos}
        out["__image__"] = label.with_array(values.astype(dtype))
        return out

    def _region_label(self, seg_node, ids: list, ref_node, ref: Image):
        """(label Image on the reference grid, {name: value}) from the task's region hook
        (``capability.region_label_hook``) when the segments are its overlapping regions, each read on its own;
        else None."""
        from ..capability import region_label_hook

        hook = region_label_hook(self.task_name)
        if hook is None:
            return None
        segmentation = seg_node.GetSegmentation()
        names = {segmentation.GetSegment(i).GetName(): i for i in ids}

        def read_mask(name):
            region, _ = segmentation_node_to_labelmap(_segments_copy(seg_node, [names[name]]), ref_node)
            return np.asarray(region.array) > 0

        out = hook(seg_node.GetName(), list(names), self._label_map() or {}, read_mask)
        if out is None:
            return None
        array, label_names = out
        return ref.with_array(array), label_names

    def _roi_mask(self, roi, seg_node, roi_segment, ref_node, ref: Image):
        """(uint8 mask Image on the reference grid or None, a word for case.json)."""
        slicer = slicer_module()
        if roi is None:
            return None, None
        if roi_segment is not None:
            only, _ = segmentation_node_to_labelmap(_segments_copy(seg_node, [roi_segment]), ref_node)
            mask, kind, what = only.array > 0, f"segment {roi_segment}", f"the segment '{roi_segment}'"
        elif isinstance(roi, slicer.vtkMRMLMarkupsROINode):
            mask, kind, what = _box_mask(roi, ref), "markups ROI", f"the ROI '{roi.GetName()}'"
        elif isinstance(roi, slicer.vtkMRMLSegmentationNode):
            if roi is seg_node:
                raise InputError("the reviewed region cannot be the corrected segmentation itself; choose a segment "
                                 "of it, another segmentation, a labelmap or an ROI box")
            if roi.GetScene() is not self.scene:
                raise InputError(f"segmentation '{roi.GetName()}' is not in this scene")
            region, _ = segmentation_node_to_labelmap(roi, ref_node)
            mask, kind, what = region.array > 0, "segmentation", f"the segmentation '{roi.GetName()}'"
        elif isinstance(roi, slicer.vtkMRMLVolumeNode):
            if roi.GetScene() is not self.scene:
                raise InputError(f"volume '{roi.GetName()}' is not in this scene")
            img = volume_node_to_image(roi)
            mask = img.array > 0 if img.same_grid(ref) else _sample_nearest(img, ref) > 0
            kind, what = "labelmap", f"the labelmap '{roi.GetName()}'"
        else:
            raise InputError("the reviewed region must be a segment ID, a labelmap volume, a segmentation or a "
                             f"markups ROI node, not {type(roi).__name__}")
        if not np.any(mask):
            raise InputError(f"{what} marks no voxel of the volume '{ref_node.GetName()}' as reviewed: it is empty or "
                             "outside the volume")
        return ref.with_array(mask.astype(np.uint8)), kind

    def _case_folder(self, case_name, volume_name: str, overwrite: bool) -> Path:
        if case_name is not None:
            case_name = str(case_name)
            if not _SAFE_NAME.match(case_name) or case_name.lower().startswith("staging"):
                raise InputError(f"'{case_name}' cannot be a case name: use letters, digits, '.', '_', '+' or '-' "
                                 "(starting with a letter or digit)")
            folder = self.training_root / case_name
            if folder.exists() and not overwrite:
                raise InputError(f"the training set already has a case '{case_name}' ({folder}); choose another name")
            return folder
        base = _SAFE.sub("_", volume_name).strip("._-+") or "case"
        base = f"{base[:60]}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        folder, n = self.training_root / base, 2
        while folder.exists():
            folder, n = self.training_root / f"{base}-{n}", n + 1
        return folder

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
            m = _number(minutes)
            if m is None or m <= 0:
                raise InputError(f"the time budget must be a positive number of minutes, got {minutes!r}")
            params["minutes"] = m
        if epochs is not None:
            e = _number(epochs)
            if e is None or e < 1 or e != int(e):
                raise InputError(f"epochs must be a whole number of at least 1, got {epochs!r}")
            params["epochs"] = int(e)
        if val_fraction is not None:
            v = _number(val_fraction)
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

    # ---- curves
    def _create_curve_nodes(self, new_name: str, base_version: str | None) -> None:
        import vtk

        slicer = slicer_module()
        what = f"fine-tune {base_version} -> {new_name}" if base_version else f"training {new_name}"
        table = slicer.vtkMRMLTableNode()
        table.SetName(self.scene.GenerateUniqueName(f"{self.task_name} {what}"))
        for name, cls in zip(TABLE_COLUMNS, (vtk.vtkIntArray, vtk.vtkDoubleArray, vtk.vtkDoubleArray,
                                             vtk.vtkStringArray, vtk.vtkIntArray)):
            column = cls()
            column.SetName(name)
            table.AddColumn(column)
        table.SetAttribute("DeepSegRecon.task", self.task_name)
        table.SetAttribute("DeepSegRecon.version", new_name)
        table.SetAttribute("DeepSegRecon.base_version", base_version or "")
        table.SetAttribute("DeepSegRecon.state", "running")
        self.scene.AddNode(table)
        added = [table]
        try:
            series = {}
            for column, title, color in (("loss", "training loss", (0.85, 0.3, 0.1)),
                                         ("val_dice", "validation Dice", (0.1, 0.45, 0.85))):
                s = slicer.vtkMRMLPlotSeriesNode()
                s.SetName(self.scene.GenerateUniqueName(f"{new_name} {title}"))
                self.scene.AddNode(s)
                added.append(s)
                s.SetAndObserveTableNodeID(table.GetID())
                s.SetXColumnName("epoch")
                s.SetYColumnName(column)
                s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                s.SetColor(*color)
                series[column] = s
            chart = slicer.vtkMRMLPlotChartNode()
            chart.SetName(self.scene.GenerateUniqueName(f"{self.task_name} {what} curves"))
            chart.SetTitle(f"{self.task_name}: {what}")
            chart.SetXAxisTitle("epoch")
            chart.SetYAxisTitle("loss / validation Dice")
            chart.SetLegendVisibility(True)
            self.scene.AddNode(chart)
            added.append(chart)
            for s in series.values():
                chart.AddAndObservePlotSeriesNodeID(s.GetID())
        except BaseException:
            for node in reversed(added):
                self.scene.RemoveNode(node)
            raise
        self.table_node, self.chart_node, self.series_nodes = table, chart, series

    def _on_events(self, events: list) -> None:
        rows = [r for r in (epoch_row(e) for e in events) if r is not None]
        for event in events:
            if isinstance(event, dict) and _number(event.get("epochs")):
                self._planned_epochs = int(event["epochs"])
        if rows:
            self._add_rows(rows)

    def _add_rows(self, rows: list) -> None:
        """Add end-of-epoch rows (new ones only) and rewrite the table. Several parts (networks trained in turn)
        are shown one after the other: ``epoch`` counts on over the parts, ``part_epoch`` is the part's own."""
        new = False
        for r in rows:
            key = (r["part"], r["epoch"])
            if key not in self._rows:
                new = True
            self._rows[key] = r
        if not new and rows:
            return
        order = []
        for part, _ in self._rows:
            if part not in order:
                order.append(part)
        keys = sorted(self._rows, key=lambda k: (order.index(k[0]), k[1]))
        self.history = [{"epoch": n + 1, "loss": self._rows[k]["loss"], "val_dice": self._rows[k]["val_dice"],
                         "part": k[0], "part_epoch": k[1]} for n, k in enumerate(keys)]
        self._write_table()

    def _write_table(self) -> None:
        table = self.table_node
        if table is None or table.GetScene() is not self.scene:  # the user removed it: keep the history only
            return
        data = table.GetTable()
        columns = [data.GetColumnByName(c) for c in TABLE_COLUMNS]
        if any(c is None for c in columns):
            return
        nan = float("nan")
        was = table.StartModify()
        try:
            for c in columns:
                c.SetNumberOfValues(len(self.history))
            for n, r in enumerate(self.history):
                columns[0].SetValue(n, int(r["epoch"]))
                columns[1].SetValue(n, nan if r["loss"] is None else float(r["loss"]))
                columns[2].SetValue(n, nan if r["val_dice"] is None else float(r["val_dice"]))
                columns[3].SetValue(n, str(r["part"]))
                columns[4].SetValue(n, int(r["part_epoch"]))
            for c in columns:
                c.Modified()
            data.Modified()
            table.Modified()
        finally:
            table.EndModify(was)

    def _finish_curves(self, state: str) -> None:
        for node in (self.table_node, self.chart_node):
            if node is None or node.GetScene() is not self.scene:
                continue
            if state != "succeeded" and f"({state})" not in node.GetName():
                node.SetName(f"{node.GetName()} ({state})")
        if self.table_node is not None:
            self.table_node.SetAttribute("DeepSegRecon.state", state)

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

    def _with_curves(self, status: dict) -> dict:
        last = self.history[-1] if self.history else {}
        dice = [r["val_dice"] for r in self.history if r["val_dice"] is not None]
        return {**status, "epoch": last.get("part_epoch"), "part": last.get("part") or None,
                "epochs": self._planned_epochs, "loss": last.get("loss"),
                "val_dice": last.get("val_dice"), "best_val_dice": max(dice) if dice else None,
                "rows": len(self.history), "version": self.new_version, "base_version": self.base_version}

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


# ------------------------------------------------------------------------------------------ geometry helpers
def _segments_copy(seg_node, keep_ids: list):
    """A segmentation node outside any scene holding only ``keep_ids``, with the node's world transform applied
    to its labelmaps (so the copy lies where the original is displayed)."""
    slicer = slicer_module()
    world = world_matrix_of(seg_node, "segmentation")
    copy = slicer.vtkMRMLSegmentationNode()
    segmentation = copy.GetSegmentation()
    segmentation.DeepCopy(seg_node.GetSegmentation())
    for i in reversed(range(segmentation.GetNumberOfSegments())):
        sid = segmentation.GetNthSegmentID(i)
        if sid not in keep_ids:
            segmentation.RemoveSegment(sid)
    if not np.allclose(world, np.eye(4)):
        done = set()
        for i in range(segmentation.GetNumberOfSegments()):
            layer = segmentation.GetNthSegment(i).GetRepresentation(BINARY_LABELMAP)
            if layer is None:
                continue
            key = layer.GetAddressAsString("vtkOrientedImageData")
            if key in done:
                continue
            done.add(key)
            import vtk

            m = vtk.vtkMatrix4x4()
            layer.GetImageToWorldMatrix(m)
            layer.SetImageToWorldMatrix(vtk_matrix(world @ np_matrix(m)))
    return copy


def _same_lattice(a: Image, b: Image, tol: float = 1e-4) -> bool:
    """Same spacing and axes, and an origin a whole number of voxels away: the grids share their voxels."""
    if not (np.allclose(a.spacing, b.spacing, atol=tol) and np.allclose(a.direction, b.direction, atol=tol)):
        return False
    offset = np.linalg.solve(b.direction @ np.diag(b.spacing), np.subtract(a.origin, b.origin))
    return bool(np.allclose(offset, np.round(offset), atol=1e-3))


def _voxels_outside(labels: Image, ref: Image) -> tuple:
    """(labelled voxels of ``labels``, how many of their centres lie outside the voxel box of ``ref``)."""
    to_ref = np.linalg.inv(ref.ijk_to_ras()) @ labels.ijk_to_ras()
    size = np.array(ref.size, dtype=float)  # (i, j, k)
    total = outside = 0
    arr = labels.array
    for k in range(arr.shape[0]):
        jj, ii = np.nonzero(arr[k])
        if not len(ii):
            continue
        pts = np.c_[ii, jj, np.full(len(ii), k), np.ones(len(ii))] @ to_ref.T
        out = np.any((pts[:, :3] < -0.5 - 1e-3) | (pts[:, :3] > size - 0.5 + 1e-3), axis=1)
        total += len(ii)
        outside += int(out.sum())
    return total, outside


def _ref_points(ref: Image, k: int) -> np.ndarray:
    """RAS positions (j*i, 3) of the voxel centres of slice ``k`` of ``ref``."""
    nk, nj, ni = ref.array.shape
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    ijk = np.c_[ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)]
    return (ijk @ ref.ijk_to_ras().T)[:, :3]


def _sample_nearest(src: Image, ref: Image) -> np.ndarray:
    """``src`` sampled at the voxel centres of ``ref`` (nearest neighbour, 0 outside), as a (k, j, i) array."""
    out = np.zeros(ref.array.shape, dtype=src.array.dtype)
    to_src = np.linalg.inv(src.ijk_to_ras())
    size = np.array(src.size)
    for k in range(ref.array.shape[0]):
        pts = np.c_[_ref_points(ref, k), np.ones(ref.array.shape[1] * ref.array.shape[2])] @ to_src.T
        idx = np.floor(pts[:, :3] + 0.5).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < size), axis=1)
        values = np.zeros(len(idx), dtype=src.array.dtype)
        values[ok] = src.array[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
        out[k] = values.reshape(ref.array.shape[1:])
    return out


def _box_mask(roi_node, ref: Image) -> np.ndarray:
    """Voxels of ``ref`` whose centres lie inside a markups ROI box (its orientation and transforms applied)."""
    radius = [0.0, 0.0, 0.0]
    roi_node.GetRadiusXYZ(radius)
    if min(radius) <= 0 or roi_node.GetNumberOfControlPoints() == 0:
        raise InputError(f"the ROI '{roi_node.GetName()}' is not placed yet (it has no size); place it around the "
                         "reviewed region first")
    parent = roi_node.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        raise InputError(f"the ROI '{roi_node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                         "harden or remove the transform first")
    to_box = np.linalg.inv(np_matrix(roi_node.GetObjectToWorldMatrix()))
    r = np.asarray(radius) + 1e-6
    mask = np.zeros(ref.array.shape, dtype=bool)
    for k in range(ref.array.shape[0]):
        p = np.c_[_ref_points(ref, k), np.ones(ref.array.shape[1] * ref.array.shape[2])] @ to_box.T
        mask[k] = np.all(np.abs(p[:, :3]) <= r, axis=1).reshape(ref.array.shape[1:])
    return mask
