"""Brain tumour benchmarks: shipped weights on held-out phantoms (the WT / TC / ET bars), and the real
240 x 240 x 155 four-input BraTS 2023 case through the CLI (the 60 s / 4 GB bar on a 2-core CPU)."""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from pathlib import Path

from run_benchmarks import SHARED, bench, run_measured

BARS = {"WT": 0.90, "TC": 0.85, "ET": 0.80}


@bench
def bench_brain_heldout(out: Path) -> dict:
    """Shipped brain-tumor weights on held-out phantom seeds: all four inputs, and FLAIR + T1c only."""
    from deepsegrecon.brain.train import HELDOUT_SEEDS, evaluate
    from deepsegrecon.store import ModelStore

    entry = ModelStore().get("brain-tumor")
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
            "shape": [240, 240, 155], "inputs": 4, "outputs": outputs, "volumes_ml": vols, "limit_s": 60,
            "limit_rss_mb": 4096, "within_limits": r["wall_s"] <= 60 and r["peak_rss_mb"] <= 4096}
