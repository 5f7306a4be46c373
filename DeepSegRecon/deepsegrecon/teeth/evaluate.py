"""Accuracy of a teeth model version: per-tooth Dice, FDI numbering, invented teeth and bone Dice on labelmaps
(:func:`score`), and on held-out phantoms (:func:`evaluate`). Tests, benchmarks and the training scripts share it."""

from __future__ import annotations

import time

import numpy as np

from . import labels as L
from .phantom import HELDOUT_SEEDS  # noqa: F401 (the held-out seeds evaluate is meant for)


def score(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Per-tooth Dice (for teeth in the ground truth) and FDI numbering on one labelmap pair."""
    joint = np.bincount(gt.astype(np.int64).ravel() * 256 + pred.astype(np.int64).ravel(), minlength=65536)
    joint = joint.reshape(256, 256)
    gt_n = joint.sum(1)
    pr_n = joint.sum(0)
    teeth = [f for f in L.FDI if gt_n[f] > 0]
    dice = {}
    correct = {}
    for f in teeth:
        dice[f] = 2.0 * joint[f, f] / (gt_n[f] + pr_n[f])
        overlaps = {p: joint[f, p] for p in L.FDI if joint[f, p] > 0}
        match = max(overlaps, key=overlaps.get) if overlaps else 0
        correct[f] = match == f
    extra = [int(p) for p in L.FDI if pr_n[p] > 0 and gt_n[p] == 0]
    bones = {n: 2.0 * joint[v, v] / max(gt_n[v] + pr_n[v], 1) for v, n in ((L.MAXILLA, "maxilla"), (L.MANDIBLE, "mandible"))}
    return {"dice": dice, "correct": correct, "extra_teeth": extra, "bone_dice": bones}


def evaluate(model_dir, seeds, family: str = "A", device: str = "auto", shape=None, spacing=None, log=None) -> dict:
    """Held-out accuracy of a model version folder on phantoms ``seeds``.

    Returns ``mean_dice`` (per-tooth Dice averaged over the teeth present in the ground truth, at the
    input resolution), ``fdi_accuracy`` (share of ground-truth teeth whose best-overlapping predicted
    tooth has the right FDI number), ``min_dice``, extra (invented) teeth, bone Dice and per-seed details.
    """
    from ..device import resolve_device
    from ..store import entry_from_dir
    from .phantom import generate_teeth_phantom
    from .plausible import NoTeethFound
    from .task import load_model, segment

    model = load_model(entry_from_dir(model_dir))
    dev = resolve_device(device)
    dices, corrects, per_seed, extra = [], [], [], 0
    bone = {"maxilla": [], "mandible": []}
    for s in seeds:
        cbct, gt, info = generate_teeth_phantom(int(s), shape=shape, spacing=spacing, family=family)
        t = time.perf_counter()
        try:
            pred = segment(cbct, model, dev).labelmap.array
        except NoTeethFound:  # withheld: no tooth predicted
            pred = np.zeros(gt.array.shape, np.uint8)
        dt = time.perf_counter() - t
        sc = score(pred, gt.array)
        d = list(sc["dice"].values())
        c = list(sc["correct"].values())
        dices += d
        corrects += c
        extra += len(sc["extra_teeth"])
        for k, values in bone.items():
            values.append(sc["bone_dice"][k])
        row = {"seed": int(s), "shape": info["shape"], "spacing": round(info["spacing"][0], 3),
               "teeth": len(d), "missing": info["missing"], "metal": sorted(info["metal"]),
               "mean_dice": round(float(np.mean(d)), 4) if d else None,
               "fdi_accuracy": round(float(np.mean(c)), 4) if c else None,
               "wrong": sorted(int(f) for f, ok in sc["correct"].items() if not ok),
               "extra_teeth": sc["extra_teeth"], "time_s": round(dt, 1)}
        per_seed.append(row)
        if log:
            log(f"[eval] {row}")
    return {"mean_dice": round(float(np.mean(dices)), 4) if dices else 0.0,
            "fdi_accuracy": round(float(np.mean(corrects)), 4) if corrects else 0.0,
            "min_dice": round(float(np.min(dices)), 4) if dices else 0.0,
            "teeth_evaluated": len(dices), "extra_teeth": extra,
            "bone_dice": {k: round(float(np.mean(v)), 4) for k, v in bone.items() if v},
            "seeds": [int(s) for s in seeds], "family": family, "per_seed": per_seed}
