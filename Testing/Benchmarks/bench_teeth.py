"""Segment Teeth on the jaw phantoms: held-out accuracy, a 400x400x300 CBCT end to end, and fine-tuning to another
scanner (family B). No real dental CBCT is available offline; bench_teeth_real.py has the real scans."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from run_benchmarks import ROOT, _bench_threads, bench, run_measured


@bench
def bench_teeth_heldout(out: Path) -> dict:
    """Shipped teeth weights on held-out phantoms (seeds never used in training)."""
    from deepsegrecon.store import ModelStore
    from deepsegrecon.teeth.evaluate import HELDOUT_SEEDS, evaluate

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
    return {**r, "shape": [400, 400, 300], "outputs": outputs, "limit_s": 60, "limit_rss_mb": 2048,
            "within_limits": r["wall_s"] <= 60 and r["peak_rss_mb"] <= 2048}  # issue 19: on 2 idle cores


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
    and after. Target: a gain of at least 0.10. ``BENCH_TEETH_BASE`` names the base version (default: the default
    one; the record for phantom-v1 is ``results/teeth_domain_shift_phantom-v1.json``)."""
    import torch

    from deepsegrecon.store import ModelStore
    from deepsegrecon.teeth import labels as L
    from deepsegrecon.teeth.evaluate import HELDOUT_SEEDS, evaluate
    from deepsegrecon.teeth.phantom import generate_teeth_phantom
    from deepsegrecon.training.cases import write_case

    minutes = float(os.environ.get("BENCH_FINETUNE_MINUTES", 4.5))  # training; with start-up and writing < 5 min
    settings = os.environ.get("BENCH_FINETUNE_SET", "stage2.patch_size=[48,64,64] iterations_per_epoch=20").split()
    val_fraction = os.environ.get("BENCH_FINETUNE_VAL_FRACTION", "0.5")  # 1 case trains, 1 validates (base check)
    train_seeds = (2001, 2002)  # family-B training seeds (never held out)
    eval_seeds = list(HELDOUT_SEEDS)[10:13]
    base = ModelStore().get("teeth", os.environ.get("BENCH_TEETH_BASE") or None)
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
