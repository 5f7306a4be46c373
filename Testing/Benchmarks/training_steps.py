"""Does a training still take the steps it took? The first 50 losses of each training, against the record.

    python Testing/Benchmarks/training_steps.py teeth brain   # or: all
    python Testing/Benchmarks/training_steps.py cbct --write  # also store these losses as the record's "new"

results/training_first50_steps.json holds, per training, the losses of the loop it had before
training.loop.Loop ("old", commit 1b3d681) and on Loop ("new"); this re-runs the training (seed 0, one thread,
CPU, budgets of 1e15 minutes so the schedules' time fraction stays 0), records Loop's first 50 losses and
prints the largest difference from the record. Needs ../shared/data (brain_real, cbct, refiner) and the
teeth-head cache of `make weights-teeth-head` (build/teeth-head/cache). A few minutes each on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "Testing" / "Benchmarks" / "results" / "training_first50_steps.json"
STEPS = 50
BIG = 1e15  # minutes


class Enough(Exception):
    pass


def run(name: str, tmp: Path) -> list:
    """The training ``name``'s first STEPS losses on Loop (teeth: [stage 1, stage 2] per step)."""
    from deepsegrecon.training import loop as L

    losses = []
    original = L.Loop.train_step

    def recording(self, step):
        rec = original(self, step)
        if rec is not None:
            losses.append([rec["stage1"], rec["stage2"]] if "stage1" in rec else rec["loss"])
            if len(losses) >= STEPS:
                raise Enough
        return rec

    L.Loop.train_step = recording
    quiet = lambda *a, **k: None  # noqa: E731
    try:
        _start(name, tmp, quiet)
    except Enough:
        pass
    finally:
        L.Loop.train_step = original
    return losses


def _start(name: str, tmp: Path, quiet) -> None:
    if name == "engine":
        sys.path.insert(0, str(ROOT / "Testing" / "Python"))
        from deepsegrecon.training.cases import find_cases
        from test_training_engine import make_ball_cases, tiny_config
        from test_training_engine import run as run_engine

        cases = find_cases(make_ball_cases(tmp / "cases"))
        run_engine(cases, tmp / "out", tiny_config(epochs=5, iterations_per_epoch=10, scheduler="cosine", val_every=2))
    elif name == "teeth":
        from deepsegrecon.teeth.train import train_from_phantoms

        train_from_phantoms(tmp, minutes=BIG, device="cpu", seed=0, n_phantoms=20, workers=0, eval_seeds=[],
                            resume=False, threads=1, log=quiet)
    elif name == "teeth_head":
        from deepsegrecon.teeth.train_head import train

        train(ROOT / "build/teeth-head/cache", tmp, ROOT / "Resources/Models/teeth/phantom-v3", BIG, "x", lr=1e-4,
              threads=1, seed=0, log=quiet)
    elif name == "brain":
        from deepsegrecon.brain.train import train_from_phantoms

        train_from_phantoms(tmp, minutes=BIG, seed=0, eval_seeds=(), log=quiet, iterations=1000)
    elif name == "brain_real":
        from deepsegrecon.brain.train_real import train

        train(tmp, BIG, seed=0, val_every=10**6, device="cpu", flair_cases=4, max_steps=1000, log=quiet)
    elif name == "cbct":
        from deepsegrecon.cbct.train import train

        train(minutes=BIG, seed=0, points=2048, log=quiet, max_iters=1000)
    elif name == "refiner":
        from deepsegrecon.cbct.train_refiner import generate, train

        paths = generate(tmp / "pairs", 6, 0, log=quiet)
        train(paths, BIG, 0, tmp, val=2, log=quiet, max_iters=1000)
    elif name == "xray":
        import os

        sys.path.insert(0, str(ROOT / "Testing" / "Python"))
        from deepsegrecon.cli import main as cli
        from deepsegrecon.io import write_image
        from xray_testdata import small_ct

        os.environ["DEEPSEGRECON_HOME"] = str(tmp / "home")
        write_image(small_ct(), tmp / "ct.nrrd")
        (tmp / "truth.json").write_text(json.dumps({"parameterization": "euler_angles", "convention": "ZXY",
                                                    "rotation": [0.06, -0.04, 0.05],
                                                    "translation": [8.0, 858.0, -6.0]}))
        cli(["drr", "--ct", str(tmp / "ct.nrrd"), "--pose", str(tmp / "truth.json"), "-o", str(tmp / "drr"),
             "--size", "64", "64", "--pixel-spacing", "4.5"])
        cli(["xray-register", "--ct", str(tmp / "ct.nrrd"), "--xray", str(tmp / "drr" / "drr.nrrd"), "-o",
             str(tmp / "reg"), "--train-steps", "50", "--size", "64"])
    else:
        raise SystemExit(f"unknown training '{name}'")


def main(argv=None) -> int:
    record = json.loads(RECORD.read_text())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help=f"all, or any of: {', '.join(record['trainings'])}")
    ap.add_argument("--write", action="store_true", help="store the losses as the record's 'new'")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = list(record["trainings"]) if a.names == ["all"] else a.names
    worst = 0.0
    for name in names:
        if name == "brain_real":  # the old loop built this network unseeded: the record seeded it so
            import deepsegrecon.brain.train_real as T

            build = T.build_net
            T.build_net = lambda *x, **k: (torch.manual_seed(1234), build(*x, **k))[1]  # noqa: B023
        with tempfile.TemporaryDirectory(prefix=f"steps-{name}-") as d:
            got = run(name, Path(d))
        old = np.array(record["trainings"][name]["old"], float)
        diff = float(np.nanmax(np.abs(np.array(got, float) - old))) if len(got) == len(old) else float("inf")
        worst = max(worst, diff)
        print(json.dumps({"training": name, "steps": len(got), "max_abs_difference_from_old": diff}), flush=True)
        if a.write:
            record["trainings"][name].update(new=got, max_abs_difference=diff)
            RECORD.write_text(json.dumps(record, indent=1))
    return 0 if worst < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
