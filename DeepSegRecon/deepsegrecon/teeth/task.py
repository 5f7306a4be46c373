"""The ``teeth`` task: dental CBCT -> one segment per tooth (FDI 11-48), maxilla and mandible.

Pipeline (all in the canonical S/P/L re-indexing of the input grid, see :mod:`.nets`):

1. stage 1, whole volume at about 1 mm: background / maxilla / mandible / teeth;
2. stage 2, teeth bounding box (+ margin) at about 0.5 mm: background + 16 tooth classes
   (jaw x position), with coordinate channels measured from the stage-1 teeth box; the box is cut to the
   dentition-sized window that holds most of the stage-1 teeth's thick parts (crowns, not bone plates:
   :func:`.plausible.dental_window`) and to the pieces joined to the crowns or at their height
   (:func:`.plausible.near_crowns`);
3. instance split and FDI numbering in physical space (a scan of one arch only, told by where the crowns
   lie, has all its teeth in that jaw; a root cut off its crown is joined back), borders between teeth re-decided at the
   stage-2 image's dark gaps between roots (:mod:`.postprocess`); then the plausibility gate
   (:func:`.plausible.gate`): pieces that are no teeth are dropped and reported, and with no dental arch
   left the result is withheld (:class:`.plausible.NoTeethFound`, exit code 2);
4. back to the input grid: teeth by linear interpolation of the stage-2 teeth probability with each
   voxel given its nearest tooth instance, bones by linear interpolation of the stage-1
   probabilities; slab by slab, so memory stays bounded;
5. tooth surfaces re-decided at the input resolution from the image (:mod:`.refine`).

The labelmap is on exactly the input grid (shape, spacing, origin, direction). Memory is estimated before
anything large is allocated (:func:`check_memory`): a run that would need more than 4 GiB is refused (exit code 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..device import amp_enabled, resolve_device
from ..errors import InputError, ModelError, ResourceError
from ..frames import canonical_frame
from ..image import Image
from ..inference import label_argmax
from ..results import SegmentationResult
from ..task import InputSpec, Task, TaskContext, register
from . import labels as L
from .nets import (
    build_nets,
    coarse_centres,
    coord_channels,
    grid_size,
    load_weights,
    normalise,
    resample,
    teeth_reference,
    upsample_slab,
)
from .params import TeethParams
from .plausible import NoTeethFound, dental_window, gate, measure_pieces, near_crowns, no_teeth_message
from .postprocess import postprocess
from .refine import refine_surface

TASK = "teeth"
WEIGHT_FILES = ("stage1.pt", "stage2.pt")
STAGES = {"prepare": 6, "stage1": 14, "stage2": 45, "instances": 15, "output": 20}

MEMORY_LIMIT = 4 * 2**30  # bytes: the most a run may use, whatever the size of the input
STAGE1_TTA_MAX_VOXELS = 16e6  # stage 1's mirrored pass only up to about a whole head at 1 mm (time, memory)
PROCESS_BYTES = int(0.7 * 2**30)  # Python, torch, MONAI, SciPy and the two networks
# Bytes per voxel (float32 throughout), from the resident memory sampled during runs on phantoms, a head CT, an
# abdominal CT and a 512 x 512 x 133 chest CT, rounded up.
PER_INPUT_VOXEL = 10  # the canonical and normalised copies of the input, the labelmap and its re-indexed copy
PER_STAGE1_VOXEL = {True: 60, False: 35}  # input, logits (with the mirrored pass or not), stitching, probabilities
PER_STAGE1_KEPT = 17  # the stage-1 probabilities and labels, kept to the end
PER_STAGE2_VOXEL = 300  # 4 input channels, 17-class logits of both passes, stitching, probabilities, instances
PER_REFINE_VOXEL = 80  # input voxels in the stage-2 box: distance maps and nearest-voxel indices


@dataclass
class TeethModel:
    net1: torch.nn.Module
    net2: torch.nn.Module
    network: dict
    manifest: dict
    version: str = ""


def load_model(entry) -> TeethModel:
    """Rebuild both networks from the manifest's ``network`` config and load their verified weights."""
    from ..store import check_task, load_state_dict

    check_task(entry, TASK)
    network = entry.manifest.get("network")
    if not isinstance(network, dict) or "stage1" not in network or "stage2" not in network:
        raise ModelError(f"model {entry.task} {entry.version} ({entry.dir}): its manifest has no 'network' "
                         "config with stage1 and stage2; it is not a teeth model of this version of DeepSegRecon")
    try:
        net1, net2 = build_nets(network)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"model {entry.version}: the network config in its manifest is invalid ({e})") from e
    for net, fname in zip((net1, net2), WEIGHT_FILES):
        state = load_state_dict(entry, fname, task=TASK)
        try:
            load_weights(net, state)
        except (RuntimeError, KeyError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{fname} in model {entry.task} {entry.version} does not fit the network its manifest "
                             f"describes ({first})") from e
        net.eval()
    return TeethModel(net1, net2, network, dict(entry.manifest), entry.version)


class _NoAmp(torch.nn.Module):
    """Run a network in float32 even where the inferer turns autocast on (``amp=False``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net(x.float())


def _sliding_tta(net, x, roi, device, amp, overlap, progress, flip: bool = True):
    """Sliding-window logits, averaged with those of the left-right mirrored volume (the classes are
    left/right symmetric and training used the same mirroring, coordinate channels included)."""
    if not flip:
        return _sliding(net, x, roi, device, amp, overlap, progress)
    a = _sliding(net, x, roi, device, amp, overlap, lambda f: progress(0.5 * f))
    b = _sliding(net, torch.flip(x, dims=[-1]), roi, device, amp, overlap, lambda f: progress(0.5 + 0.5 * f))
    a += torch.flip(b, dims=[-1])
    return a * 0.5


def _sliding(net, x, roi, device, amp, overlap, progress):
    from ..inference import sliding_window

    if not amp and amp_enabled(device):
        net = _NoAmp(net)
    # the networks need whole windows: pad a volume smaller than the window (zeros, as in training)
    size = x.shape[2:]
    pad = [max(0, int(r) - int(s)) for r, s in zip(roi, size)]
    if any(pad):
        x = torch.nn.functional.pad(x, [v for p in reversed(pad) for v in (p // 2, p - p // 2)])
    # two windows a call on the CPU: stage 1's small convolutions then take oneDNN's path, nearly twice as fast
    out = sliding_window(net, x, roi, device, overlap=overlap, sw_batch_size=2 if device.type == "cpu" else 4,
                         progress=progress)
    if any(pad):
        out = out[(slice(None), slice(None)) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, size))]
    return out


def stage2_box(teeth1: np.ndarray, shape, n1, sp, margin_mm: float):
    """Fine-grid box [lo, hi) around a coarse (stage-1) teeth mask plus ``margin_mm``, and the coordinate
    reference (z middle, y front, x middle) in fine index units."""
    shape = np.asarray(shape)
    ref1, lo1, hi1 = teeth_reference(teeth1)
    scale = shape / np.array(n1)
    ref = np.array([(ref1[0] + 0.5) * scale[0] - 0.5, lo1[1] * scale[1], (ref1[2] + 0.5) * scale[2] - 0.5])
    margin = np.ceil(float(margin_mm) / np.asarray(sp)).astype(int)
    lo = np.maximum(np.floor(lo1 * scale).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(hi1 * scale).astype(int) + margin, shape)
    return lo, hi, ref


def grid_mapper(image: Image, can, lo, hi, n2):
    """Function mapping (N, 3) stage-2 grid indices to LPS mm through the input's direction matrix."""
    centres = coarse_centres(lo, hi, n2)

    def index_to_lps(idx2):
        idx2 = np.asarray(idx2, float)
        fine = np.stack([np.interp(idx2[:, a], np.arange(n2[a]), centres[a]) if n2[a] > 1
                         else np.full(len(idx2), centres[a][0]) for a in range(3)], 1)
        orig = can.canonical_to_original_index(fine)  # (k, j, i)
        return image.physical_points(orig[:, ::-1])

    return index_to_lps


def assemble(shape, probs1, fg2, fdi2, lo, hi, n2, step=None) -> np.ndarray:
    """Canonical labelmap on the fine grid: bones from the stage-1 probabilities (C>=3, coarse grid over
    the whole volume, linear), teeth where the stage-2 teeth probability (linear) is over 0.5, each voxel
    given its nearest tooth instance (within 1.5 stage-2 voxels). Slab by slab (bounded memory)."""
    from scipy import ndimage as ndi

    shape = tuple(int(v) for v in shape)
    out = np.zeros(shape, np.uint8)
    if fdi2 is not None:
        dist, ind = ndi.distance_transform_edt(fdi2 == 0, return_indices=True)
        near = fdi2[tuple(ind)]
        near[dist > 1.5] = 0
        del dist, ind
        near_t = torch.from_numpy(near)
        fg2 = torch.as_tensor(fg2, dtype=torch.float32).reshape((1,) + tuple(n2))
    slab = max(1, int(24e6 // max(1, shape[1] * shape[2] * 4)))
    for z0 in range(0, shape[0], slab):
        z1 = min(z0 + slab, shape[0])
        if step:
            step("output", z0 / shape[0], "labelmap on the input grid")
        if probs1 is not None:
            p = upsample_slab(probs1[: L.STAGE1_TEETH], (0, 0, 0), shape, (z0, 0, 0), (z1, shape[1], shape[2]))
            out[z0:z1] = label_argmax(p, 0).numpy()
            del p
        if fdi2 is not None and z1 > lo[0] and z0 < hi[0]:
            a0, a1 = max(z0, lo[0]), min(z1, hi[0])
            f = upsample_slab(fg2, tuple(lo), tuple(hi), (a0, lo[1], lo[2]), (a1, hi[1], hi[2]))[0] > 0.5
            idx = [torch.round(torch.from_numpy((np.arange(s, e) - lo_ + 0.5) * n / (hi_ - lo_) - 0.5)).long()
                   .clamp(0, n - 1)
                   for s, e, lo_, hi_, n in ((a0, a1, lo[0], hi[0], n2[0]), (lo[1], hi[1], lo[1], hi[1], n2[1]),
                                             (lo[2], hi[2], lo[2], hi[2], n2[2]))]
            labs = near_t[idx[0]][:, idx[1]][:, :, idx[2]]
            tooth = (f & (labs > 0)).numpy()
            region = out[a0:a1, lo[1]:hi[1], lo[2]:hi[2]]
            region[tooth] = labs.numpy()[tooth]
    if step:
        step("output", 1.0)
    return out


def memory_need(image: Image, net_cfg: dict, tta: bool = True, box=None) -> int:
    """Bytes a run on ``image`` needs at its peak: the process (libraries, weights), the input and its copies, and
    the larger of stage 1 over the whole field and, once its box is known (``box``: the stage-2 box's size in
    canonical input voxels), stage 2 and the output with the stage-1 results they keep."""
    can = canonical_frame(image)
    sp = np.array(can.spacing)
    shape = np.array([image.array.shape[p] for p in can.perm])
    n1 = float(np.prod(grid_size(shape, sp, float(net_cfg["stage1"]["spacing_mm"]))))
    peak = n1 * PER_STAGE1_VOXEL[bool(tta and n1 <= STAGE1_TTA_MAX_VOXELS)]
    if box is not None:
        n2 = float(np.prod(grid_size(box, sp, float(net_cfg["stage2"]["spacing_mm"]))))
        peak = max(peak, n1 * PER_STAGE1_KEPT + max(n2 * PER_STAGE2_VOXEL, float(np.prod(box)) * PER_REFINE_VOXEL))
    return int(PROCESS_BYTES + image.array.nbytes + shape.prod() * PER_INPUT_VOXEL + peak)


def check_memory(image: Image, net_cfg: dict, tta: bool = True, box=None) -> None:
    """Refuse (exit code 5), before allocating, a run that would need more than :data:`MEMORY_LIMIT` or more than
    the memory available: up front for stage 1, then with the stage-2 box (see :func:`memory_need`)."""
    import psutil

    need = memory_need(image, net_cfg, tta, box)
    available = psutil.virtual_memory().available
    if need > MEMORY_LIMIT or need - PROCESS_BYTES - image.array.nbytes > available:
        where = (f"the {MEMORY_LIMIT / 2**30:.0f} GiB a teeth run may use" if need > MEMORY_LIMIT
                 else f"the {available / 2**30:.1f} GiB of memory available")
        size = " x ".join(str(n) for n in image.array.shape[::-1])
        what = "the image" if box is None else "the teeth region of the image"
        raise ResourceError(f"{what} ({size} voxels) is too large to segment: it would need about "
                            f"{need / 2**30:.1f} GiB, more than {where}; crop it to the jaws or resample it to "
                            "coarser voxels")


def segment(image: Image, model: TeethModel, device="cpu", step: Callable | None = None, amp: bool = True,
            overlap2: float = 0.35, tta: bool = True) -> SegmentationResult:
    """Segment teeth, maxilla and mandible in ``image`` (HU-like CBCT) with ``model``.

    ``tta``: average each stage with its left-right mirrored pass (about twice the network time)."""
    step = step or (lambda stage, fraction=0.0, message="": None)
    device = torch.device(device)
    net_cfg = model.network
    timings = {}
    t_all = t0 = time.perf_counter()
    step("prepare", 0.0, "re-indexing")
    check_memory(image, net_cfg, tta)  # before any large allocation
    can = canonical_frame(image)
    arr = can.to_canonical(image.array)
    sp = np.array(can.spacing)
    shape = np.array(arr.shape)

    # ---------------- stage 1: whole volume at ~1 mm
    c1 = net_cfg["stage1"]
    n1 = grid_size(shape, sp, float(c1["spacing_mm"]))
    if arr.size <= 64e6:
        x1 = resample(normalise(torch.from_numpy(np.asarray(arr)), net_cfg)[None], n1)
    else:
        x1 = _resample_big(arr, n1, net_cfg)[None]
    step("prepare", 1.0)
    timings["prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tta1 = tta and float(np.prod(n1)) <= STAGE1_TTA_MAX_VOXELS
    logits1 = _sliding_tta(model.net1, x1[None], c1["roi"], device, amp, 0.25,
                           lambda f: step("stage1", f, "stage 1: jaws and teeth"), tta1)[0]
    probs1 = torch.softmax(logits1, 0)
    del logits1, x1
    lab1 = label_argmax(probs1, 0).numpy()
    timings["stage1_s"] = time.perf_counter() - t0

    sp1 = sp * shape / np.array(n1)
    teeth1 = _largest_teeth(lab1 == L.STAGE1_TEETH, float(np.prod(sp1)))
    # stage 2 only inside the dentition-sized window that holds most stage-1 teeth: bounded time and memory
    teeth1, _ = dental_window(teeth1, sp1)
    teeth1 = near_crowns(teeth1, sp1)
    if not teeth1.any():
        raise NoTeethFound(no_teeth_message(gate({})[2]))
    t0 = time.perf_counter()
    c2 = net_cfg["stage2"]
    lo, hi, ref = stage2_box(teeth1, shape, n1, sp, float(c2["margin_mm"]))
    check_memory(image, net_cfg, tta, hi - lo)  # before stage 2 allocates
    n2 = tuple(max(n, 8) for n in grid_size(hi - lo, sp, float(c2["spacing_mm"])))
    crop = torch.from_numpy(np.ascontiguousarray(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]))
    img2 = resample(normalise(crop, net_cfg)[None], n2)
    del crop
    coords = coord_channels(lo, hi, n2, sp, ref, float(c2.get("coord_scale_mm", 30.0)))
    x2 = torch.cat([img2, coords], 0)[None]
    img2 = img2[0].numpy()  # kept: its dark gaps between roots place the borders between teeth
    del coords
    # channels-last weights on the CPU: stage 2's convolutions about a third faster (same labels); elsewhere the
    # default layout (MPS has computed 3-D convolutions wrongly in channels-last)
    net2 = model.net2.to(memory_format=torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format)
    logits2 = _sliding_tta(net2, x2, c2["roi"], device, amp, overlap2,
                           lambda f: step("stage2", f, "stage 2: tooth classes"), tta)[0]
    del x2
    probs2 = torch.softmax(logits2, 0).numpy()
    del logits2
    timings["stage2_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step("instances", 0.0, "splitting and numbering teeth")
    sp2 = (hi - lo) * sp / np.array(n2)
    mid_hint = (ref[2] - lo[2] + 0.5) * n2[2] / (hi[2] - lo[2]) - 0.5
    fg2 = 1.0 - probs2[0]
    mapper = grid_mapper(image, can, lo, hi, n2)
    fdi2, info = postprocess(fg2, probs2[1:], tuple(sp2), mapper, mid_hint,
                             step=lambda f: step("instances", f, "splitting and numbering teeth"), image=img2)
    del probs2
    # the plausibility gate: pieces without a tooth's size, shape and brightness, or off the dental arch, are dropped;
    # with no arch left, nothing is segmented
    pieces = measure_pieces(fdi2, mapper, float(np.prod(sp2)), img2, float(net_cfg["intensity"]["scale"]))
    del img2
    _, dropped, verdict = gate(pieces)
    if verdict:
        raise NoTeethFound(no_teeth_message(verdict))
    if dropped:
        gone = np.isin(fdi2, list(dropped))
        fdi2[gone] = 0
        fg2[gone] = 0.0
    info["implausible"] = [{"numbered_as": int(k), "centroid_lps": [round(float(c), 1) for c in pieces[k]["centroid"]],
                            "volume_mm3": round(pieces[k]["volume_mm3"], 1), "reason": why}
                           for k, why in sorted(dropped.items())]
    timings["instances_s"] = time.perf_counter() - t0
    step("instances", 1.0)

    # ---------------- back to the input grid
    t0 = time.perf_counter()
    out = assemble(shape, probs1, fg2, fdi2, lo, hi, n2, step)
    del probs1, fg2, fdi2
    refine_surface(out, arr, sp, (lo, hi))
    labelmap = can.from_canonical(out)
    del out
    timings["output_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    grids = {"input_spacing_mm": list(image.spacing), "stage1_shape": list(n1),
             "stage2_shape": list(n2), "stage2_box_canonical": [lo.tolist(), hi.tolist()]}
    return make_result(image, labelmap, info, {"model": model.version, "device": str(device),
                                               "timings_s": {k: round(v, 2) for k, v in timings.items()},
                                               "grids": grids})


def make_result(image: Image, labelmap: np.ndarray, info: dict, extra: dict) -> SegmentationResult:
    """SegmentationResult on the input grid: segments present, absent teeth and bones, per-tooth report."""
    result_img = Image(labelmap, image.spacing, image.origin, image.direction.copy(), {"task": TASK})
    counts = np.bincount(labelmap.ravel(), minlength=256)
    vox = float(np.prod(image.spacing))
    present = [v for v in [L.MAXILLA, L.MANDIBLE, *L.FDI] if counts[v] > 0]
    absent = [L.segment_name(v) for v in [L.MAXILLA, L.MANDIBLE, *L.FDI] if counts[v] == 0]
    teeth_report = {}
    instances = (info or {}).get("instances") or {}
    for d in instances.values():
        f = int(d.get("fdi", 0))
        if f and counts[f] > 0:
            teeth_report[L.segment_name(f)] = {
                "fdi": f, "description": L.describe(f), "volume_mm3": round(float(counts[f] * vox), 1),
                "centroid_lps": [round(float(c), 2) for c in d["centroid"]],
                "position_confidence": round(float(d["pos_votes"][L.position(f) - 1]), 3)}
    report = {
        **extra,
        "teeth_found": [v for v in present if v in L.FDI],
        "teeth": teeth_report,
        "bones": {L.segment_name(v): {"volume_mm3": round(float(counts[v] * vox), 1)}
                  for v in (L.MAXILLA, L.MANDIBLE) if counts[v] > 0},
        "dropped_fragments": sum(1 for d in instances.values() if not d.get("fdi")),
        "dropped_implausible": (info or {}).get("implausible", []),
        "midline_lps": (info or {}).get("midline"),
    }
    return SegmentationResult(result_img, L.segment_infos(present), absent, report)


def _resample_big(arr: np.ndarray, n1, net_cfg) -> torch.Tensor:
    """Normalise and shrink a large volume in slabs along axis 0 (whole coarse slices at a time)."""
    import torch.nn.functional as F

    D = arr.shape[0]
    # first shrink in-plane slab by slab (area), then along axis 0
    parts = []
    step_z = max(1, int(16e6 // (arr.shape[1] * arr.shape[2])))
    for z0 in range(0, D, step_z):
        t = normalise(torch.from_numpy(np.ascontiguousarray(arr[z0:z0 + step_z])), net_cfg)
        size = (min(n1[1], arr.shape[1]), min(n1[2], arr.shape[2]))
        t = F.interpolate(t[:, None], size=size, mode="area")[:, 0]
        parts.append(t)
    t = torch.cat(parts, 0)[None]
    return resample(t, n1)[0]


def _largest_teeth(mask: np.ndarray, vox_mm3: float, min_mm3: float = 60.0) -> np.ndarray:
    """Stage-1 teeth mask without specks (components under ``min_mm3``)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes * vox_mm3 >= min_mm3
    keep[0] = False
    return keep[lab]


@register
class TeethTask(Task):
    name = TASK
    params_type = TeethParams
    title = "Segment Teeth"
    inputs = (InputSpec("image", 3, True, "dental CBCT volume (HU-like intensities)"),)
    uses_model = True
    stages = STAGES

    def validate(self, images: dict, params: dict) -> None:
        super().validate(images, params)
        img = images["image"]
        extent = np.array(img.array.shape) * np.array(img.spacing[::-1])
        if extent.min() < 15.0:
            raise InputError(f"the image covers only {extent.min():.1f} mm along one axis; a dental CBCT "
                             "covering at least part of a jaw (15 mm or more) is needed")

    def run(self, images: dict, params: dict, ctx: TaskContext) -> SegmentationResult:
        p = self.parse_params(params)
        device = resolve_device(p.device or ctx.device or "auto")
        ctx.step("prepare", 0.0, "loading the model")
        model = load_model(ctx.model_entry(TASK, p.model))
        result = segment(images["image"], model, device, ctx.step, amp=p.amp, tta=p.tta)
        return result

