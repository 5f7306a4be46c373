"""The ``slices`` task: CT volume -> one segment per organ of a label set, by TransUNet slice by slice.

Params: ``labels`` (label set name or JSON file, default ``abdomen``), ``model`` (version), ``device``,
``batch`` (slices per network call), ``postprocess`` (largest 3-D component per organ, default on),
``window`` (HU range mapped to [0, 1]; default the model's, [-125, 275]).
Organs of the set that the model cannot segment are refused; organs not found are reported absent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError, ModelError
from ..image import Image
from ..results import SegmentationResult
from ..task import InputSpec, Task, TaskContext, register
from . import pipeline as P
from .labels import LabelSet, read_label_set
from .params import SliceParams

TASK = "slices"
WEIGHTS = "model.pt"
STAGES = {"prepare": 10, "network": 70, "post": 15, "output": 5}


@dataclass
class SliceModel:
    net: torch.nn.Module
    network: dict
    version: str = ""

    @property
    def classes(self) -> list:
        return list(self.network["classes"])


def load_model(entry) -> SliceModel:
    from ..store import check_task, load_state_dict
    from .nets import build_net

    check_task(entry, TASK)
    net_cfg = entry.manifest.get("network")
    if not isinstance(net_cfg, dict) or not net_cfg.get("classes"):
        raise ModelError(f"model {entry.task} {entry.version}: its manifest has no 'network' with 'classes'")
    try:
        net = build_net(net_cfg)
        state = load_state_dict(entry, WEIGHTS, task=TASK)
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{WEIGHTS} in model {entry.task} {entry.version} does not fit its network ({first})") from e
    net.eval()
    return SliceModel(net, dict(net_cfg), entry.version)


def ct_warning(image: Image):
    """A message when the intensities do not look like CT in HU (air near -1000, soft tissue ~0..100)."""
    a = np.asarray(image.array)
    sample = a[:: max(1, a.shape[0] // 16)].astype(np.float32).ravel()
    p1, p50, p99 = np.percentile(sample, [1, 50, 99])
    if p1 > -500 or p99 < 0 or p99 - p1 < 300:
        return (f"the intensities (1st-99th percentile {p1:.0f}..{p99:.0f}) do not look like CT in Hounsfield "
                "units (air -1000, soft tissue 0..100); the organs found may be wrong")
    return None


def segment(image: Image, model: SliceModel, labelset: LabelSet, device="cpu", step=None, batch: int = 16,
            postprocess: bool = True, window=None) -> SegmentationResult:
    """Segment the organs of ``labelset`` in the CT ``image`` (HU) with ``model``; ``window``: HU range mapped
    to [0, 1] (default: the model's, the one it was trained with)."""
    from ..frames import canonical_frame

    step = step or (lambda stage, fraction=0.0, message="": None)
    missing = [n for n in labelset.names if n not in model.classes]
    if missing:
        raise InputError(f"model {model.version} does not segment {', '.join(missing)} (it knows "
                         f"{', '.join(model.classes)}); use a label set with these organs only")
    t0 = time.perf_counter()
    device = torch.device(device)
    net = model.net.to(device)
    cfg = model.network
    step("prepare", 0.0, "windowing and resizing slices")
    can = canonical_frame(image)
    vol = can.to_canonical(image.array)
    grid = P.slice_grid(vol, can.spacing[1:], cfg)
    window = tuple(window or cfg.get("window") or P.WINDOW)
    x = P.slices_to_net(vol, grid, window)
    del vol
    timings = {"prepare_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    lab = P.predict(net, x, grid, cfg, device, batch, lambda f: step("network", f, "TransUNet, slice by slice"))
    timings["network_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    # network classes -> the label set's values (organs outside the set become background)
    lut = np.zeros(256, np.uint8)
    for c, name in enumerate(model.classes, start=1):
        if name in labelset.names:
            lut[c] = labelset.by_name(name).value
    lab = lut[lab]
    if postprocess:
        step("post", 0.0, "largest component per organ")
        P.largest_components(lab, [o.value for o in labelset.organs])
    step("post", 1.0)
    labelmap = can.from_canonical(lab)
    del lab
    timings["post_s"] = time.perf_counter() - t1
    counts = np.bincount(labelmap.ravel(), minlength=256)
    vox_ml = float(np.prod(image.spacing)) / 1000.0
    present = [o for o in labelset.organs if counts[o.value] > 0]
    report = {"model": model.version, "device": str(device), "label_set": labelset.name,
              "network_size": int(cfg["img_size"]), "pixel_mm": grid.pixel_mm, "window_hu": list(window),
              "context": int(cfg.get("context", 0)),
              "organs": {o.name: {"label": o.value, "volume_ml": round(float(counts[o.value] * vox_ml), 2)}
                         for o in present},
              "timings_s": {k: round(v, 2) for k, v in {**timings, "total_s": time.perf_counter() - t0}.items()}}
    warning = ct_warning(image)
    if warning:
        report["warnings"] = [warning]
    out = Image(labelmap, image.spacing, image.origin, image.direction.copy(), {"task": TASK})
    step("output", 1.0)
    return SegmentationResult(out, [o.info() for o in present],
                              [o.name for o in labelset.organs if counts[o.value] == 0], report)


@register
class SlicesTask(Task):
    name = TASK
    params_type = SliceParams
    title = "Segment Slices"
    inputs = (InputSpec("image", 3, True, "CT volume in Hounsfield units"),)
    uses_model = True
    stages = STAGES

    def validate(self, images: dict, params: dict) -> None:
        super().validate(images, params)
        b = params.get("batch", 16)
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InputError(f"batch must be a whole number of slices, 1 or more, got {b!r}")
        read_label_set(params.get("labels"))  # a bad label set file is refused before any work
        w = params.get("window")
        if w is not None and not (isinstance(w, (list, tuple)) and len(w) == 2
                                  and all(isinstance(v, (int, float)) for v in w) and w[0] < w[1]):
            raise InputError(f"window must be two HU values, low < high, got {w!r}")

    def run(self, images: dict, params: dict, ctx: TaskContext) -> SegmentationResult:

        p = self.parse_params(params)
        labelset = read_label_set(p.labels)
        device = resolve_device(p.device or ctx.device or "auto")
        ctx.step("prepare", 0.0, "loading the model")
        entry = ctx.model_entry(TASK, p.model)
        model = load_model(entry)
        return segment(images["image"], model, labelset, device, ctx.step, p.batch, p.postprocess, p.window)
