"""Train the brain-tumour network on phantoms (:mod:`.phantom`) with the paper's loss, and evaluate it.

    python -m deepsegrecon.brain.train --out Resources/Models --minutes 20 --seed 0   # writes Resources/Models/brain-tumor/phantom-v1

Each iteration: one random crop (``crop``, mostly centred in the tumour) of a phantom from a pool that is
refreshed as training goes (a new phantom every ``refresh`` iterations), random flips, intensity scale
(0.9-1.1) and shift (+-0.1 SD) per channel, modality dropout (half of the crops lose T1, T2 or both, so
FLAIR + T1c alone works), Adam with weight decay 1e-5 and a poly learning-rate decay over the time budget,
loss = soft Dice + 0.1 L2 + 0.1 KL. Then the version is written through the model store (segmentation path
only, float16) and scored on held-out phantom seeds with the task's own inference (all four inputs, and
FLAIR + T1c only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import labels as L
from .evaluate import evaluate_phantoms
from .nets import BratsLoss, build_net, default_network, state_without_vae
from .phantom import HELDOUT_SEEDS, MODALITIES, TRAIN_SEEDS, make_phantom
from .preprocess import zscore

VERSION = "phantom-v1"
DROP_PATTERNS = ((), ("t1",), ("t2",), ("t1", "t2"))


def prepare_phantom(seed: int) -> dict:
    p = make_phantom(seed)
    x = np.stack([zscore(p["images"][m].array) for m in MODALITIES])
    lab = p["labels"].array
    return {"x": x, "y": L.to_regions(lab), "wt": np.argwhere(lab > 0), "brain": np.argwhere(x[0] != 0)}


def sample_crop(d: dict, crop, rng, pos: float = 0.8):
    """(x (C, *crop), y (3, *crop)) around a tumour voxel (probability ``pos``) or a brain voxel."""
    pts = d["wt"] if (rng.random() < pos and len(d["wt"])) else d["brain"]
    c = pts[rng.integers(len(pts))] + rng.integers(-crop[0] // 4, crop[0] // 4 + 1, 3)
    shape = np.array(d["x"].shape[1:])
    lo = np.clip(c - np.array(crop) // 2, 0, np.maximum(shape - crop, 0))
    sl = tuple(slice(a, a + s) for a, s in zip(lo, crop))
    x, y = d["x"][(slice(None),) + sl], d["y"][(slice(None),) + sl]
    pad = [(0, 0)] + [(0, s - n) for s, n in zip(crop, x.shape[1:])]
    return np.pad(x, pad), np.pad(y, pad)


def augment(x: np.ndarray, y: np.ndarray, rng, dropout: bool = True):
    for ax in (1, 2, 3):
        if rng.random() < 0.5:
            x, y = np.flip(x, ax), np.flip(y, ax)
    x = x.copy()
    brain = x[0] != 0
    for c in range(len(x)):
        x[c][brain] = x[c][brain] * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    if dropout and rng.random() < 0.5:
        for m in DROP_PATTERNS[rng.integers(1, len(DROP_PATTERNS))]:
            x[MODALITIES.index(m)] = 0.0
    return x, np.ascontiguousarray(y)


def train_from_phantoms(out_dir, minutes: float = 20.0, seed: int = 0, init_filters: int = 8, crop=(32, 32, 32),
                        lr: float = 2e-3, pool: int = 12, refresh: int = 12, eval_seeds=HELDOUT_SEEDS,
                        version: str = VERSION, log=print, iterations=None, wall_minutes=None):
    """``minutes``: CPU time of this process (the machine may be shared); ``wall_minutes``: a wall-clock cap."""
    from ..store import ModelStore
    from ..training.loop import Budget, Loop

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    network = default_network(init_filters, crop)
    net = build_net(network, with_vae=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    loss_fn = BratsLoss()
    seeds = iter(rng.permutation(np.arange(*TRAIN_SEEDS))[:100_000].tolist())
    t0 = time.monotonic()
    phantoms = [prepare_phantom(next(seeds)) for _ in range(pool)]
    used = [pool]
    log(f"[brain] {pool} phantoms ready in {time.monotonic() - t0:.0f} s")

    def step(loop):
        if loop.step and loop.step % refresh == 0:  # renew one phantom of the pool
            phantoms[rng.integers(len(phantoms))] = prepare_phantom(next(seeds))
            used[0] += 1
        x, y = augment(*sample_crop(phantoms[rng.integers(len(phantoms))], crop, rng), rng)
        xt = torch.from_numpy(x)[None]
        return loss_fn(net(xt), torch.from_numpy(y.astype(np.float32))[None], xt)

    loop = Loop(net, opt, Budget(cpu_minutes=minutes, minutes=wall_minutes, max_steps=iterations),
                schedule=lambda it, frac: lr * (1.0 - min(frac, 0.99)) ** 0.9, log=lambda m: log(f"[brain] {m}"),
                log_every=20).run(step)
    it, used = loop.step, used[0]
    train_s, cpu_s = loop.elapsed_s, loop.cpu_s
    state = state_without_vae(net)
    out_dir = Path(out_dir)
    tmp = out_dir / f".{version}-model.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    hist = loop.history
    last = {k: round(float(np.mean([h[k] for h in hist[-50:]])), 4) for k in hist[-1]} if hist else {}
    manifest = {
        "name": f"Segment Brain Tumour {version} (synthetic phantoms)",
        "task": "brain-tumor",
        "labels": {"1": "necrotic_core", "2": "edema", "3": "enhancing_tumor"},
        "input_spec": {"modalities": list(MODALITIES), "required": ["t1c", "flair"], "normalize": "zscore over non-zero",
                       "spacing_mm": network["spacing_mm"], "outputs": ["ET", "TC", "WT"], "activation": "sigmoid"},
        "network": network,
        "trained_on": (f"synthetic brain tumour phantoms on the MNI152 2009 template (2 mm), {used} phantoms drawn "
                       f"from seeds {TRAIN_SEEDS[0]}..{TRAIN_SEEDS[1] - 1} (training seed {seed}); held-out seeds "
                       f"{HELDOUT_SEEDS[0]}..{HELDOUT_SEEDS[-1]} never used"),
        "training": {"minutes": round(train_s / 60, 1), "cpu_minutes": round(cpu_s / 60, 1), "iterations": it, "crop": list(crop), "batch": 1, "lr": lr,
                     "loss": "soft Dice + 0.1 L2 + 0.1 KL", "final_terms": last,
                     "first_terms": {k: round(float(np.mean([h[k] for h in hist[:50]])), 4) for k in hist[0]}
                     if hist else {},
                     "modality_dropout": "half the crops lose T1, T2 or both",
                     "command": f"deepsegrecon train-brain-phantoms --out DIR --minutes {minutes:g} --seed {seed} (CPU minutes, one thread)"},
        "description": (f"SegResNet + VAE regulariser (Myronenko 2018), CPU-sized ({init_filters} initial filters, "
                        f"paper: 32; {crop[0]}^3 crops at 2 mm, paper: 160x192x128 at 1 mm). Trained on synthetic "
                        "phantoms only: not validated on patient data."),
        "default": True,
    }
    store = ModelStore(root=out_dir, builtin_root=out_dir)
    entry = store.write_version("brain-tumor", version, {"model.pt": tmp}, manifest, overwrite=True, move=True)
    if eval_seeds:
        metrics = evaluate_phantoms(entry.dir, eval_seeds, log=log)
        manifest["metrics"] = metrics
        torch.save(state, tmp)
        entry = store.write_version("brain-tumor", version, {"model.pt": tmp}, manifest, overwrite=True, move=True)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--wall-minutes", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-filters", type=int, default=8)
    ap.add_argument("--crop", type=int, nargs=3, default=(32, 32, 32))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    entry = train_from_phantoms(a.out, a.minutes, a.seed, a.init_filters, tuple(a.crop), a.lr,
                                log=lambda m: print(m, file=sys.stderr, flush=True), wall_minutes=a.wall_minutes)
    print(json.dumps(entry.manifest.get("metrics"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
