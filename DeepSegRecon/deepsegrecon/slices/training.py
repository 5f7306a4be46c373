"""Training recipe for the slices task: ``get_recipe("slices")`` -> :func:`recipe`.

A case (a CT with an organ labelmap) becomes, in the canonical S/P/L frame, every axial slice at the
network size with its 2.5D neighbours as channels, ``(C, D, s, s)``, and its labels ``(1, D, s, s)`` (the
class with the largest area in each pixel) -- exactly what inference feeds the network. The generic engine
then trains on ``(1, s, s)`` patches: one slice each, ``samples_per_case`` slices a case per batch, through
:class:`.nets.SliceNet`. Loss: Dice + cross-entropy (equal weights, i.e. 0.5 CE + 0.5 Dice up to a factor 2).
Optimiser: AdamW for small runs (default); the paper's SGD with ``--set optimizer=sgd --set momentum=0.9
--set learning_rate=0.01``. No flips (left and right kidneys are different labels) and no 3-D affine
(it would mix slices): each case's slices get ``copies`` in-plane rotated / scaled / shifted versions, made
once when the case is prepared (so validation Dice is over these copies too), plus the engine's intensity
scaling/shift and noise. Slices are drawn class by class (``crop="classes"``: a class, then a slice showing
it), so slices with small organs (kidney poles, pancreas) are trained on as often as liver slices.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from ..errors import InputError
from ..training.recipe import Recipe
from .labels import read_label_set
from .nets import SMALL, build_net
from .pipeline import labels_to_net, slice_grid, slices_to_net, with_context


def default_network(labels=None, **over) -> dict:
    lset = read_label_set(labels)
    return {**SMALL, "out_channels": len(lset.organs) + 1, "classes": lset.names, "context": 1, "pixel_mm": 3.0,
            "window": [-125.0, 275.0], **over}


def augment_slices(x: torch.Tensor, y: torch.Tensor, copies: int, seed: int = 0, degrees: float = 20.0,
                   scale: float = 0.25, shift: int = 12) -> tuple:
    """Append ``copies`` in-plane randomly rotated / scaled / shifted versions of every slice (MONAI
    ``RandAffined`` in 2-D: image bilinear, labels nearest) to the slice stack ``x`` (C, D, s, s), ``y`` (1, D, s, s).
    The training engine's augmentation is 3-D and would mix slices; this keeps each slice whole."""
    import math

    from monai.transforms import RandAffined

    if copies <= 0:
        return x, y
    t = RandAffined(["image", "label"], prob=1.0, rotate_range=(math.radians(degrees),), scale_range=(scale, scale),
                    translate_range=(shift, shift), mode=("bilinear", "nearest"), padding_mode="zeros")
    t.set_random_state(seed)
    xs, ys = [x], [y]
    for _ in range(copies):
        ox, oy = torch.empty_like(x), torch.empty_like(y)
        for z in range(x.shape[1]):
            d = t({"image": x[:, z], "label": y[:, z].float()})
            ox[:, z] = torch.as_tensor(d["image"])
            oy[:, z] = torch.as_tensor(d["label"]).round().to(y.dtype)
        xs.append(ox)
        ys.append(oy)
    return torch.cat(xs, 1), torch.cat(ys, 1)


class SliceSample:
    """Case -> ``{"image": (C, D, s, s), "label": (1, D, s, s), "roi": (1, D, s, s)}`` (picklable); with
    ``copies``, that many in-plane augmented copies of the slices are appended (see :func:`augment_slices`)."""

    def __init__(self, network: dict, label_values, copies: int = 0, seed: int = 0):
        self.network = network
        self.values = [int(v) for v in label_values]
        self.num_classes = len(self.values) + 1
        self.copies, self.seed = int(copies), int(seed)

    def __call__(self, case) -> dict:
        from ..frames import canonical_frame

        image = next(iter(case.images.values()))
        can = canonical_frame(image)
        vol = can.to_canonical(image.array)
        grid = slice_grid(vol, can.spacing[1:], self.network)
        x = slices_to_net(vol, grid, self.network.get("window", (-125, 275)))
        del vol
        x = with_context(x, int(self.network.get("context", 1)), int(self.network["in_channels"]))
        lab = np.asarray(case.label.array)
        lut = np.zeros(max(int(lab.max()), max(self.values)) + 1, np.int64)
        lut[self.values] = np.arange(1, len(self.values) + 1)
        y = labels_to_net(can.to_canonical(lut[lab]), self.num_classes, grid)
        roi = torch.ones((1,) + tuple(y.shape), dtype=torch.int16)
        if case.roi is not None:
            roi = labels_to_net(can.to_canonical((np.asarray(case.roi.array) > 0).astype(np.int64)), 2, grid)
            roi = roi[None].to(torch.int16)
        x, y = x.permute(1, 0, 2, 3).contiguous(), y[None].to(torch.int16)
        if self.copies:  # the ROI goes along as a second label channel
            x, yr = augment_slices(x, torch.cat([y, roi]), self.copies, self.seed)
            y, roi = yr[:1], yr[1:]
        return {"image": x, "label": y, "roi": roi.to(torch.uint8)}


class SlicesRecipe(Recipe):
    def export_state(self, part: str, state: dict) -> dict:
        return {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}

    def version_manifest(self, results: dict, base_manifest: dict | None, provenance: dict) -> dict:
        res = results["model"]
        m = self.manifest(res, provenance.get("base_version"))
        m.pop("metrics", None)
        m.pop("trained_on", None)
        m["labels"] = {str(v): n for n, v in self.label_map.items()}
        m["input_spec"] = {"modality": "CT", "intensity": "Hounsfield units", "ndim": 3,
                           "window_hu": self.network.get("window"), "slice_size": self.network["img_size"],
                           "pixel_mm": self.network.get("pixel_mm"),
                           "context_slices": self.network.get("context")}
        m["description"] = ((base_manifest or {}).get("description")
                            or "TransUNet (small CPU configuration) on axial CT slices, 2.5D.")
        return m


def recipe(network: dict | None = None, modalities: dict | None = None, label_map=None, labels=None,
           copies: int = 4, **_) -> SlicesRecipe:
    """The slices recipe. ``network``: a manifest's (fine-tuning) or the small default for ``labels``
    (label set name or file; default abdomen); ``label_map``: {name: value} of the cases' labels; ``copies``:
    in-plane augmented copies of each case's slices (prepared once per case, kept in the case cache)."""
    from ..training.labels import read_label_map

    network = dict(network or default_network(labels))
    classes = list(network.get("classes") or [])
    if label_map is not None:
        lmap = read_label_map(label_map)
    else:
        lset = read_label_set(labels)
        lmap = {n: lset.by_name(n).value for n in classes if n in lset.names}
    if list(lmap) != classes:
        raise InputError(f"the label map names {list(lmap)} must be the network's classes {classes}, in order")
    modalities = dict(modalities or {"image": "*"})
    if len(modalities) != 1:
        raise InputError(f"slices takes one CT per case, not {len(modalities)} modalities")
    s = int(network["img_size"])
    defaults = dict(epochs=100, patch_size=(1, s, s), batch_size=1, samples_per_case=8, iterations_per_epoch=25,
                    learning_rate=5e-4, weight_decay=1e-4, optimizer="adamw", loss="dicece", flip_axes=(),
                    affine_prob=0.0, intensity_prob=0.5, intensity_scale=0.15, intensity_shift=0.1,
                    noise_prob=0.3, noise_std=0.03, crop="classes", pos_fraction=0.8, val_fraction=0.2,
                    cache_cases=4, sw_batch_size=16, sw_overlap=0.0)
    r = SlicesRecipe(task="slices", build_net=partial(build_net, network), modalities=modalities, label_map=lmap,
                     normalize="custom", defaults=defaults, to_sample=SliceSample(network, list(lmap.values()), copies),
                     network=network)
    r.finetune_defaults = {"learning_rate": 1e-4}
    return r
