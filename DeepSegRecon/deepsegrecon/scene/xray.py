"""Register X-ray: headless module logic (MRML only). Runs ``xray-register`` in a worker; the result is a
linear transform node (CT -> X-ray frame, the CT placed under it) and the final DRR as a volume node on the
X-ray's plane, ready to overlay on the X-ray."""

from __future__ import annotations

from ..errors import InputError
from .logic import TaskLogic
from .volumes import volume_node_to_image


class RegisterXrayLogic(TaskLogic):
    task_name = "xray-register"
    model_task = "xray-register"
    uses_model_selection = False  # the regressor is chosen by the CT itself (one per patient)

    def __init__(self, scene, python: str = None, job_root=None, plugins=(), env=None):
        super().__init__(scene, "xray-register", python=python, job_root=job_root, plugins=plugins, env=env)
        self.ct_node = None

    def xray_geometry(self, xray_node) -> dict:
        """What the X-ray node says about the detector: pixel spacing (x, y) mm and size; the panel fills in
        the rest (SDD, and the spacing when the file had none)."""
        if xray_node is None:
            raise InputError("choose the X-ray volume")
        img = volume_node_to_image(xray_node)
        return {"pixel_spacing": list(img.spacing[:2]), "size": list(img.size[:2]),
                "slices": img.array.shape[0] if img.ndim == 3 else 1}

    def register(self, ct_node, xray_node, params: dict) -> None:
        """Start the registration; ``params``: sdd (mm), pixel_spacing ([x, y] mm), and optionally sid, view,
        values, train_minutes, init_pose, truth_pose (pose dicts) and refinement settings."""
        if ct_node is None or xray_node is None:
            raise InputError("choose both the CT and the X-ray volume")
        if ct_node is xray_node:
            raise InputError("the CT and the X-ray must be different volumes")
        params = dict(params or {})
        if not params.get("sdd") or float(params["sdd"]) <= 0:
            raise InputError("give the source-to-detector distance (SDD, mm)")
        ps = params.get("pixel_spacing")
        if ps is None or any(float(v) <= 0 for v in (ps if isinstance(ps, (list, tuple)) else [ps])):
            raise InputError("give the X-ray's pixel spacing (mm): it is 0 or missing")
        img = volume_node_to_image(xray_node)
        if img.ndim == 3 and img.array.shape[0] == 1:  # keep the plane's placement across the worker
            params["xray_plane"] = {"origin": list(img.origin), "direction": img.direction.tolist()}
        self.ct_node = ct_node
        self.start({"ct": ct_node, "xray": xray_node}, params)

    def _import_result(self, result) -> list:
        nodes = super()._import_result(result)
        transform = nodes[0]
        plane = (result.report or {}).get("drr_plane")
        if plane and len(nodes) > 1:  # the saved DRR is read back 2-D: put it back on the X-ray's plane
            import numpy as np

            from ..image import Image
            from ._mrml import vtk_matrix

            drr = nodes[1]
            shape = drr.GetImageData().GetDimensions()
            grid = Image(np.zeros((1, shape[1], shape[0]), np.float32), plane["spacing"], plane["origin"],
                         plane["direction"])
            drr.SetIJKToRASMatrix(vtk_matrix(grid.ijk_to_ras()))
        if self.ct_node is not None and self.ct_node.GetScene() is self.scene:
            self.ct_node.SetAndObserveTransformNodeID(transform.GetID())
        return nodes
