"""Scene logic of Reconstruct CBCT: run ``cbct-recon`` in a worker, bring back the chosen method's volume and the FDK
volume (on the grid of the CT / the geometry) and, when there is a reference, a metrics table: one row per method in
the result's metrics (PSNR, SSIM, seconds), the chosen (default) method first."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..results import VolumeResult
from ._mrml import slicer_module
from .logic import TaskLogic
from .volumes import image_to_volume_node

METRIC_COLUMNS = ("method", "PSNR (dB)", "SSIM", "seconds")
NETWORK_ONLY = "dif_gaussian_network_only"  # the network before the data consistency


class ReconstructCBCTLogic(TaskLogic):
    task_name = "cbct-recon"
    model_task = "cbct-recon"

    def __init__(self, scene, python: str = None, job_root=None, plugins=(), env=None, task_name: str = None,
                 model_task: str = None):
        super().__init__(scene, task_name or "cbct-recon", python=python, job_root=job_root, plugins=plugins,
                         env=env, model_task=model_task)
        self.metrics_table = None

    def load_projection_folder(self, folder, name: str = None):
        """Read a projection folder (geometry.json + images) into a volume node; returns (node, geometry dict)."""
        from ..cbct.projio import read_projections

        stack, geo = read_projections(Path(folder))
        node = image_to_volume_node(self.scene, stack, name or f"{Path(folder).name} projections")
        node.SetAttribute("DeepSegRecon.cbct_geometry", json.dumps(geo.to_dict()))
        return node, geo.to_dict()

    @staticmethod
    def geometry_of_node(node):
        """The geometry stored on a projection volume node by :meth:`load_projection_folder`, or None."""
        text = node.GetAttribute("DeepSegRecon.cbct_geometry") if node is not None else None
        return json.loads(text) if text else None

    def reconstruct_from_projections(self, projections_node, reference_node=None, params: dict = None) -> None:
        geometry = (params or {}).get("geometry") or self.geometry_of_node(projections_node)
        if not geometry:
            raise InputError("the projection volume has no cone-beam geometry: load it with its geometry.json")
        inputs = {"projections": projections_node}
        if reference_node is not None:
            inputs["reference"] = reference_node
        self.start(inputs, {**(params or {}), "geometry": geometry})

    def simulate_and_reconstruct(self, ct_node, views: int, params: dict = None, reference_node=None) -> None:
        inputs = {"ct": ct_node}
        if reference_node is not None:
            inputs["reference"] = reference_node
        self.start(inputs, {**(params or {}), "views": int(views)})

    def reconstruct(self, input_node, simulate: bool, views: int = 10, reference_node=None, params: dict = None):
        """The module's Reconstruct button: simulate ``views`` projections from the CT ``input_node``, or
        reconstruct the projection stack ``input_node`` (loaded with its geometry)."""
        if input_node is None:
            raise InputError("choose an input volume (a CT, or a projection stack loaded from its folder)")
        if simulate:
            return self.simulate_and_reconstruct(input_node, views, params, reference_node)
        return self.reconstruct_from_projections(input_node, reference_node, params)

    def output_name(self) -> str:
        first = self._first_input()
        return f"{first.GetName() if first is not None else 'CBCT'} CBCT"

    def _import_result(self, result) -> list:
        if not isinstance(result, VolumeResult):
            return super()._import_result(result)
        result = VolumeResult({k: v for k, v in result.volumes.items() if k in ("recon", "fdk")}, result.report)
        nodes = self._import_volumes(result)
        self.metrics_table = None
        m = result.report.get("metrics")
        if m:
            try:
                self.metrics_table = self._metrics_table(m, result.report)
                nodes.append(self.metrics_table)
            except BaseException:
                for node in nodes:
                    self.scene.RemoveNode(node)
                raise
        return nodes

    def _metrics_table(self, m: dict, report: dict):
        import vtk

        slicer = slicer_module()
        table = slicer.vtkMRMLTableNode()
        table.SetName(self.scene.GenerateUniqueName(f"{self.output_name()} metrics ({report.get('views')} views)"))
        cols = [vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()]
        for col, name in zip(cols, METRIC_COLUMNS):
            col.SetName(name)
        timings = report.get("timings_s") or {}
        for key, label in metric_rows(m, report):
            seconds = timings.get("dif_gaussian_network_s" if key == NETWORK_ONLY else f"{key}_s")
            cols[0].InsertNextValue(label)
            cols[1].InsertNextValue(float(m[key]["psnr_db"]))
            cols[2].InsertNextValue(float(m[key]["ssim"]))
            cols[3].InsertNextValue(float("nan") if seconds is None else float(seconds))
        for col in cols:
            table.AddColumn(col)
        self.scene.AddNode(table)
        return table


def metric_rows(m: dict, report: dict) -> list:
    """(metrics key, row label) for every method in ``m``: the report's method (the chosen or default one) first,
    then the others in ``methods.METHODS`` order, the network alone after DIF-Gaussian, unknown keys last."""
    from ..cbct.methods import KEYS, METHODS, TITLES

    first = KEYS.get(report.get("method"))
    order = [KEYS[name] for name in METHODS]
    order.insert(order.index("dif_gaussian") + 1, NETWORK_ONLY)
    scored = [k for k in m if isinstance(m[k], dict) and "psnr_db" in m[k]]
    keys = sorted(scored, key=lambda k: (k != first, order.index(k) if k in order else len(order), k))
    titles = {KEYS[name]: TITLES[name] for name in METHODS}
    if report.get("refine_iters"):
        titles["dif_gaussian"] = "DIF-Gaussian + data consistency"
    titles[NETWORK_ONLY] = "DIF-Gaussian (network alone)"
    return [(key, titles.get(key, key)) for key in keys]
