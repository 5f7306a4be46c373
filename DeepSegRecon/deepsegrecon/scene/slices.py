"""Segment Slices scene logic: the ``slices`` task in a worker, and scoring a result against a reference.

:class:`SegmentSlicesLogic` is :class:`~.logic.TaskLogic` for the ``slices`` task (start / poll / cancel /
wait / run, result as a segmentation node). :meth:`SegmentSlicesLogic.score` compares a segmentation node with
a reference (a segmentation node, segments matched by name, or a labelmap volume with the label set's values)
on the input volume's grid and fills a table node with per-organ Dice and HD95 (mm).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .logic import TaskLogic
from .segmentations import segmentation_node_to_labelmap
from .volumes import volume_node_to_image

METRIC_COLUMNS = ("organ", "status", "dice", "hd95_mm", "volume_ref_ml", "volume_pred_ml")


class SegmentSlicesLogic(TaskLogic):
    task_name = "slices"
    model_task = "slices"

    def __init__(self, scene, python: str = None, job_root=None, plugins=(), env=None, task_name: str = None,
                 model_task: str = None):
        super().__init__(scene, task_name or "slices", python=python, job_root=job_root, plugins=plugins, env=env,
                         model_task=model_task)

    def warnings(self) -> list:
        """Warnings of the last succeeded run (e.g. intensities that do not look like CT)."""
        return list(((self.result.report if self.result is not None else None) or {}).get("warnings") or [])

    def score(self, seg_node, reference_node, volume_node, labels=None, table_node=None) -> dict:
        """Per-organ metrics of ``seg_node`` against ``reference_node`` on ``volume_node``'s grid; returns
        ``{"per_organ": {...}, "mean_dice", ...}`` and, with ``table_node`` (a vtkMRMLTableNode), fills it."""
        from ..slices import metrics as M
        from ..slices.labels import read_label_set

        lset = read_label_set(labels)
        if reference_node is None:
            raise InputError("choose a reference segmentation or labelmap to compare with")
        grid = volume_node_to_image(volume_node)
        pred = _as_label_set(seg_node, volume_node, lset)
        if reference_node.IsA("vtkMRMLSegmentationNode"):
            ref = _as_label_set(reference_node, volume_node, lset)
        else:
            ref_img = volume_node_to_image(reference_node)
            if not ref_img.same_grid(grid):
                raise InputError(f"the reference '{reference_node.GetName()}' is on another geometry than "
                                 f"'{volume_node.GetName()}' (shape {ref_img.array.shape} vs {grid.array.shape}); "
                                 "it must share the volume's grid")
            ref = np.asarray(ref_img.array)
        per = M.organ_metrics(pred, ref, lset.label_map(), grid.spacing)
        out = {"per_organ": per, **M.summary(per)}
        if table_node is not None:
            _fill_table(table_node, per)
        return out


def _as_label_set(seg_node, volume_node, lset) -> np.ndarray:
    """A segmentation node as a labelmap on the volume's grid with the label set's values (matched by name)."""
    lab, infos = segmentation_node_to_labelmap(seg_node, volume_node)
    arr = np.asarray(lab.array)
    out = np.zeros(arr.shape, np.uint8)
    for info in infos:
        if info.name in lset.names:
            out[arr == info.label] = lset.by_name(info.name).value
    return out


def _fill_table(table_node, per_organ: dict) -> None:
    import vtk

    table = table_node.GetTable()
    wasModifying = table_node.StartModify()
    table.Initialize()
    cols = []
    for name in METRIC_COLUMNS:
        col = vtk.vtkStringArray() if name in ("organ", "status") else vtk.vtkDoubleArray()
        col.SetName(name)
        table.AddColumn(col)
        cols.append(col)
    for organ, m in per_organ.items():
        row = [organ, m["status"], m["dice"], m["hd95_mm"], m["volume_ref_ml"], m["volume_pred_ml"]]
        for col, v in zip(cols, row):
            if isinstance(col, vtk.vtkStringArray):
                col.InsertNextValue(str(v))
            else:
                col.InsertNextValue(math.nan if v is None else float(v))
    table_node.Modified()
    table_node.EndModify(wasModifying)
