"""Per-organ Dice and HD95 (mm, from the voxel spacing) with absent organs handled explicitly.

For each organ: ``status`` is ``ok`` (in both), ``absent`` (in neither: no Dice, no distance, not averaged),
``missed`` (in the reference only) or ``false positive`` (in the prediction only). A miss or a false positive
has Dice 0 and HD95 ``inf`` -- never Dice 1 or distance 0. HD95 is MONAI's 95th-percentile symmetric
Hausdorff distance on the surfaces, computed in a box around both masks.
"""

from __future__ import annotations

import math

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    a, b = int(pred.sum()), int(ref.sum())
    if a + b == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (a + b)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_kji) -> float:
    """95th-percentile symmetric surface distance in mm; ``spacing_kji``: spacing per array axis."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() and not ref.any():
        return float("nan")
    if not pred.any() or not ref.any():
        return math.inf
    both = pred | ref
    lo = [int(np.flatnonzero(both.any(axis=tuple(a for a in range(3) if a != ax))).min()) for ax in range(3)]
    hi = [int(np.flatnonzero(both.any(axis=tuple(a for a in range(3) if a != ax))).max()) + 1 for ax in range(3)]
    box = tuple(slice(max(l - 1, 0), h + 1) for l, h in zip(lo, hi))
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None].float()
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None].float()
    d = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                   spacing=[float(s) for s in spacing_kji])
    return float(d.reshape(-1)[0])


def organ_metrics(pred: np.ndarray, ref: np.ndarray, organs: dict, spacing_ijk) -> dict:
    """``{name: {"label", "status", "dice", "hd95_mm", "volume_ref_ml", "volume_pred_ml"}}`` for
    ``organs`` ({name: label value}) on two labelmaps of one grid (arrays (k, j, i), spacing (i, j, k))."""
    sp = tuple(float(s) for s in spacing_ijk)[::-1]
    vox_ml = float(np.prod(sp)) / 1000.0
    out = {}
    for name, value in organs.items():
        p, r = pred == value, ref == value
        np_, nr = int(p.sum()), int(r.sum())
        if np_ == 0 and nr == 0:
            status, d, h = "absent", None, None
        elif nr == 0:
            status, d, h = "false positive", 0.0, math.inf
        elif np_ == 0:
            status, d, h = "missed", 0.0, math.inf
        else:
            status, d, h = "ok", dice(p, r), hd95(p, r, sp)
        out[name] = {"label": int(value), "status": status, "dice": d, "hd95_mm": h,
                     "volume_ref_ml": round(nr * vox_ml, 3), "volume_pred_ml": round(np_ * vox_ml, 3)}
    return out


def summary(per_organ: dict) -> dict:
    """Mean Dice and HD95 over the organs present in the reference (misses count as Dice 0; false positives
    on organs absent from the reference are listed, not averaged)."""
    scored = [m for m in per_organ.values() if m["status"] in ("ok", "missed")]
    dices = [m["dice"] for m in scored]
    hds = [m["hd95_mm"] for m in scored]
    return {"mean_dice": float(np.mean(dices)) if dices else None,
            "mean_hd95_mm": float(np.mean(hds)) if hds else None,
            "organs_scored": [n for n, m in per_organ.items() if m["status"] in ("ok", "missed")],
            "false_positives": [n for n, m in per_organ.items() if m["status"] == "false positive"],
            "absent": [n for n, m in per_organ.items() if m["status"] == "absent"]}


def write_csv(per_organ: dict, path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["organ", "label", "status", "dice", "hd95_mm", "volume_ref_ml", "volume_pred_ml"])
        for name, m in per_organ.items():
            w.writerow([name, m["label"], m["status"], "" if m["dice"] is None else f"{m['dice']:.4f}",
                        "" if m["hd95_mm"] is None else ("inf" if math.isinf(m["hd95_mm"]) else f"{m['hd95_mm']:.2f}"),
                        m["volume_ref_ml"], m["volume_pred_ml"]])
