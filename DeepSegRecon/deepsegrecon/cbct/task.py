"""The ``cbct-recon`` task: sparse-view cone-beam projections (or a CT to simulate them from) -> the chosen method's
volume (``recon``: the default method, :data:`.methods.DEFAULT`, or SART + U-Net refiner, SART, DIF-Gaussian + data
consistency, FDK, conjugate gradient, ADMM-TV), FDK and
every compared method side by side, each with its PSNR/SSIM against a reference and its time. The projector and
classical methods run on RTK when ``itk-rtk`` imports (CPU), else on torch; ``report["backend"]`` says which.

Inputs: ``projections`` (stack (views, rows, columns) of line integrals, with ``params["geometry"]``) or ``ct``
(HU volume; ``views`` projections are simulated with Poisson + electronic noise); optional ``reference`` (HU, on the
reconstruction grid; a simulated CT is its own reference). Outputs are HU volumes on the geometry's volume grid.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import InputError, ModelError
from ..results import VolumeResult
from ..task import InputSpec, Task, TaskContext, register
from .geometry import full_circle
from .params import ReconParams

TASK = "cbct-recon"
WEIGHTS = "dif_gaussian.pt"
STAGES = {"prepare": 5, "simulate": 15, "classical": 30, "network": 25, "refine": 15, "metrics": 10}
FILTERS = ("ram-lak", "shepp-logan", "hann")
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
    params_type = ReconParams
    title = "Reconstruct CBCT"
    result_kind = "volume"
    inputs = (InputSpec("projections", 3, False, "projection stack (views, rows, columns) of line integrals"),
              InputSpec("ct", 3, False, "CT volume (HU) to simulate projections from"),
              InputSpec("reference", 3, False, "reference CT (HU) on the reconstruction grid"))
    uses_model = True
    stages = STAGES

    def validate(self, images: dict, params: dict) -> None:
        from ..validate import check_image
        from .projio import check_projections

        unknown = set(images) - {s.name for s in self.inputs}
        if unknown:
            raise InputError(f"{self.name} does not take inputs {sorted(unknown)}")
        if ("projections" in images) == ("ct" in images):
            raise InputError("give either a projection stack (with its geometry) or a CT to simulate from")
        check_methods(params)
        from ..device import resolve_device
        from .methods import resolve_backend

        methods_to_run(params, resolve_backend(params.get("backend") or "auto",
                                               str(resolve_device(params.get("device") or "auto"))))
        if params.get("filter", "hann") not in FILTERS:
            raise InputError(f"unknown filter '{params.get('filter')}'; use {' or '.join(FILTERS)}")
        iters = params.get("refine_iters")  # None: the recommended count (methods.DC, recon.REFINE_ITERS)
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
        from . import methods as M
        from .projector import add_noise, hu_to_mu, mu_to_hu
        from .projio import stack_image
        from .recon import REFINE_ITERS, grid_hu, metrics, network_grid, refine

        params = {**self.default_params(), **(params or {})}
        device = resolve_device(params.get("device") or ctx.device or "auto")
        backend = M.resolve_backend(params.get("backend") or "auto", str(device))
        method, runs = methods_to_run(params, backend)
        timings = {}
        t = time.perf_counter()
        ctx.step("prepare", 0.0, "loading the model")
        geo = geometry_of(images, params)
        entry = model = None
        if "dif-gaussian" in runs:
            entry = ctx.model if ctx.model is not None else entry_from_dir(ctx.model_dir) \
                if ctx.model_dir is not None else model_for(ModelStore(), params.get("model"), geo.angles_deg)
            model = load_model(entry).to(device)
        ref_entry = refiner_model = None
        skipped = [f"{m} (needs itk-rtk; backend {backend})" for m in M.NEEDS_RTK
                   if backend != "rtk" and m in (M.METHODS if params.get("compare") is None else params["compare"])]
        if "sart-unet" in runs:
            ref_entry = refiner_entry(ctx, params)
            if ref_entry is None and params.get("method") == "sart-unet":
                raise ModelError("no installed cbct-recon version holds the SART refiner (refiner.pt)")
            if ref_entry is None:  # the default without its weights: SART alone, said so
                ctx.step("prepare", 1.0, "no SART refiner installed: sart-unet skipped")
                skipped.append("sart-unet (no refiner installed)")
                method = "sart" if method == "sart-unet" else method
                runs = tuple(m for m in M.METHODS if m in runs and m != "sart-unet" or m == method)
            else:
                from .refiner import load as load_refiner

                refiner_model = load_refiner(ref_entry)
        reference = images.get("reference")
        timings["prepare_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if "ct" in images:
            ctx.step("simulate", 0.0, f"simulating {geo.n_views} projections ({backend})")
            proj = M.simulate(hu_to_mu(np.asarray(images["ct"].array, np.float32)), geo, backend, str(device))
            if params.get("noise", True):
                proj = add_noise(torch.from_numpy(proj), float(params["photons"]), float(params["electronic_sd"]),
                                 int(params["seed"])).numpy()
            reference = reference if reference is not None else images["ct"]
        else:
            proj = np.asarray(images["projections"].array, np.float32)
        proj = np.ascontiguousarray(proj, np.float32)
        timings["simulate_s"] = time.perf_counter() - t
        ref = None if reference is None else np.asarray(reference.array, np.float32)
        volumes, scores = {}, {}
        iters = None
        kept = {}  # SART on the iterative grid, reused by sart-unet
        for n, name in enumerate(m for m in M.METHODS[1:] + M.METHODS[:1] if m in runs):
            key = M.KEYS[name]
            t = time.perf_counter()
            if name == "dif-gaussian":
                ctx.step("network", 0.0, "DIF-Gaussian")
                net, geo_q = network_grid(model, torch.from_numpy(proj).to(device), geo, params.get("query_res"),
                                          progress=lambda f: ctx.step("network", f, "DIF-Gaussian"))
                timings["dif_gaussian_network_s"] = time.perf_counter() - t
                net_hu = grid_hu(net, geo)
                iters = (M.DC["iters"] if backend == "rtk" else REFINE_ITERS) if params.get("refine_iters") is None \
                    else int(params["refine_iters"])
                if ref is not None and iters:  # the network alone, before the data consistency
                    scores["dif_gaussian_network_only"] = metrics(net_hu, ref)
                ctx.step("refine", 0.0, "data consistency")
                if iters and backend == "rtk":
                    hu = mu_to_hu(M.data_consistency(hu_to_mu(net_hu), proj, geo, iters))
                elif iters:
                    hu = grid_hu(refine(net, torch.from_numpy(proj).to(device), geo_q, iters), geo)
                else:
                    hu = net_hu
                del net, net_hu
            elif name == "sart-unet":
                ctx.step("refine", 0.0, M.TITLES[name])
                hu = mu_to_hu(M.sart_unet(proj, geo, refiner_model, backend, kept.get("sart"), M.UNET_DC["iters"]))
                if "sart" in kept:  # SART itself was run once, for both
                    t -= timings["sart_s"]
            else:
                ctx.step("classical", n / max(1, len(runs)), f"{M.TITLES[name]} ({backend})")
                hu = mu_to_hu(M.classical(name, proj, geo, backend, params["filter"], device=str(device), keep=kept))
            hu = np.asarray(hu, np.float32)
            timings[f"{key}_s"] = time.perf_counter() - t
            if ref is not None:
                scores[key] = metrics(hu, ref)
            volumes[key] = geo.grid_image(hu)
        key = M.KEYS[method]
        volumes = {"recon": volumes[key], **{k: v for k, v in volumes.items() if k != key or k == "fdk"}}
        if params.get("keep_projections"):
            volumes["projections"] = stack_image(proj, geo)
        report = {"method": method, "backend": backend, "model": entry.version if entry else None,
                  "refiner_model": ref_entry.version if ref_entry else None, "skipped": skipped or None,
                  "device": str(device), "views": geo.n_views, "geometry": geo.to_dict(), "simulated": "ct" in images,
                  "filter": params["filter"], "refine_iters": iters, "methods": list(runs),
                  "data_consistency": dc_text(backend, iters) if iters is not None else None,
                  "metrics": scores or None}
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        ctx.step("metrics", 1.0)
        return VolumeResult(volumes, report)


def refiner_entry(ctx, params: dict):
    """The version holding the SART refiner: the job's model when it holds one, else the store's newest."""
    from ..store import ModelStore, entry_from_dir
    from .refiner import WEIGHTS, entry_for

    if ctx.model_dir is not None:
        e = ctx.model if ctx.model is not None else entry_from_dir(ctx.model_dir)
        if WEIGHTS in e.files:
            return e
    return entry_for(ModelStore(), params.get("model"))


def methods_to_run(params: dict, backend: str) -> tuple:
    """(the method whose volume is ``recon``, every method to run: it, FDK, and ``compare`` (default: all that
    ``backend`` runs))."""
    from . import methods as M

    method = params.get("method") or default_method(backend)
    if method not in M.available(backend):
        why = "itk-rtk does not import here" if not M.rtk_backend.available() else "the torch backend was chosen"
        raise InputError(f"{M.TITLES[method]} needs itk-rtk ({why}); use {', '.join(M.available(backend))}")
    compare = params.get("compare")
    compare = M.available(backend) if compare is None else [m for m in compare if m in M.available(backend)]
    return method, tuple(m for m in M.METHODS if m in {method, "fdk", *compare})


def default_method(backend: str) -> str:
    from . import methods as M

    return M.DEFAULT if M.DEFAULT in M.available(backend) else M.DEFAULT_TORCH


def dc_text(backend: str, iters: int) -> str:
    from . import methods as M

    if not iters:
        return "none"
    if backend == "rtk":
        return f"RTK {M.DC['solver']} x {iters} from the network's volume (grid of at most {M.ITER_RES} per axis)"
    return f"torch FDK-residual steps x {iters} on the network's grid"


def check_methods(params: dict) -> None:
    from . import methods as M

    for key, allowed in (("method", M.METHODS), ("backend", M.BACKENDS)):
        v = params.get(key)
        if v is not None and v not in allowed:
            raise InputError(f"unknown {key} '{v}'; use one of {', '.join(allowed)}")
    compare = params.get("compare")
    if compare is not None and (isinstance(compare, str) or not all(m in M.METHODS for m in compare)):
        raise InputError(f"compare must be a list of methods from {', '.join(M.METHODS)}, got {compare!r}")
    if params.get("backend") == "rtk" and not M.rtk_backend.available():
        raise InputError("backend 'rtk' was asked for, but itk-rtk does not import here")
