"""Test-time refinement: maximise multiscale NCC between the X-ray and DRRs with Adam, coarse to fine.

The pose is ``exp(delta) @ start``: ``delta`` is an se(3) log (translation mm, rotation rad) in the CT-centred
world, so rotations turn about the CT centre; rotation and translation have their own learning rates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import multiscale_ncc

LEVELS = ((32, 60), (64, 40), (128, 12))  # (pixels along the longer side, most iterations)


@dataclass
class RefineResult:
    pose: np.ndarray  # 4x4 camera-to-world
    ncc: float
    iterations: int
    seconds: float
    cpu_seconds: float = 0.0  # process CPU time (all threads): the wall time an idle machine would need x threads
    history: list = field(default_factory=list)  # (level size, iteration, ncc)


def pose_from_delta(delta: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``exp(twist(delta)) @ start`` (matrix exponential: smooth at zero, unlike the closed form)."""
    t, r = delta[:3], delta[3:]
    z = torch.zeros((), dtype=delta.dtype)
    twist = torch.stack([torch.stack([z, -r[2], r[1], t[0]]), torch.stack([r[2], z, -r[0], t[1]]),
                         torch.stack([-r[1], r[0], z, t[2]]), torch.stack([z, z, z, z])])
    return (torch.linalg.matrix_exp(twist) @ start)[None]


def score(renderer, target: torch.Tensor, poses) -> list:
    """Multiscale NCC of each 4x4 pose's DRR against ``target`` (already at the renderer's size)."""
    from diffdrr.pose import RigidTransform

    out = []
    with torch.no_grad():
        for m in poses:
            img = renderer(RigidTransform(torch.as_tensor(np.asarray(m), dtype=torch.float32)[None]))
            out.append(float(multiscale_ncc(img, target)))
    return out


def resize_to(target: torch.Tensor, carm) -> torch.Tensor:
    return F.interpolate(target, size=(carm.height, carm.width), mode="area")


def refine(renderer, target: torch.Tensor, carm, start: np.ndarray, levels=LEVELS, lr_rot: float = 1.5e-2,
           lr_trans: float = 4.0, patience: int = 12, tol: float = 2e-4, step=None) -> RefineResult:
    """Refine ``start`` (4x4) against ``target`` (1, 1, H, W) taken with ``carm`` (any size)."""
    from diffdrr.pose import RigidTransform

    t0, c0 = time.perf_counter(), time.process_time()
    start_t = torch.as_tensor(np.asarray(start), dtype=torch.float32)
    delta_t = torch.zeros(3, requires_grad=True)
    delta_r = torch.zeros(3, requires_grad=True)
    history, iters = [], 0
    best = (-np.inf, np.asarray(start, float))
    total = sum(n for _, n in levels)
    done = 0
    for li, (size, n_iter) in enumerate(levels):
        c = carm.scaled(size)
        renderer.set_carm(c)
        tgt = resize_to(target, c)
        scale = 0.5 ** li
        opt = torch.optim.Adam([{"params": [delta_r], "lr": lr_rot * scale},
                                {"params": [delta_t], "lr": lr_trans * scale}], maximize=True)
        # the step shrinks geometrically to 5 % of its start over the level (Adam steps ~ lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.05 ** (1.0 / max(n_iter, 1)))
        level_best, stale = -np.inf, 0
        best = (-np.inf, best[1])  # scores are not comparable across sizes
        for it in range(n_iter):
            opt.zero_grad()
            m = pose_from_delta(torch.cat([delta_t, delta_r]), start_t)
            img = renderer(RigidTransform(m))
            s = multiscale_ncc(img, tgt).mean()
            s.backward()
            value = float(s.detach())
            if not np.isfinite(value):
                break
            if value > best[0]:
                best = (value, m.detach()[0].double().numpy())
            if not all(torch.isfinite(p.grad).all() for p in (delta_r, delta_t)):
                break
            opt.step()
            sched.step()
            history.append((size, it, value))
            iters += 1
            done += 1
            if step:
                step(done / total, f"{size} px, iteration {it + 1}: NCC {value:.4f}")
            if value > level_best + tol:
                level_best, stale = value, 0
            else:
                stale += 1
                if stale >= patience:
                    break
        done = sum(n for _, n in levels[: li + 1])
        # the next level starts from the best pose of this one
        with torch.no_grad():
            from diffdrr.pose import se3_log_map

            rel = torch.as_tensor(best[1], dtype=torch.float32) @ torch.linalg.inv(start_t)
            log = se3_log_map(rel[None].mT)[0]
            delta_t.copy_(log[:3])
            delta_r.copy_(log[3:])
    renderer.set_carm(carm)
    return RefineResult(best[1], best[0], iters, time.perf_counter() - t0, time.process_time() - c0, history)
