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
    import slicer
    import slicerio

    from deepsegrecon.image import Image
    from deepsegrecon.results import SegmentationResult, SegmentInfo
    from deepsegrecon.scene.segmentations import result_to_segmentation_node
    from deepsegrecon.scene.volumes import image_to_volume_node

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


def _bench_threads() -> int:
    """Torch threads for the training benchmarks: BENCH_THREADS, default 1 (on a shared, busy CPU one thread is
    many times faster than several: no OpenMP spinning)."""
    return int(os.environ.get("BENCH_THREADS", 1))


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
