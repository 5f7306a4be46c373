"""The ``cbct-recon`` task: sparse-view cone-beam projections (or a CT to simulate them from) -> DIF-Gaussian
reconstruction and the FDK reconstruction of the same projections, with PSNR/SSIM against a reference.

Inputs: ``projections`` (stack (views, rows, columns) of line integrals, with ``params["geometry"]``) or ``ct``
(HU volume; ``views`` projections are simulated with Poisson + electronic noise); optional ``reference`` (HU, on the
reconstruction grid; a simulated CT is its own reference). Outputs are HU volumes on the geometry's volume grid.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import InputError, ModelError
from ..task import InputSpec, Task, TaskContext, VolumeResult, register

TASK = "cbct-recon"
WEIGHTS = "dif_gaussian.pt"
STAGES = {"prepare": 5, "simulate": 20, "fdk": 10, "network": 35, "refine": 20, "metrics": 10}
FILTERS = ("ram-lak", "shepp-logan")
MAX_REFINE_ITERS = 20


def load_model(entry):
    """DIF-Gaussian rebuilt from the manifest's ``network`` with its verified weights (weights_only)."""
    from ..store import check_task, load_state_dict
    from .net import DIFGaussian

    check_task(entry, TASK)
    cfg = entry.manifest.get("network")
    if not isinstance(cfg, dict) or cfg.get("arch") != "dif-gaussian":
        raise ModelError(f"model {entry.task} {entry.version} ({entry.dir}) has no DIF-Gaussian network config")
    state = load_state_dict(entry, WEIGHTS, task=TASK)
    try:
        model = DIFGaussian(cfg)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{WEIGHTS} in model {entry.task} {entry.version} does not fit its network config ({first})") from e
    return model.eval()


def full_circle(angles_deg) -> bool:
    """True when the views are equally spaced over 360 deg (the layout the shipped weights learnt)."""
    a = np.sort(np.mod(np.asarray(angles_deg, float), 360.0))
    steps = np.diff(np.append(a, a[0] + 360.0))
    return len(a) > 1 and bool(np.all(np.abs(steps - 360.0 / len(a)) < 0.5))


def model_for(store, version, angles_deg):
    """``version`` when given; else a version trained for exactly this many views equally spaced over 360 deg
    (``input_spec.views``; user versions before built-in ones, then the newest); else the default version."""
    if version:
        return store.get(TASK, version)
    n, full = len(angles_deg), full_circle(angles_deg)

    def fits(e):
        spec = e.manifest.get("input_spec") or {}
        views = spec.get("views")
        return full and isinstance(views, list) and n in views and spec.get("arc_deg") == 360 \
            and "error" not in e.manifest

    # an imported copy is picked only when imported as the default (an import never changes unpinned runs)
    found = [e for e in store.list(TASK) if fits(e) and (e.is_default or not e.manifest.get("imported"))]
    if not found:
        return store.get(TASK)
    return max(found, key=lambda e: (not e.builtin, str(e.manifest.get("created") or ""), e.version))


def geometry_of(images: dict, params: dict):
    """The geometry of the job: from ``params['geometry']`` (projections) or built around the CT grid."""
    from .geometry import ConeGeometry, geometry_for_grid

    if "projections" in images:
        if not params.get("geometry"):
            raise InputError("projections need a geometry (geometry.json beside them, or params['geometry'])")
        return ConeGeometry.from_dict(params["geometry"])
    views, det = params.get("views"), params.get("detector", 128)
    if not isinstance(views, int) or isinstance(views, bool) or views < 2:
        raise InputError(f"simulating from a CT needs a number of views of 2 or more, got {views!r}")
    if not isinstance(det, int) or det < 8:
        raise InputError(f"the detector needs 8 or more pixels a side, got {det!r}")
    return geometry_for_grid(images["ct"], views, detector=det, arc_deg=float(params.get("arc_deg", 360.0)))


@register
class CBCTReconTask(Task):
    name = TASK
    title = "Reconstruct CBCT"
    result_kind = "volume"
    inputs = (InputSpec("projections", 3, False, "projection stack (views, rows, columns) of line integrals"),
              InputSpec("ct", 3, False, "CT volume (HU) to simulate projections from"),
              InputSpec("reference", 3, False, "reference CT (HU) on the reconstruction grid"))
    uses_model = True
    model_task = TASK
    stages = STAGES

    def default_params(self) -> dict:
        return {"device": "auto", "model": None, "geometry": None, "views": None, "detector": 128, "arc_deg": 360.0,
                "noise": True, "photons": 1e5, "electronic_sd": 10.0, "seed": 0, "filter": "ram-lak",
                "query_res": 64, "refine_iters": None, "keep_projections": False}

    def validate(self, images: dict, params: dict) -> None:
        from ..validate import check_image
        from .projio import check_projections

        unknown = set(images) - {s.name for s in self.inputs}
        if unknown:
            raise InputError(f"{self.name} does not take inputs {sorted(unknown)}")
        if ("projections" in images) == ("ct" in images):
            raise InputError("give either a projection stack (with its geometry) or a CT to simulate from")
        if params.get("filter", "ram-lak") not in FILTERS:
            raise InputError(f"unknown filter '{params.get('filter')}'; use {' or '.join(FILTERS)}")
        iters = params.get("refine_iters")  # None: the recommended count (recon.REFINE_ITERS)
        if iters is not None and (not isinstance(iters, int) or isinstance(iters, bool)
                                  or not 0 <= iters <= MAX_REFINE_ITERS):
            raise InputError(f"refine_iters must be a whole number from 0 to {MAX_REFINE_ITERS}, got {iters!r}")
        if "ct" in images:
            check_image(images["ct"], "CT", ndim=3)  # before the geometry is built around its grid
            for key, low in (("photons", 0.0), ("electronic_sd", -1.0)):
                v = params.get(key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > low:
                    raise InputError(f"{key} must be a finite number {'above 0' if low == 0 else '0 or more'}, "
                                     f"got {v!r}")
        geo = geometry_of(images, params)
        if "projections" in images:
            check_projections(images["projections"].array, geo)
        ref = images.get("reference")
        if ref is not None:
            check_image(ref, "reference", ndim=3)
            if not ref.same_grid(geo.grid_image()):
                raise InputError(f"the reference has another geometry than the reconstruction grid (reference "
                                 f"{ref.size} voxels at {tuple(round(s, 4) for s in ref.spacing)} mm, grid "
                                 f"{geo.volume_size} at {geo.volume_spacing} mm; origin and direction must match too)")

    def model_version(self, images: dict, params: dict, store):
        return model_for(store, None, geometry_of(images, params).angles_deg).version

    def run(self, images: dict, params: dict, ctx: TaskContext) -> VolumeResult:
        import torch

        from ..device import resolve_device
        from ..store import ModelStore, entry_from_dir
        from .projector import add_noise, fdk, forward_project, hu_to_mu, mu_to_hu
        from .projio import stack_image
        from .recon import REFINE_ITERS, grid_hu, metrics, network_grid, refine

        params = {**self.default_params(), **(params or {})}
        device = resolve_device(params.get("device") or ctx.device or "auto")
        timings = {}
        t = time.perf_counter()
        ctx.step("prepare", 0.0, "loading the model")
        geo = geometry_of(images, params)
        if ctx.model_dir is not None:
            entry = entry_from_dir(ctx.model_dir)
        else:
            entry = model_for(ModelStore(), params.get("model"), geo.angles_deg)
        model = load_model(entry).to(device)
        reference = images.get("reference")
        timings["prepare_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if "ct" in images:
            ctx.step("simulate", 0.0, f"simulating {geo.n_views} projections")
            mu = hu_to_mu(torch.from_numpy(np.asarray(images["ct"].array, np.float32)).to(device))
            proj = forward_project(mu, geo)
            del mu
            if params.get("noise", True):
                proj = add_noise(proj, float(params["photons"]), float(params["electronic_sd"]), int(params["seed"]))
            reference = reference if reference is not None else images["ct"]
        else:
            proj = torch.from_numpy(np.asarray(images["projections"].array, np.float32)).to(device)
        timings["simulate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ctx.step("fdk", 0.0, "FDK")
        fdk_hu = mu_to_hu(fdk(proj, geo, params["filter"])).cpu().numpy().astype(np.float32)
        timings["fdk_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ctx.step("network", 0.0, "DIF-Gaussian")
        net, geo_q = network_grid(model, proj, geo, params.get("query_res"),
                                  progress=lambda f: ctx.step("network", f, "DIF-Gaussian"))
        timings["dif_gaussian_s"] = time.perf_counter() - t
        t = time.perf_counter()
        iters = REFINE_ITERS if params.get("refine_iters") is None else int(params["refine_iters"])
        rec = net
        if iters:
            ctx.step("refine", 0.0, "data consistency")
            rec = refine(net, proj, geo_q, iters, progress=lambda f: ctx.step("refine", f, "data consistency"))
        rec_hu = grid_hu(rec, geo)
        del rec
        timings["refine_s"] = time.perf_counter() - t
        volumes = {"recon": geo.grid_image(rec_hu), "fdk": geo.grid_image(fdk_hu)}
        if params.get("keep_projections"):
            volumes["projections"] = stack_image(proj.cpu().numpy(), geo)
        report = {"model": entry.version, "device": str(device), "views": geo.n_views,
                  "geometry": geo.to_dict(), "simulated": "ct" in images,
                  "filter": params["filter"], "refine_iters": iters, "metrics": None}
        if reference is not None:
            ctx.step("metrics", 0.0, "PSNR and SSIM")
            ref = np.asarray(reference.array, np.float32)
            report["metrics"] = {"dif_gaussian": metrics(rec_hu, ref), "fdk": metrics(fdk_hu, ref)}
            if iters:  # the network alone, before the data-consistency steps
                report["metrics"]["dif_gaussian_network_only"] = metrics(grid_hu(net, geo), ref)
        del net
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        ctx.step("metrics", 1.0)
        return VolumeResult(volumes, report)

