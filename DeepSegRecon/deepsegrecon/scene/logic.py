"""Headless module logic: run a task in a background worker process and bring its result into the scene.

Shared by every capability; the Slicer module panels call these methods (their job controller calls
:meth:`TaskLogic.poll` on a QTimer; "Import weights" calls :meth:`TaskLogic.import_model`) and the tests call the
same ones. Nothing is added to the scene before the result is complete: on failure,
cancel, or a killed worker, the scene holds exactly the nodes it had before :meth:`TaskLogic.start`, and the
job folder is removed.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..capability import params_type
from ..errors import Cancelled, DeepSegReconError, InputError
from ..results import SegmentationResult, TransformResult, VolumeResult
from ._mrml import check_scene, slicer_module, vtk_matrix
from .segmentations import create_closed_surfaces, result_to_segmentation_node
from .selection import active_model_version
from .volumes import image_to_volume_node, volume_node_to_image

FINAL = ("succeeded", "failed", "cancelled")


def _idle_status() -> dict:
    return {"state": "idle", "fraction": 0.0, "stage": None, "eta_s": None, "message": "", "error": None}


class TaskLogic:
    """Run one task at a time for a scene.

    ``python``: interpreter for the worker (default ``sys.executable``); ``job_root``: folder for job folders
    (default: the worker's, under the system temp folder); ``plugins``: modules or ``.py`` files the worker
    imports before looking the task up (test-only tasks); ``env``: extra environment for the worker.
    """

    task_name: str = ""
    model_task: str = ""  # the model store's task name for the weights (default: task_name)
    needs_inputs = True  # a job without input volumes (training) sets this False
    uses_model_selection = True  # take params["model"] from the scene's chosen version (TrainingLogic)

    def __init__(self, scene, task_name: str = None, python: str = None, job_root=None, plugins=(), env=None,
                 model_task: str = None):
        check_scene(scene)
        self.scene = scene
        self.task_name = task_name or self.task_name
        if not self.task_name:
            raise InputError("TaskLogic needs a task name")
        self.model_task = model_task or self.model_task or self.task_name
        self.python = python or sys.executable
        self.job_root = Path(job_root) if job_root is not None else None
        self.plugins = tuple(str(p) for p in plugins)
        self.env = dict(env or {})
        self.output_nodes: list = []
        self.result = None  # the engine result of the last succeeded job
        self._handle = None
        self._inputs: dict = {}
        self._output_node = None
        self._status = _idle_status()

    # ------------------------------------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self, inputs: dict, params: dict, output_node=None) -> None:
        """Write the job (inputs taken from the volume nodes with their world geometry) and start the worker.

        Without a ``"model"`` in ``params``, the model version chosen in the scene for :attr:`model_task`
        (``TrainingLogic.set_active_version``) is used, if one was chosen."""
        from .. import worker

        if self.running:
            raise InputError(f"a {self.task_name} job is already running: cancel it or wait for it to finish")
        if not inputs and self.needs_inputs:
            raise InputError(f"{self.task_name} needs at least one input volume")
        params = dict(params or {})
        if self.uses_model_selection and not params.get("model"):
            chosen = active_model_version(self.scene, self.model_task)
            if chosen:
                params["model"] = chosen
        kind = params_type(self.task_name)
        if kind is not None:  # a wrong name or type is refused here, before a worker starts (and imports torch)
            kind.parse(params, self.task_name)
        slicer = slicer_module()
        if output_node is not None and not isinstance(output_node, slicer.vtkMRMLNode):
            raise InputError("the output must be a node of the scene")
        images = {}
        for name, node in inputs.items():
            if node is None:
                raise InputError(f"no volume selected for the input '{name}'")
            images[name] = volume_node_to_image(node)
        self.output_nodes = []
        self.result = None
        self._inputs = dict(inputs)
        self._output_node = output_node
        job = worker.create_job(self.task_name, images, params, job_root=self.job_root,
                                plugins=self.plugins)
        try:
            self._handle = worker.start_job(job, python=self.python, env=self.env or None)
        except BaseException:
            import shutil

            shutil.rmtree(job, ignore_errors=True)
            raise
        self._status = {"state": "running", "fraction": 0.0, "stage": "starting", "eta_s": None, "message": "",
                        "error": None}

    def poll(self) -> dict:
        """The job's state; when it has just succeeded, import the result into the scene first.

        Returns {"state": idle|running|succeeded|failed|cancelled, "fraction", "stage", "eta_s", "message",
        "error", "error_type"}.
        """
        handle = self._handle
        if handle is None:
            return dict(self._status)
        st = handle.poll()
        status = {"state": st.state, "fraction": float(st.fraction or 0.0), "stage": st.stage, "eta_s": st.eta_s,
                  "message": st.message or "", "error": st.error, "error_type": st.error_type}
        if st.state == "running":
            self._status = status
            return dict(status)
        try:
            if st.state == "succeeded":
                try:
                    result = handle.result()
                    self.output_nodes = self._import_result(result)
                    self.result = result
                except DeepSegReconError as e:
                    status.update(state="failed", error=f"could not bring the result into the scene: {e}",
                                  error_type=_error_type(e))
                except Exception as e:  # noqa: BLE001 - report, never leave the job behind
                    status.update(state="failed", error_type="DeepSegReconError",
                                  error=f"could not bring the result into the scene: {type(e).__name__}: {e}")
        finally:
            self._finish(handle)
        if status.get("error"):
            status["error"] = _for_slicer(_without_log_reference(status["error"]))
        self._status = status
        return dict(status)

    def _finish(self, handle) -> None:
        self._handle = None
        handle.cleanup()

    def cancel(self) -> None:
        """Stop the worker and every process it started (flag file, terminate, kill: within 2 s, on every OS) and
        remove the job folder."""
        handle = self._handle
        if handle is None:
            return
        try:
            handle.cancel(grace=0.8)  # flag file, then terminate the process tree, then kill: under 2 s in all
        finally:
            self._finish(handle)
        self._status = {**self._status, "state": "cancelled", "error": "cancelled by the user",
                        "error_type": "Cancelled", "eta_s": None}

    def wait(self, timeout: float | None = None, on_progress: Callable[[dict], None] | None = None,
             poll_interval: float = 0.2) -> dict:
        """Poll until the job ends or ``timeout`` seconds pass (then the state is still "running")."""
        return poll_until_done(self.poll, timeout, on_progress, poll_interval)

    def run(self, inputs: dict, params: dict, output_node=None, timeout: float | None = None) -> list:
        """Start, wait, and return the new/updated nodes; raise the engine error of a failed job.

        A job still running after ``timeout`` seconds is cancelled and :class:`DeepSegReconError` is raised.
        """
        from ..worker import ERROR_TYPES

        self.start(inputs, params, output_node)
        status = self.wait(timeout)
        if status["state"] == "running":
            self.cancel()
            raise DeepSegReconError(f"{self.task_name} did not finish within {timeout} s and was cancelled")
        if status["state"] == "succeeded":
            return list(self.output_nodes)
        if status["state"] == "cancelled":
            raise Cancelled(status.get("error") or "cancelled by the user")
        raise ERROR_TYPES.get(status.get("error_type") or "", DeepSegReconError)(status.get("error") or "the job failed")

    def model_versions(self) -> list:
        """Installed versions of :attr:`model_task` in the model store, the store's default version first."""
        from ..errors import ModelError
        from ..store import ModelStore

        store = ModelStore()
        entries = [e for e in store.list(self.model_task) if e.task == self.model_task]
        if not entries:
            return []
        try:
            default = store.get(self.model_task).version
        except ModelError:
            default = None
        return sorted((e.version for e in entries), key=lambda v: v != default)

    def import_model(self, source, sha256: str | None = None, version: str | None = None,
                     default: bool = False):
        """Install model weights as a version of :attr:`model_task` in the user model store (``$DEEPSEGRECON_HOME``):
        ``source`` is a version folder (with its ``manifest.json``), a .zip / .tar.gz of one or a weights file, or an
        http(s) URL of one, which needs its ``sha256``. The version becomes the store's default only with
        ``default=True``. Weights of another task, a broken archive or a checksum mismatch raise with nothing
        installed (:meth:`deepsegrecon.store.ModelStore.import_file` / ``import_url``, as ``deepsegrecon models
        import``). Returns the new, verified :class:`~deepsegrecon.store.ModelEntry`."""
        from ..store import ModelStore

        source = str(source or "").strip()
        if not source:
            raise InputError("choose a model folder or a zip file, or give a URL and its sha256")
        store = ModelStore()
        version = str(version).strip() if version else None
        if re.match(r"(?i)^(https?|ftp)://", source):
            entry = store.import_url(source, sha256 or "", self.model_task, version, default=bool(default))
        else:
            entry = store.import_file(source, task=self.model_task, version=version, sha256=sha256 or None,
                                      default=bool(default))
        store.verify(entry)
        return entry

    def needs_overwrite_confirmation(self, node) -> bool:
        """Whether a run into ``node`` replaces something the user has: a segmentation node that has segments.
        None (the default: a new node for the result) and an empty segmentation never need asking."""
        slicer = slicer_module()
        return (isinstance(node, slicer.vtkMRMLSegmentationNode)
                and node.GetSegmentation().GetNumberOfSegments() > 0)

    # ------------------------------------------------------------------------------------------------ results
    def _first_input(self):
        return next(iter(self._inputs.values()), None)

    def output_name(self) -> str:
        first = self._first_input()
        base = first.GetName() if first is not None else "result"
        return f"{base} {self.task_name}"

    def _import_result(self, result) -> list:
        if isinstance(result, SegmentationResult):
            return [self._import_segmentation(result)]
        if isinstance(result, VolumeResult):
            return self._import_volumes(result)
        if isinstance(result, TransformResult):
            return self._import_transform(result)
        raise DeepSegReconError(f"unknown result type {type(result).__name__}")

    def _import_segmentation(self, result: SegmentationResult):
        slicer = slicer_module()
        node = self._output_node
        if node is not None and not isinstance(node, slicer.vtkMRMLSegmentationNode):
            raise InputError(f"the output node '{node.GetName()}' is not a segmentation node")
        ref = self._first_input()
        if ref is not None and (ref.GetScene() is not self.scene or ref.GetImageData() is None):
            ref = None
        name = None if node is not None else self.output_name()
        return result_to_segmentation_node(self.scene, result, reference_volume_node=ref, node=node, name=name)

    def _import_volumes(self, result: VolumeResult) -> list:
        added = []
        try:
            for n, (name, image) in enumerate(result.volumes.items()):
                target = self._output_node if n == 0 else None
                node = image_to_volume_node(self.scene, image, f"{self.output_name()} {name}", node=target)
                added.append(node)
        except BaseException:
            for node in added:
                if node is not self._output_node:
                    self.scene.RemoveNode(node)
            raise
        return added

    def _import_transform(self, result: TransformResult) -> list:
        slicer = slicer_module()
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        matrix_ras = flip @ np.asarray(result.matrix_lps, dtype=float) @ flip
        node = self._output_node
        added = []
        try:
            if node is None:
                node = slicer.vtkMRMLLinearTransformNode()
                node.SetName(self.output_name())
                node.SetMatrixTransformToParent(vtk_matrix(matrix_ras))
                self.scene.AddNode(node)
                added.append(node)
            else:
                node.SetMatrixTransformToParent(vtk_matrix(matrix_ras))
            out = [node]
            for name, image in result.images.items():
                vol = image_to_volume_node(self.scene, image, f"{self.output_name()} {name}")
                added.append(vol)
                out.append(vol)
        except BaseException:
            for n in added:
                self.scene.RemoveNode(n)
            raise
        return out


class SegmentTeethLogic(TaskLogic):
    """Segment Teeth: the "teeth" task, plus surfaces, models and surface files for its segmentation."""

    task_name = "teeth"
    model_task = "teeth"

    def __init__(self, scene, python: str = None, job_root=None, plugins=(), env=None, task_name: str = None,
                 model_task: str = None):
        super().__init__(scene, task_name or "teeth", python=python, job_root=job_root, plugins=plugins, env=env,
                         model_task=model_task)

    def create_surfaces(self, seg_node, smoothing: float = 0.5) -> dict:
        return create_closed_surfaces(seg_node, smoothing)

    def create_models(self, seg_node, folder_name: str = None) -> int:
        from .models import export_segments_to_models

        return export_segments_to_models(self.scene, seg_node, folder_name)

    def export_surfaces(self, seg_node, folder, fmt: str = "stl") -> list:
        from .models import export_surfaces

        return export_surfaces(seg_node, folder, fmt)


def poll_until_done(poll: Callable[[], dict], timeout: float | None = None,
                    on_progress: Callable[[dict], None] | None = None, poll_interval: float = 0.2,
                    keys=("state", "fraction", "stage", "message")) -> dict:
    """The headless stand-in for the widget's QTimer: call ``poll()`` until the state is no longer "running"
    or ``timeout`` seconds pass; ``on_progress`` sees each status that differs in ``keys``."""
    end = None if timeout is None else time.monotonic() + timeout
    seen = None
    while True:
        status = poll()
        key = tuple(status.get(k) for k in keys)
        if on_progress is not None and key != seen:
            on_progress(status)
        seen = key
        if status["state"] != "running" or (end is not None and time.monotonic() >= end):
            return status
        time.sleep(poll_interval)


def _error_type(e: BaseException) -> str:
    from ..worker import ERROR_TYPES

    for cls in type(e).__mro__:
        if cls.__name__ in ERROR_TYPES:
            return cls.__name__
    return "DeepSegReconError"


def _for_slicer(message: str) -> str:
    """Inside Slicer there is no ``deepsegrecon`` command: point at the panel's weights import instead."""
    return re.sub(r"Import one with: deepsegrecon models import \S+(?: --task \S+)?",
                  'Import one with "Import weights" in the module\'s "Model weights" section', message)


def _without_log_reference(message: str) -> str:
    """The job folder (and its log) is removed: drop pointers into it from an error message."""
    return re.sub(r";? ?(see|log:) \S*worker\.log", "", message).strip()
