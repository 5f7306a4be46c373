"""Brain tumour benchmarks: shipped weights on the real held-out patients (``brain_real_val``), on held-out
phantoms, and the real 240 x 240 x 155 four-input BraTS 2023 case through the CLI (``brain_240``)."""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from pathlib import Path

from run_benchmarks import SHARED, bench, run_measured

BARS = {"WT": 0.90, "TC": 0.85, "ET": 0.80}
REAL_BARS = {"WT": 0.80, "TC": 0.65, "ET": 0.60}


@bench
def bench_brain_real_val(out: Path) -> dict:
    """The default brain-tumor weights on the real patients of the fixed split that training never saw: the 6
    test patients (and the 6 selection ones the weights and post-processing were chosen on), four raw inputs
    and FLAIR + T1c z-scored; per-case Dice and HD95 (mm)."""
    import resource

    from deepsegrecon.brain.evaluate import evaluate_model
    from deepsegrecon.brain.preprocess import zscore
    from deepsegrecon.brain.task import load_model
    from deepsegrecon.brain.train_real import read_case, split
    from deepsegrecon.store import ModelStore

    entry = ModelStore().get("brain-tumor")
    model = load_model(entry)
    res = {"model": entry.version, "bars_test": REAL_BARS, "data": "brats_real_2mm (real patients, expert labels)"}
    t = time.perf_counter()
    for part in ("test", "select"):
        cases = [read_case(SHARED / "brats_real_2mm" / n) | {"name": n} for n in split()[part]]
        four = evaluate_model(model, cases, [("t1", "t1c", "t2", "flair")])
        zcases = [{**c, "images": {m: c["images"][m].with_array(zscore(c["images"][m].array))
                                   for m in ("t1c", "flair")}} for c in cases]
        two = evaluate_model(model, zcases, [("t1c", "flair")])
        res[part] = {"four_inputs": four["t1+t1c+t2+flair"], "flair_t1c_zscored": two["t1c+flair"]}
    res["test_bars_met"] = {r: bool(res["test"]["four_inputs"][r] >= REAL_BARS[r]) for r in REAL_BARS}
    res["test_bars_met"]["WT_flair_t1c"] = bool(res["test"]["flair_t1c_zscored"]["WT"] >= 0.70)
    res["time_s"] = round(time.perf_counter() - t, 1)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


@bench
def bench_brain_heldout(out: Path) -> dict:
    """phantom-v1 on held-out phantom seeds: all four inputs, and FLAIR + T1c only."""
    from deepsegrecon.brain.evaluate import HELDOUT_SEEDS
    from deepsegrecon.brain.evaluate import evaluate_phantoms as evaluate
    from deepsegrecon.store import ModelStore

    entry = ModelStore().get("brain-tumor", "phantom-v1")  # the phantom-trained version, on its own phantoms
    t = time.perf_counter()
    metrics = evaluate(entry.dir, HELDOUT_SEEDS, log=lambda m: None)
    res = {"model": entry.version, "seeds": list(HELDOUT_SEEDS), "time_s": round(time.perf_counter() - t, 1),
           "bars": BARS, "data": "synthetic MNI152 tumour phantoms (no labelled real case is available offline)"}
    for key, m in metrics.items():
        res[key] = m
        res[f"{key}_bars_met"] = {r: bool(m[r] >= BARS[r]) for r in BARS}
    return res


@bench
def bench_brain_240(out: Path) -> dict:
    """The real BraTS 2023 case (240 x 240 x 155, four inputs) end to end through the CLI on the CPU."""
    case = SHARED / "brats2023_gli_00001"
    files = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cmd = [sys.executable, "-m", "deepsegrecon", "brain-tumor", "-o", str(d / "out"), "--device", "cpu"]
        cmd += [a for m, f in files.items() for a in (f"--{m}", str(case / f"{f}.nii.gz"))]
        load_before = os.getloadavg()
        r = run_measured(cmd)
        load_after = os.getloadavg()
        outputs = sorted(p.name for p in (d / "out").iterdir())
        vols = {row["region"]: float(row["volume_ml"])
                for row in csv.DictReader((d / "out" / "brats2023_gli_00001_volumes.csv").open())}
    # the machine may be shared: the 1-minute load average before and after the run says how busy it was
    return {**r, "load_avg_1m": [round(load_before[0], 2), round(load_after[0], 2)], "cpus": os.cpu_count(),
            "shape": [240, 240, 155], "inputs": 4, "outputs": outputs, "volumes_ml": vols, "limit_s": 30,
            "limit_rss_mb": 2048, "within_limits": r["wall_s"] <= 30 and r["peak_rss_mb"] <= 2048}
