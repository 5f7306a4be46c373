"""The ``xray-register`` and ``drr`` tasks."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from ..errors import InputError
from ..image import Image
from ..results import TransformResult, VolumeResult
from ..task import InputSpec, Task, TaskContext, register
from ..validate import check_image
from . import geometry as G
from .params import DrrParams, RegisterParams
from .xrayio import as_slice

REGISTER_STAGES = {"prepare": 5, "train": 60, "initialise": 5, "refine": 28, "output": 2}


def check_ct(ct) -> None:
    check_image(ct, "CT", ndim=3)


def carm_from_params(params: dict, height: int, width: int, image_spacing=None) -> G.Carm:
    """The C-arm: ``sdd``, ``pixel_spacing`` ([x, y] mm; default the image's own spacing), ``x0``, ``y0``,
    ``sid``, ``view``."""
    sdd = params.get("sdd")
    if sdd is None:
        raise InputError("the source-to-detector distance is unknown: the file has no DistanceSourceToDetector; "
                         "give it (--sdd MM, or the panel's SDD)")
    ps = params.get("pixel_spacing")
    if ps is None:
        ps = image_spacing
    if ps is None:
        raise InputError("the X-ray's pixel spacing is unknown: give it (--pixel-spacing MM, or the panel's value)")
    ps = np.broadcast_to(np.asarray(ps, float).ravel(), (2,)) if np.size(ps) in (1, 2) else None
    if ps is None or not np.all(np.isfinite(ps)) or np.any(ps <= 0):
        raise InputError(f"the X-ray's pixel spacing must be positive, got {params.get('pixel_spacing')} "
                         "(a DICOM file with pixel spacing 0 needs --pixel-spacing or the panel's value)")
    return G.Carm(float(sdd), height, width, float(ps[0]), float(ps[1]), float(params.get("x0") or 0.0),
                  float(params.get("y0") or 0.0), params.get("sid"), params.get("view") or "AP")


def _pose_param(params: dict, key: str):
    value = params.get(key)
    return None if value is None else G.read_pose_json(value)


def with_plane(xray: Image, plane) -> Image:
    """The radiograph placed on ``plane`` ({"origin", "direction"} in LPS): a one-slice volume loses its 3-D
    placement when it is written for the worker and read back as a 2-D image."""
    if not plane:
        return xray
    try:
        origin = np.asarray(plane["origin"], float).reshape(3)
        direction = np.asarray(plane["direction"], float).reshape(3, 3)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"xray_plane needs an origin (3 numbers) and a direction (3 x 3) ({e})") from e
    return Image(xray.array, xray.spacing, tuple(origin), direction, dict(xray.meta))


def default_landmarks(ct: Image) -> np.ndarray:
    """Without given landmarks: the centre and the 8 corners of the middle half of the CT box (LPS)."""
    size = np.asarray(ct.size, float) - 1
    corners = np.array([[a, b, c] for a in (0.25, 0.75) for b in (0.25, 0.75) for c in (0.25, 0.75)] + [[0.5] * 3])
    return ct.physical_points(corners * size)


@register
class XrayRegisterTask(Task):
    name = "xray-register"
    title = "Register an X-ray to a CT"
    inputs = (InputSpec("ct", 3, True, "preoperative CT in HU"),
              InputSpec("xray", 2, True, "intraoperative X-ray (2-D, or a one-slice volume)"))
    result_kind = "transform"
    stages = REGISTER_STAGES
    params_type = RegisterParams

    def validate(self, images: dict, params: dict) -> None:
        for name in ("ct", "xray"):
            if name not in images:
                raise InputError(f"xray-register needs the input '{name}'")
        unknown = set(images) - {"ct", "xray"}
        if unknown:
            raise InputError(f"xray-register does not take inputs {sorted(unknown)}; it takes ct and xray")
        if isinstance(images["ct"], Image) and images["ct"].ndim == 2:
            raise InputError(f"CT is 2-D (shape {images['ct'].array.shape}); a 3-D CT is needed")
        check_ct(images["ct"])
        xray = as_slice(images["xray"])
        carm_from_params(params, xray.array.shape[1], xray.array.shape[2], xray.spacing[:2])
        for key in ("init_pose", "truth_pose"):
            _pose_param(params, key)
        G.check_parameterization(params.get("parameterization", "se3_log_map"), params.get("convention"))
        if params.get("parameterization") == "matrix":
            raise InputError("the regressor cannot output a raw rotation matrix (not rigid): use rotation_9d")
        if params.get("values", "auto") not in ("auto", "intensity", "attenuation"):
            raise InputError(f"values must be auto, intensity or attenuation, got {params.get('values')}")
        if float(params.get("train_minutes") or 0) < 0:
            raise InputError("train_minutes must be 0 or more")

    def run(self, images: dict, params: dict, ctx: TaskContext) -> TransformResult:
        from . import ct as C
        from .metrics import double_geodesic, geodesic_se3, mtre
        from .refine import refine, resize_to, score
        from .xrayio import collimator_margins, crop, line_integral, to_tensor

        t_all = time.perf_counter()
        torch.manual_seed(0)
        ctx.step("prepare", 0.0, "preprocessing the X-ray")
        ct = images["ct"]
        xray = with_plane(as_slice(images["xray"]), params.get("xray_plane"))
        values = params.get("values", "auto")
        if values == "auto":
            values = "intensity" if str(params.get("photometric", "")).upper() == "MONOCHROME1" else "attenuation"
        a = xray.array[0].astype(np.float64)
        crop_mode = params.get("crop", "auto")  # auto: raw detector images only (a DRR's air is no collimator)
        rows, cols = collimator_margins(a) if crop_mode == "on" or (crop_mode == "auto" and values == "intensity") \
            else (0, 0)
        xray = crop(xray, rows, cols)
        lint = line_integral(xray.array[0], values)
        carm = carm_from_params(params, lint.shape[0], lint.shape[1], xray.spacing[:2])
        size = int(params.get("size") or 128)
        reg = carm.scaled(size)
        target = to_tensor(lint, reg.height, reg.width)
        frame = G.xray_frame_from_image(carm, xray.origin, xray.direction)
        centre = C.centre_ras(ct)
        ctx.step("prepare", 0.5, "building the renderer")
        ct_reg = C.downsample(ct, float(params.get("ct_spacing_mm") or 3.0))
        renderer = C.Renderer(ct_reg, reg, float(params.get("bone_attenuation") or 1.0), centre=centre)
        start = G.pose_matrix(G.start_pose(carm))
        report = {"carm": carm.to_dict(), "registration_size": [reg.width, reg.height], "values": values,
                  "collimator_crop_px": [int(cols), int(rows)]}

        # ---------------- patient-specific regressor: from the store, or trained now
        model = self._regressor(ct, ct_reg, carm, start, centre, params, ctx, report)
        candidates = {"start": start}
        init = _pose_param(params, "init_pose")
        if init is not None:
            candidates["init_pose"] = init
        if model is not None:
            from .xrayio import network_input

            with torch.no_grad():
                off = model.offsets(network_input(target, int(model.config["size"])))[0].double().numpy()
            candidates["regressor"] = off @ start
        ctx.step("initialise", 0.0, "choosing the start pose")
        coarse = carm.scaled(32)
        renderer.set_carm(coarse)
        scores = score(renderer, resize_to(target, coarse), list(candidates.values()))
        renderer.set_carm(reg)
        names = list(candidates)
        chosen = names[int(np.argmax(scores))] if init is None else "init_pose"
        report["start_candidates_ncc"] = dict(zip(names, [round(s, 4) for s in scores]))
        report["started_from"] = chosen

        def step(f, msg):
            ctx.step("refine", f, msg)

        levels = [tuple(int(v) for v in lv) for lv in params.get("levels") or ()] or None
        out = refine(renderer, target, reg, candidates[chosen], step=step, **({"levels": levels} if levels else {}))
        ctx.step("output", 0.0, "rendering the final DRR")
        with torch.no_grad():
            from diffdrr.pose import RigidTransform

            drr = renderer(RigidTransform(torch.as_tensor(out.pose, dtype=torch.float32)[None]))[0, 0].numpy()
        origin, direction = G.image_grid(reg, frame)
        drr_img = Image(drr[None].astype(np.float32), (reg.delx, reg.dely, 1.0), tuple(origin), direction)
        matrix = G.ct_to_xray_matrix(out.pose, frame, centre)
        report["drr_plane"] = {"origin": list(map(float, origin)), "direction": np.asarray(direction).tolist(),
                               "spacing": [reg.delx, reg.dely, 1.0]}
        report.update({"ncc": round(out.ncc, 5), "iterations": out.iterations,
                       "refine_seconds": round(out.seconds, 2),
                       "refine_cpu_seconds": round(out.cpu_seconds, 2), "threads": torch.get_num_threads(),
                       "pose": G.pose_json(out.pose),
                       "pose_matrix": out.pose.tolist()})
        truth = _pose_param(params, "truth_pose")
        if truth is not None:
            pts = params.get("landmarks")
            pts = np.asarray(pts, float).reshape(-1, 3) if pts is not None else default_landmarks(ct)
            m_true = G.ct_to_xray_matrix(truth, frame, centre)
            a_, b_ = torch.as_tensor(out.pose)[None], torch.as_tensor(truth)[None]
            rot, xyz, dbl = double_geodesic(a_, b_, carm.sid)
            report.update({"mtre_mm": round(mtre(matrix, m_true, pts), 3),
                           "start_mtre_mm": round(mtre(G.ct_to_xray_matrix(candidates[chosen], frame, centre),
                                                       m_true, pts), 3),
                           "geodesic_se3": round(float(geodesic_se3(a_, b_)), 5),
                           "geodesic_rotation_mm": round(float(rot), 3),
                           "geodesic_translation_mm": round(float(xyz), 3),
                           "double_geodesic_mm": round(float(dbl), 3), "landmarks": len(pts)})
        report["seconds"] = round(time.perf_counter() - t_all, 2)
        ctx.step("output", 1.0)
        return TransformResult(matrix, {"drr": drr_img}, report)

    def _regressor(self, ct, ct_reg, carm, start, centre, params, ctx, report):
        from ..store import ModelStore
        from . import ct as C
        from . import regressor as Reg

        minutes = float(params.get("train_minutes") or 0)
        steps = params.get("train_steps")
        config = Reg.default_config(params.get("parameterization", "se3_log_map"), params.get("convention"))
        store = ModelStore()
        version = Reg.model_key(ct.array, ct.spacing, carm, config)
        report["regressor_version"] = version
        found = [e for e in store.list(Reg.TASK) if e.version == version]
        if found:
            report["regressor"] = "from the model store"
            return Reg.load(found[0])
        if minutes <= 0 and not steps:
            report["regressor"] = "none (no trained model for this CT and train_minutes is 0)"
            return None
        ctx.step("train", 0.0, "training the pose regressor on DRRs of this CT")
        ct_train = C.downsample(ct, float(config["ct_spacing_mm"]))
        rend = C.Renderer(ct_train, carm.scaled(int(config["size"])), centre=centre)
        model, history = Reg.train(rend, carm, start, config, minutes, max_steps=int(steps) if steps else None,
                                   step=lambda f, msg, h=None: ctx.step("train", f, msg, h))
        sha = hashlib.sha256(np.ascontiguousarray(ct.array).tobytes()).hexdigest()
        Reg.save(store, version, model, carm, history, sha)
        report["regressor"] = f"trained now ({len(history)} steps), stored as {Reg.TASK} {version}"
        report["training_steps"] = len(history)
        return model


@register
class DrrTask(Task):
    name = "drr"
    title = "Render a synthetic X-ray (DRR) of a CT at a pose"
    inputs = (InputSpec("ct", 3, True, "CT in HU"),)
    result_kind = "volume"
    params_type = DrrParams

    def validate(self, images: dict, params: dict) -> None:
        if "ct" not in images:
            raise InputError("drr needs the input 'ct'")
        if isinstance(images["ct"], Image) and images["ct"].ndim == 2:
            raise InputError(f"CT is 2-D (shape {images['ct'].array.shape}); a 3-D CT is needed")
        check_ct(images["ct"])
        if params.get("pose") is None:
            raise InputError("drr needs a pose (JSON with parameterization, rotation, translation)")
        G.read_pose_json(params["pose"])
        carm_from_params(params, int(params.get("height") or 0), int(params.get("width") or 0))

    def run(self, images: dict, params: dict, ctx: TaskContext) -> VolumeResult:
        from diffdrr.pose import RigidTransform

        from . import ct as C

        ctx.step("render", 0.0, "building the renderer")
        ct = images["ct"]
        carm = carm_from_params(params, int(params["height"]), int(params["width"]))
        pose = G.read_pose_json(params["pose"])
        centre = C.centre_ras(ct)
        spacing = float(params.get("ct_spacing_mm") or 0)
        ct_r = C.downsample(ct, spacing) if spacing > 0 else ct
        renderer = C.Renderer(ct_r, carm, float(params.get("bone_attenuation") or 1.0), centre=centre)
        ctx.step("render", 0.5, "rendering")
        with torch.no_grad():
            img = renderer(RigidTransform(torch.as_tensor(pose, dtype=torch.float32)[None]))[0, 0].numpy()
        frame = G.default_xray_frame(carm, centre)
        origin, direction = G.image_grid(carm, frame)
        out = Image(img[None].astype(np.float32), (carm.delx, carm.dely, 1.0), tuple(origin), direction)
        ctx.step("render", 1.0)
        return VolumeResult({"drr": out}, {"carm": carm.to_dict(), "pose": G.pose_json(pose),
                                           "pose_matrix": pose.tolist()})
