"""Score brain-tumour weights on real cases with the task's own inference: Dice and HD95 (mm) per region.

Shared by training (epoch selection), the tests and ``make bench`` (``brain_real_val``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import labels as L
from .phantom import HELDOUT_SEEDS, MODALITIES

REGIONS = ("ET", "TC", "WT")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2.0 * (a & b).sum() / s)


def hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI); 0 when both are empty, NaN when one is."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("nan")
    t = lambda m: torch.from_numpy(np.ascontiguousarray(m))[None, None]  # noqa: E731
    sp = list(spacing)[::-1]  # arrays are (k, j, i)
    return float(compute_hausdorff_distance(t(a), t(b), percentile=95, spacing=sp)[0, 0])


def case_scores(pred_labels: np.ndarray, true_labels: np.ndarray, spacing=None) -> dict:
    p, t = L.to_regions(pred_labels), L.to_regions(true_labels)
    out = {r: round(dice(p[i], t[i]), 4) for i, r in enumerate(REGIONS)}
    if spacing is not None:
        out.update({f"HD95_{r}": round(hd95(p[i], t[i], spacing), 2) for i, r in enumerate(REGIONS)})
    return out


def evaluate_model(model, cases, input_sets, device="cpu", hd95: bool = True, log=None) -> dict:
    """``cases``: [{"name", "images": {modality: Image}, "label": Image (BraTS 2023 values)}].
    Returns {"+".join(inputs): {"WT", "TC", "ET" means, "per_case": [...]}}."""
    from .task import segment

    out = {}
    for inputs in input_sets:
        key = "+".join(inputs)
        rows = []
        for c in cases:
            res = segment({m: c["images"][m] for m in inputs}, model, device)
            truth = np.asarray(c["label"].array)
            row = {"case": c["name"], **case_scores(np.asarray(res.labelmap.array), truth,
                                                    c["label"].spacing if hd95 else None)}
            rows.append(row)
            if log:
                log(f"[eval] {key} {row}")
        out[key] = {r: round(float(np.mean([d[r] for d in rows])), 4) for r in REGIONS}
        out[key]["per_case"] = rows
    return out


def tune_postprocess(model, cases, input_sets, device="cpu", thresholds=(0.4, 0.5, 0.6),
                     min_mls=(0.0, 0.25, 0.5, 1.0, 2.0), log=None) -> dict:
    """Pick the post-processing (threshold, smallest kept component) with the best mean Dice over ``cases`` and
    ``input_sets`` (the network runs once per case and input set). phantom-v1's largest-core rule is not a
    candidate: it deletes every focus of a multifocal tumour but one."""
    from .task import predict, regions_from_probabilities

    preds = []
    for inputs in input_sets:
        for c in cases:
            out = predict({m: c["images"][m] for m in inputs}, model, device)
            preds.append((out["p"], out["brain"], out["ref"].spacing, L.to_regions(np.asarray(c["label"].array))))
    options = [{"threshold": t, "min_ml": m, "largest_core": False} for t in thresholds for m in min_mls]
    table = []
    for opt in options:
        scores = []
        for p, brain, spacing, truth in preds:
            regions = regions_from_probabilities(p, brain, spacing, **opt)
            scores.append(np.mean([dice(r, t) for r, t in zip(regions, truth)]))
        table.append({**opt, "mean_dice": round(float(np.mean(scores)), 4)})
        if log:
            log(f"[tune] {table[-1]}")
    best = max(table, key=lambda r: r["mean_dice"])
    return {"chosen": {k: best[k] for k in ("threshold", "min_ml", "largest_core")}, "table": table}


def evaluate_phantoms(model_dir, seeds=HELDOUT_SEEDS, input_sets=(MODALITIES, ("t1c", "flair")), log=print) -> dict:
    """Mean ET / TC / WT Dice of the task's inference on phantom ``seeds``, for each set of inputs."""
    from ..task import TaskContext, get_task
    from .phantom import make_phantom

    task = get_task("brain-tumor")
    per = {"+".join(inputs): [] for inputs in input_sets}
    for s in seeds:
        p = make_phantom(s)
        gt = L.to_regions(p["labels"].array)
        for inputs in input_sets:
            key = "+".join(inputs)
            res = task.run({m: p["images"][m] for m in inputs}, {"device": "cpu"},
                           TaskContext(model_dir=Path(model_dir)))
            pr = L.to_regions(res.labelmap.array)
            per[key].append({"seed": s, **{r: round(dice(pr[i], gt[i]), 4) for i, r in enumerate(("ET", "TC", "WT"))}})
            log(f"[eval] {key} seed {s}: {per[key][-1]}")
    out = {}
    for key, rows in per.items():
        out[key] = {r: round(float(np.mean([d[r] for d in rows])), 4) for r in ("ET", "TC", "WT")}
        out[key]["per_seed"] = rows
    return out
