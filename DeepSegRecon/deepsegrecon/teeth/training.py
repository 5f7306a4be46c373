"""Training / fine-tuning recipe for the teeth task: ``get_recipe("teeth")`` -> :func:`recipe`.

Design. The teeth method is two networks (see :mod:`.task`): stage 1 labels background / maxilla / mandible /
teeth on the whole volume at ~1 mm; stage 2 labels 16 tooth classes (jaw x position) in the teeth box at
~0.5 mm, with three coordinate channels. The recipe is one :class:`TeethRecipe` whose ``parts`` are the two
stages, each a plain training :class:`~deepsegrecon.training.recipe.Recipe` (its own network, case -> tensors,
patch size and augmentation). A training job (:mod:`deepsegrecon.training.jobs`) trains the parts **in turn**
with the generic engine, splitting a minutes budget 35 % / 65 % (the tooth classes are what a domain shift
hurts most, and stage 2 is the larger net); an epochs budget gives each part that many epochs. The version it
writes has both ``stage1.pt`` and ``stage2.pt`` (float16, like the shipped weights) and the base version's
manifest fields, so :class:`~.task.TeethTask` runs it with ``--model NEW``.

Case -> tensors reuses :func:`.train.prepare_sample` (the function the phantom training uses), so a case is
seen exactly as training on phantoms and inference see a volume: canonical S/P/L frame, the network's
intensity clip and scale, stage 1 resampled to its spacing, stage 2 cropped to the ground-truth teeth box
plus the network's margin (no random jitter: inference uses the plain margin), with its coordinate
channels (:func:`.nets.coord_channels`). Its soft (area-fraction) targets become class indices by argmax
(stage 1) and by "teeth occupancy over one half, then the dominant tooth class" (stage 2). An ROI mask of
the reviewed voxels is carried to both grids (voxels mostly outside it are left out of the loss).

Labels: the teeth conventions (FDI numbers, maxilla 1, mandible 2; segments named ``tooth_<FDI>``,
``maxilla``, ``mandible``). A case must label at least one tooth. Fine-tuning only trains stage 1 when some
case labels a jaw bone: cases that label teeth only would teach stage 1 that bone is background, so
stage 1 then keeps the base weights (noted in the manifest). No flips: mirroring swaps FDI numbers (and
the stage-2 coordinate channels assume the real left/right); no rotations or intensity changes for stage 2
(they would disturb the coordinate channels).

Fine-tuning uses a low learning rate (3e-5, AdamW): with a handful of cases the tooth classifier (which also
sees position channels) memorises the training cases within a few dozen steps (measured: on a family-B
phantom, 10 steps at 1e-4 raised the stage-2 Dice of a training case 0.69 -> 0.73 and lowered a held-out
case's 0.65 -> 0.57; at 1e-5 it stayed at 0.65). The job also keeps a part's base weights when they validate
better (see :mod:`deepsegrecon.training.jobs`), so keep some validation cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ..errors import InputError
from ..frames import canonical_frame
from ..training.jobs import TrainPart
from ..training.recipe import Recipe
from . import labels as L
from .nets import build_net, coord_channels, default_network, resample

TEETH_LABELS = {name: value for value, name in L.all_labels().items()}
SHARES = {"stage1": 0.35, "stage2": 0.65}


class _NoJitter:
    """Stands in for the random generator of :func:`.train.prepare_sample`: the plain stage-2 margin."""

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size) if size is not None else 0.0


def _roi_on_grid(roi, lo=None, hi=None, size=None) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(roi[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] if lo is not None else roi)
                         .astype(np.float32))[None]
    return (resample(t, size)[0].numpy() >= 0.5).astype(np.uint8)


def stage_sample(image, label, roi, network: dict, stage: str, name: str = "case") -> dict:
    """One case -> ``{"image" (C, k, j, i) float32, "label" (1, ...) class indices, "roi" (1, ...) uint8}`` for
    ``stage`` ("stage1" | "stage2"), in the canonical frame on that stage's grid."""
    from .samples import prepare_sample

    s = prepare_sample(image, label, network, _NoJitter())
    can = canonical_frame(image)
    roi_c = can.to_canonical(np.asarray(roi.array) > 0) if roi is not None else None
    if stage == "stage1":
        x = s["x1"].astype(np.float32)[None]
        y = np.argmax(s["y1"], 0).astype(np.int16)
        r = _roi_on_grid(roi_c, size=y.shape) if roi_c is not None else np.ones(y.shape, np.uint8)
    elif stage == "stage2":
        if "x2" not in s:
            raise InputError(f"case '{name}': no tooth is labelled, so there is no teeth box for stage 2")
        lo, hi = s["box"]
        n2 = tuple(int(v) for v in s["n2"])
        coords = coord_channels(lo, hi, n2, s["spacing"], s["ref"],
                                float(network["stage2"].get("coord_scale_mm", 30.0))).numpy()
        x = np.concatenate([s["x2"].astype(np.float32)[None], coords], 0)
        y = np.where(s["fg2"] >= 128, s["cls2"], 0).astype(np.int16)
        r = _roi_on_grid(roi_c, lo, hi, n2) if roi_c is not None else np.ones(y.shape, np.uint8)
    else:
        raise ValueError(f"unknown teeth stage '{stage}'")
    return {"image": torch.from_numpy(np.ascontiguousarray(x)), "label": torch.from_numpy(y[None].copy()),
            "roi": torch.from_numpy(r[None].copy())}


class TeethStageSample:
    """Case -> tensors for one stage (picklable, for DataLoader workers)."""

    def __init__(self, network: dict, stage: str):
        self.network, self.stage = network, stage
        self.num_classes = L.N_STAGE1 if stage == "stage1" else L.N_STAGE2

    def __call__(self, case) -> dict:
        image = next(iter(case.images.values()))
        return stage_sample(image, case.label, case.roi, self.network, self.stage, case.name)


class TeethStageInferer:
    """Validation inference as the teeth method does it (:func:`.task._sliding`): volumes smaller than the window
    are zero-padded to whole windows (the networks need sizes their strides divide)."""

    def __init__(self, roi, overlap: float = 0.25):
        self.roi, self.overlap = tuple(int(r) for r in roi), float(overlap)

    def __call__(self, net, image):
        from .task import _sliding

        device = next(net.parameters()).device
        with torch.no_grad():
            return _sliding(net, image, self.roi, device, False, self.overlap, None)


@dataclass
class TeethRecipe(Recipe):
    """The teeth recipe: two parts (stage 1, stage 2) trained in turn; see the module docstring."""

    parts: list = field(default_factory=list)
    finetune_defaults: dict = field(default_factory=dict)

    # ---- hooks used by deepsegrecon.training.jobs
    def check_case(self, data) -> dict:
        values = set(int(v) for v in np.unique(data.label.array) if v != 0)
        unknown = sorted(values - set(L.all_labels()))
        if unknown:
            raise InputError(f"case '{data.name}': label values {unknown} are not teeth labels "
                             "(FDI 11-48, maxilla 1, mandible 2)")
        teeth = sorted(values & set(L.FDI))
        if not teeth:
            raise InputError(f"case '{data.name}': no tooth is labelled (teeth need FDI labels 11-48, "
                             "segments named tooth_<FDI>)")
        img = next(iter(data.images.values()))
        extent = np.array(img.array.shape) * np.array(img.spacing[::-1])
        if extent.min() < 15.0:
            raise InputError(f"case '{data.name}': the image covers only {extent.min():.1f} mm along one axis; "
                             "a dental CBCT covering at least part of a jaw is needed")
        return {"teeth": teeth, "bones": sorted(values & {L.MAXILLA, L.MANDIBLE})}

    def select_parts(self, kind: str, parts: list, facts: dict, requested=None):
        notes = []
        if requested:
            parts = [p for p in parts if p.name in requested]
        if kind == "finetune" and not requested and not any(f.get("bones") for f in facts.values()):
            parts = [p for p in parts if p.name != "stage1"]
            notes.append("stage 1 kept the base weights: no case labels the maxilla or mandible")
        return parts, notes

    def export_state(self, part: str, state: dict) -> dict:
        from .nets import state_dict_fp16

        net = build_net(self.network[part])
        net.load_state_dict(state)
        return state_dict_fp16(net)

    def version_manifest(self, results: dict, base_manifest: dict | None, provenance: dict) -> dict:
        base = dict(base_manifest or {})
        manifest = {
            "task": "teeth",
            "labels": base.get("labels") or {str(v): n for v, n in L.all_labels().items()},
            "input_spec": base.get("input_spec") or {
                "modality": "CBCT", "intensity": "HU-like (air -1000, enamel ~2700)", "ndim": 3,
                "orientation": "any direction matrix (re-indexed to S/P/L internally)",
                "stage1_spacing_mm": self.network["stage1"]["spacing_mm"],
                "stage2_spacing_mm": self.network["stage2"]["spacing_mm"]},
            "network": self.network,
            "description": ((base.get("description") or "Two-stage MONAI 3D U-Net for dental CBCT.")
                            + (f" Fine-tuned from {base.get('version')} on annotated cases."
                               if base_manifest else " Trained on annotated cases.")),
        }
        return manifest

    def evaluate(self, states: dict, network, cases, device, step=None) -> dict:
        """End-to-end teeth metrics (the method's own inference and FDI numbering) on ``cases``."""
        from .evaluate import score
        from .plausible import NoTeethFound
        from .task import TeethModel, segment

        net1, net2 = build_net(self.network["stage1"]), build_net(self.network["stage2"])
        for net, part in ((net1, "stage1"), (net2, "stage2")):
            from .nets import load_weights

            load_weights(net, states[part])
            net.eval()
        model = TeethModel(net1, net2, self.network, {}, "evaluation")
        dices, correct, per_case = [], [], []
        for n, case in enumerate(cases):
            if step:
                step(n / len(cases))
            data = case.load()
            image = next(iter(data.images.values()))
            try:
                pred = segment(image, model, device, amp=False).labelmap.array
            except NoTeethFound:  # withheld: no tooth predicted
                pred = np.zeros(np.asarray(data.label.array).shape, np.uint8)
            sc = score(pred, np.asarray(data.label.array))
            d, c = list(sc["dice"].values()), list(sc["correct"].values())
            dices += d
            correct += c
            per_case.append({"case": case.name, "mean_dice": round(float(np.mean(d)), 4) if d else None,
                             "fdi_accuracy": round(float(np.mean(c)), 4) if c else None,
                             "bone_dice": {k: round(float(v), 4) for k, v in sc["bone_dice"].items()}})
        if step:
            step(1.0)
        return {"mean_tooth_dice": round(float(np.mean(dices)), 4) if dices else None,
                "fdi_accuracy": round(float(np.mean(correct)), 4) if correct else None,
                "teeth_evaluated": len(dices), "per_case": per_case}


def _stage_defaults(network: dict, stage: str) -> dict:
    roi = tuple(int(v) for v in network[stage]["roi"])
    common = dict(epochs=50, patch_size=roi, batch_size=1, samples_per_case=2, iterations_per_epoch=8,
                  learning_rate=1e-3, optimizer="adamw", loss="dicece", flip_axes=(), val_fraction=0.2,
                  cache_cases=16, sw_batch_size=1, sw_overlap=0.25, crop="posneg")
    if stage == "stage1":
        common.update(pos_fraction=0.5, affine_prob=0.2, rotate_degrees=10.0, scale_range=0.1, intensity_prob=0.5,
                      intensity_scale=0.1, intensity_shift=0.1, noise_prob=0.15, noise_std=0.05)
    else:  # coordinate channels: no rotations, no intensity changes
        common.update(pos_fraction=0.85, affine_prob=0.0, intensity_prob=0.0, noise_prob=0.0)
    return common


def recipe(network: dict | None = None, modalities: dict | None = None, label_map=None, **_) -> TeethRecipe:
    """The teeth recipe. ``network``: the manifest ``network`` of the version being fine-tuned (default: the
    method's default networks, for training from scratch); ``modalities``: one ``{name: pattern}`` (the CBCT);
    ``label_map``: names -> teeth label values (default: ``tooth_<FDI>``, ``maxilla``, ``mandible``)."""
    from ..training.labels import read_label_map

    network = network or default_network()
    for stage in ("stage1", "stage2"):
        if stage not in network:
            raise InputError(f"the teeth network config has no {stage}")
    modalities = dict(modalities or {"image": "*"})
    if len(modalities) != 1:
        raise InputError(f"teeth takes one image per case (the CBCT), not {len(modalities)} modalities")
    lmap = read_label_map(label_map) if label_map is not None else dict(TEETH_LABELS)
    bad = sorted(v for v in lmap.values() if v not in L.all_labels())
    if bad:
        raise InputError(f"teeth label values must be FDI numbers (11-48), maxilla 1 or mandible 2; the label map "
                         f"has {bad}")
    parts = []
    for stage, n_cls, what in (("stage1", L.N_STAGE1, "jaws and teeth at ~1 mm"),
                               ("stage2", L.N_STAGE2, "tooth classes at ~0.5 mm in the teeth box")):
        sub = Recipe(task="teeth", build_net=partial(build_net, network[stage]), modalities=modalities,
                     label_map=lmap, normalize="custom", defaults=_stage_defaults(network, stage),
                     to_sample=TeethStageSample(network, stage), network=network[stage],
                     inferer=TeethStageInferer(network[stage]["roi"], 0.25 if stage == "stage1" else 0.35))
        assert sub.sample_fn().num_classes == n_cls
        parts.append(TrainPart(stage, f"{stage}.pt", sub, SHARES[stage], what))
    return TeethRecipe(task="teeth", build_net=partial(build_net, network["stage1"]), modalities=modalities,
                       label_map=lmap, normalize="custom", defaults=_stage_defaults(network, "stage1"),
                       network=network, parts=parts, finetune_defaults={"learning_rate": 3e-5})
