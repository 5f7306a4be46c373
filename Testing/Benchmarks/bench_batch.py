"""Batch benchmark (issue 21): Segment Teeth on demo-size phantoms (162 x 154 x 116), time per case in one
``deepsegrecon batch`` process vs one process per case (``deepsegrecon teeth``, today's shell loop, and
``deepsegrecon batch`` on one case: the same outputs as the batch). BENCH_BATCH_CASES sets the number of cases
(default 20); run alone with ``python Testing/Benchmarks/bench_batch.py [--cases N]``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from run_benchmarks import _bench_threads, bench, run_measured

SHAPE = (162, 154, 116)
LIMIT = 0.8


def _cases() -> int:
    return int(os.environ.get("BENCH_BATCH_CASES", "20"))


@bench
def bench_teeth_batch(out: Path) -> dict:
    """Per-case time of a 20-case teeth batch vs one CLI process per case; same labelmaps both ways."""
    import numpy as np

    from deepsegrecon.segio import read_seg_nrrd

    n = _cases()
    py = [sys.executable, "-m", "deepsegrecon"]
    env = {**os.environ, "OMP_NUM_THREADS": str(_bench_threads())}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for i in range(n):
            subprocess.run(py + ["phantom", "teeth", "--seed", str(20000 + i), "--shape", *map(str, SHAPE),
                                 "-o", str(d / "in" / f"case{i:02d}")], check=True, capture_output=True)
        files = sorted((d / "in").glob("case*/cbct.nrrd"))
        cli, single = [], []
        for i, f in enumerate(files):  # interleaved, so load changes on a shared machine hit both alike
            cli.append(run_measured(py + ["teeth", str(f), "-o", str(d / "cli" / f"case{i:02d}"), "--device", "cpu"],
                                    env=env)["wall_s"])
            single.append(run_measured(py + ["batch", "teeth", str(f), "-o", str(d / "single" / f"case{i:02d}"),
                                             "--device", "cpu"], env=env)["wall_s"])
        b = run_measured(py + ["batch", "teeth", str(d / "in"), "-o", str(d / "batch"), "--device", "cpu"], env=env)
        rerun = run_measured(py + ["batch", "teeth", str(d / "in"), "-o", str(d / "batch"), "--device", "cpu"],
                             env=env)
        a = read_seg_nrrd(d / "cli" / "case00" / "cbct.seg.nrrd").labelmap.array
        c = read_seg_nrrd(d / "batch" / "case00_cbct" / "case00_cbct.seg.nrrd").labelmap.array
        same = bool(np.array_equal(a, c))
    per_batch = b["wall_s"] / n
    per_cli, per_single = sum(cli) / n, sum(single) / n
    return {"cases": n, "shape": list(SHAPE), "threads": _bench_threads(),
            "batch_wall_s": b["wall_s"], "batch_peak_rss_mb": b["peak_rss_mb"],
            "batch_per_case_s": round(per_batch, 2), "cli_teeth_per_case_s": round(per_cli, 2),
            "cli_batch_one_case_per_case_s": round(per_single, 2),
            "ratio_vs_cli_teeth": round(per_batch / per_cli, 3),
            "ratio_vs_one_case_batch": round(per_batch / per_single, 3),
            "rerun_wall_s": rerun["wall_s"], "same_labelmap_as_cli": same, "limit_ratio": LIMIT,
            "within_limits": per_batch <= LIMIT * per_cli and same,
            "note": "cli teeth also writes STL surfaces and a preview PNG; the one-case batch writes what the batch "
                    "writes (seg.nrrd, report.json), so ratio_vs_one_case_batch isolates process start, imports "
                    "and model load"}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    if args.cases:
        os.environ["BENCH_BATCH_CASES"] = str(args.cases)
    res = bench_teeth_batch(Path(args.out))
    print(json.dumps(res, indent=1))
