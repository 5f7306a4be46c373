"""The ``brain-tumor`` task: T1, T1c, T2, FLAIR (at least FLAIR and T1c) -> necrosis / oedema / enhancing
tumour labelmap (BraTS 2023 values 1 / 2 / 3) on the first input's grid, and the nested regions' volumes.

Steps: inputs on a common grid, each brain averaged onto the model's isotropic grid and normalised there
(:func:`.preprocess.to_network_input`), sliding-window SegResNet (sigmoid ET / TC / WT), probabilities back to
the input grid (linear), a threshold with nesting enforced (ET within TC within WT) inside the brain, and
specks dropped (:func:`drop_specks`); the version's manifest ("postprocess") sets the threshold and rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError, ModelError
from ..image import Image
from ..results import SegmentationResult
from ..task import InputSpec, Task, TaskContext, register
from . import labels as L
from .nets import build_net, load_seg_weights
from .params import BrainParams
from .preprocess import probabilities_to_ref, to_network_input

TASK = "brain-tumor"
WEIGHT_FILE = "model.pt"
MODALITIES = ("t1", "t1c", "t2", "flair")
REQUIRED = ("t1c", "flair")
STAGES = {"prepare": 15, "network": 65, "output": 20}
# Post-processing of a version whose manifest names none (phantom-v1); real-data versions record theirs.
POSTPROCESS = {"threshold": 0.5, "min_ml": 0.0, "largest_core": True}


@dataclass
class BrainModel:
    net: torch.nn.Module
    network: dict
    manifest: dict
    version: str = ""


def load_model(entry) -> BrainModel:
    from ..store import check_task, load_state_dict

    check_task(entry, TASK)
    network = entry.manifest.get("network")
    if not isinstance(network, dict) or "init_filters" not in network:
        raise ModelError(f"model {entry.task} {entry.version} ({entry.dir}): its manifest has no SegResNet 'network' "
                         "config; it is not a brain-tumor model of this version of DeepSegRecon")
    try:
        net = build_net(network, with_vae=False)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"model {entry.version}: the network config in its manifest is invalid ({e})") from e
    state = load_state_dict(entry, WEIGHT_FILE, task=TASK)
    try:
        load_seg_weights(net, {k: v.float() for k, v in state.items()})
    except (RuntimeError, KeyError) as e:
        raise ModelError(f"{WEIGHT_FILE} in model {entry.task} {entry.version} does not fit the network its "
                         f"manifest describes ({str(e).splitlines()[0]})") from e
    net.eval()
    return BrainModel(net, network, dict(entry.manifest), entry.version)


def check_inputs(images: dict) -> None:
    from ..validate import check_image

    unknown = sorted(set(images) - set(MODALITIES))
    if unknown:
        raise InputError(f"{TASK} takes the inputs {', '.join(MODALITIES)}; unknown: {', '.join(unknown)}")
    if len(images) < 2:
        raise InputError(f"{TASK} needs at least two MRI inputs (FLAIR and T1c); got "
                         f"{', '.join(images) or 'none'}")
    missing = [m for m in REQUIRED if m not in images]
    if missing:
        raise InputError(f"{TASK} needs at least FLAIR and T1c; missing: {', '.join(missing)}")
    for name, img in images.items():
        if not isinstance(img, Image):
            raise InputError(f"input {name} is not an image")
        if img.ndim != 3:
            raise InputError(f"input {name} is {img.ndim}-D (shape {img.array.shape}); a 3-D MRI volume is needed")
        a = np.asarray(img.array)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InputError(f"input {name} has {int((~np.isfinite(a)).sum())} NaN or infinite voxels")
        if not np.any(a != 0):
            raise InputError(f"input {name} has no brain voxels (every voxel is 0); a skull-stripped MRI is needed")
        check_image(img, f"input {name}", ndim=3)


def predict(images: dict, model: BrainModel, device="cpu", step: Callable | None = None,
            overlap: float = 0.25) -> dict:
    """The network's (3 [ET, TC, WT], ...) probabilities on the first input's grid, with that grid ("ref"), the
    brain mask, the model grid, the inputs used and timings."""
    from ..inference import sliding_window

    step = step or (lambda stage, fraction=0.0, message="": None)
    device = torch.device(device)
    t0 = time.perf_counter()
    net_cfg = model.network
    mods = list(net_cfg.get("modalities") or MODALITIES)
    order = [m for m in MODALITIES if m in images]
    step("prepare", 0.0, "normalising the inputs")
    norm = str((model.manifest.get("input_spec") or {}).get("normalize") or "robust")
    x, grid, ref, brain, used = to_network_input({m: images[m] for m in order}, mods, float(net_cfg["spacing_mm"]),
                                                 "zscore" if norm.startswith("zscore") else "robust")
    timings = {"prepare_s": time.perf_counter() - t0}
    step("prepare", 1.0)
    t0 = time.perf_counter()
    roi = [int(r) for r in net_cfg["roi"]]
    full, box = x.shape[2:], brain_box(x[0])  # the network sees the brain cropped, as in training
    x = x[(slice(None), slice(None)) + box]
    size = x.shape[2:]
    pad = [max(0, r - s) for r, s in zip(roi, size)]
    if any(pad):
        x = torch.nn.functional.pad(x, [v for p in reversed(pad) for v in (p // 2, p - p // 2)])
    logits = sliding_window(model.net, x, roi, device, overlap=overlap, sw_batch_size=1 if device.type == "cpu" else 4,
                            progress=lambda f: step("network", f, "SegResNet (ET, TC, WT)"))[0]
    if any(pad):
        logits = logits[(slice(None),) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, size))]
    probs = np.zeros((logits.shape[0],) + tuple(full), np.float32)
    probs[(slice(None),) + box] = torch.sigmoid(logits).numpy()
    del logits, x
    timings["network_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step("output", 0.0, "labels on the input grid")
    p = probabilities_to_ref(probs, grid, ref)
    timings["resample_s"] = time.perf_counter() - t0
    return {"p": p, "ref": ref, "brain": brain, "grid": grid, "used": used, "timings": timings}


def brain_box(x: torch.Tensor, margin: int = 4) -> tuple:
    """Slices of the bounding box of the non-zero voxels of (C, k, j, i) ``x``, ``margin`` voxels wider."""
    nz = np.argwhere(np.asarray((x != 0).any(0)))
    if not len(nz):
        return tuple(slice(0, n) for n in x.shape[1:])
    lo, hi = np.maximum(nz.min(0) - margin, 0), np.minimum(nz.max(0) + margin + 1, x.shape[1:])
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def segment(images: dict, model: BrainModel, device="cpu", step: Callable | None = None,
            overlap: float = 0.25) -> SegmentationResult:
    """Segment a brain tumour in ``images`` ({modality: Image}); see the module docstring."""
    step = step or (lambda stage, fraction=0.0, message="": None)
    t_all = time.perf_counter()
    out = predict(images, model, device, step, overlap)
    ref, grid, used, timings = out["ref"], out["grid"], out["used"], out["timings"]
    t0 = time.perf_counter()
    pp = model.manifest.get("postprocess")
    post = {**POSTPROCESS, **(pp if isinstance(pp, dict) else {})}
    et, tc, wt = regions_from_probabilities(out.pop("p"), out["brain"], ref.spacing, **post)
    lab = L.from_regions(et, tc, wt)
    timings["output_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    step("output", 1.0)
    return make_result(ref, lab, {"model": model.version, "device": str(device), "inputs_used": used,
                                  "inputs_missing": [m for m in MODALITIES if m not in used],
                                  "model_grid": {"shape_kji": list(grid.array.shape), "spacing_mm": list(grid.spacing)},
                                  "postprocess": post, "timings_s": {k: round(v, 2) for k, v in timings.items()}})


def regions_from_probabilities(p: np.ndarray, brain: np.ndarray, spacing, threshold: float = 0.5,
                               min_ml: float = 0.0, largest_core: bool = True):
    """ET / TC / WT masks from (3, ...) probabilities: threshold inside the brain, nesting (ET in TC in WT),
    then specks dropped. ``largest_core`` (phantom-v1's rule): :func:`keep_connected_tumour`. Otherwise every
    component (26-connected) smaller than ``min_ml`` is dropped, core and whole tumour alike, so several
    separate tumours (multifocal glioma) are all kept."""
    from scipy import ndimage as ndi

    et, tc, wt = ((p[i] > threshold) & brain for i in range(3))
    if largest_core:
        return keep_connected_tumour(et, tc, wt)
    voxels = max(1, int(round(min_ml * 1000.0 / float(np.prod(spacing)))))
    tc &= wt
    full = np.ones((3, 3, 3), bool)
    for mask in (wt, tc):
        lab, n = ndi.label(mask, full)
        if n:
            small = np.bincount(lab.ravel()) < voxels
            small[0] = False
            mask[small[lab]] = False
    tc &= wt
    return et & tc, tc, wt


def keep_connected_tumour(et, tc, wt):
    """Drop specks: the tumour core is its largest connected component; the whole tumour keeps the components
    that touch that core (the largest one where no core was found); enhancing tumour stays inside the core."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(tc)
    if n:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        tc = lab == int(np.argmax(sizes))
    lab, n = ndi.label(wt | tc)
    if n:
        if tc.any():
            keep = np.unique(lab[tc])
        else:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            keep = [int(np.argmax(sizes))]
        wt = np.isin(lab, [k for k in keep if k > 0])
    return et & tc, tc, wt


def make_result(ref: Image, lab: np.ndarray, extra: dict) -> SegmentationResult:
    img = Image(lab.astype(np.uint8), ref.spacing, ref.origin, ref.direction.copy(), {"task": TASK,
                                                                                    "labels": "brats2023"})
    present = [v for v in (L.NCR, L.ED, L.ET) if (lab == v).any()]
    absent = [L.SUBREGION_NAMES[v] for v in (L.NCR, L.ED, L.ET) if v not in present]
    report = {**extra, "labels": "brats2023 (1 necrosis, 2 oedema, 3 enhancing)",
              "volumes_ml": L.region_volumes_ml(lab, ref.spacing)}
    return SegmentationResult(img, L.subregion_infos(present), absent, report)


@register
class BrainTumorTask(Task):
    name = TASK
    params_type = BrainParams
    title = "Segment Brain Tumour"
    inputs = tuple(InputSpec(m, 3, m in REQUIRED, d) for m, d in (
        ("t1", "T1-weighted MRI"), ("t1c", "contrast-enhanced T1 MRI"), ("t2", "T2-weighted MRI"),
        ("flair", "T2-FLAIR MRI")))
    uses_model = True
    stages = STAGES

    def validate(self, images: dict, params: dict) -> None:
        check_inputs(images)

    def run(self, images: dict, params: dict, ctx: TaskContext) -> SegmentationResult:

        p = self.parse_params(params)
        self.validate(images, p)
        device = resolve_device(p.device or ctx.device or "auto")
        ctx.step("prepare", 0.0, "loading the model")
        entry = ctx.model_entry(TASK, p.model)
        model = load_model(entry)
        return segment(images, model, device, ctx.step)
