"""The one optimisation loop every DeepSegRecon training runs through.

A training gives :class:`Loop` its modules, optimiser and budget, and a ``step(loop)`` function that draws
a batch, runs the forward pass inside ``loop.autocast()`` and returns the loss (or ``(loss, terms)``, or
``None`` to skip). The loop owns everything else, the same for the segmentation engine
(:mod:`.engine`) and the shipped teeth, brain and CBCT trainings:

- the learning rate (``schedule(step, fraction) -> lr``), float16 gradient scaling, clipping, the step;
- the budget: steps, wall-clock minutes or this process' CPU minutes (a shared machine), whichever ends
  first; ``fraction`` is how much of it is spent;
- validation every ``val_every`` steps and at the end, keeping the best weights;
- log lines, cancel checks, and checkpoints (modules, optimiser, scaler, clocks, RNG, the training's own
  state) written atomically; :meth:`Loop.resume` continues from one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..files import atomic_file

FORMAT = "deepsegrecon.checkpoint"


@dataclass
class Budget:
    """When training stops: whichever limit is reached first (``None``: no such limit)."""

    steps: int | None = None
    minutes: float | None = None  # wall clock, over resumed runs too
    cpu_minutes: float | None = None  # CPU time of this process: what a shared machine gives it
    max_steps: int | None = None  # a cap that leaves the schedule as the other limits set it (a short test run)

    def check(self) -> Budget:
        given = [v for v in (self.steps, self.minutes, self.cpu_minutes, self.max_steps) if v is not None]
        if any(not v > 0 for v in given):
            raise InputError(f"the training budget must be positive ({self})")
        return self


class Loop:
    """One training run's optimiser, clocks, budget, best weights and checkpoints (see the module text).

    ``modules``: a module or ``{name: module}`` (checkpoint keys). ``amp``: ``torch.float16`` or
    ``torch.bfloat16`` to run ``loop.autocast()`` blocks in that type (``None``: full precision); float16
    scales the gradients. ``clip``: gradient norm limit over all parameters. ``log(text)``: a line every
    ``log_every`` steps with the mean terms since the last. ``state``: ``(get, set)`` of the training's
    own state (its random generator, a sample bank ...) saved with each checkpoint. ``after_step(loop,
    numbers)``: called after each step (progress)."""

    def __init__(self, modules, optimizer, budget: Budget, *, device="cpu", amp=None, clip: float | None = None,
                 schedule: Callable[[int, float], float] | None = None, log: Callable[[str], None] | None = None,
                 log_every: int = 0, checkpoint=None, checkpoint_every_s: float = 600.0, cancel=None,
                 cancel_every: int = 1, state: tuple | None = None,
                 after_step: Callable[[Loop, dict], None] | None = None):
        self.modules = modules if isinstance(modules, dict) else {"model": modules}
        self.opt = optimizer
        self.budget = budget.check()
        self.device = torch.device(device)
        self.amp = amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16 and self.device.type == "cuda")
        self.clip, self.schedule = clip, schedule
        self.log, self.log_every = log, log_every
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every_s = checkpoint_every_s
        self.cancel, self.cancel_every = cancel, max(1, int(cancel_every))
        self.state, self.after_step = state, after_step
        self.step = 0
        self.history: list = []  # one {"loss", terms...} per step of this process
        self.records: list = []  # the log lines' numbers (and validations), over resumed runs too
        self.best = {"metric": -math.inf, "step": 0, "state": None}
        self._before = (0.0, 0.0)  # wall and CPU seconds of earlier (resumed) runs
        self._t0, self._c0 = time.monotonic(), time.process_time()
        self._last_ck = time.monotonic()
        self._log_from = 0  # history index of the first step not yet in a log line
        self._validated_at = None  # the step of the last validation

    # ------------------------------------------------------------------------------------------- clocks

    @property
    def elapsed_s(self) -> float:
        return self._before[0] + time.monotonic() - self._t0

    @property
    def cpu_s(self) -> float:
        return self._before[1] + time.process_time() - self._c0

    def fraction(self) -> float:
        """How much of the budget is spent (1.0: done)."""
        b, parts = self.budget, []
        if b.steps is not None:
            parts.append(self.step / b.steps)
        if b.minutes is not None:
            parts.append(self.elapsed_s / (60.0 * b.minutes))
        if b.cpu_minutes is not None:
            parts.append(self.cpu_s / (60.0 * b.cpu_minutes))
        return max(parts, default=0.0)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def parameters(self) -> list:
        return [p for m in self.modules.values() for p in m.parameters()]

    # ------------------------------------------------------------------------------------------- steps

    def train_step(self, step: Callable) -> dict | None:
        """One optimiser step on ``step(self)``'s loss; its numbers, or ``None`` when it skipped."""
        for m in self.modules.values():
            m.train()
        self.opt.zero_grad(set_to_none=True)
        out = step(self)
        if out is None:
            return None
        loss, terms = out if isinstance(out, tuple) else (out, {})
        self.scaler.scale(loss).backward()
        if self.clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        rec = {"loss": float(loss.detach()),
               **{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}}
        self.history.append(rec)
        return rec

    def set_lr(self, fraction: float) -> None:
        if self.schedule is not None:
            lr = self.schedule(self.step, fraction)
            for g in self.opt.param_groups:
                g["lr"] = lr

    def run(self, step: Callable, validate: Callable | None = None, val_every: int = 0,
            keep_best: bool = True) -> Loop:
        """Train until the budget is spent. ``validate() -> float`` (higher is better) runs every
        ``val_every`` steps and at the end; with ``keep_best`` the best weights are kept in ``self.best``."""
        if self.budget == Budget():
            raise InputError("give a training budget: steps, minutes or CPU minutes")
        skipped = 0
        cap = self.budget.max_steps
        while (fraction := self.fraction()) < 1.0 and (cap is None or self.step < cap):
            self.set_lr(fraction)
            if self.train_step(step) is None:
                skipped += 1
                if skipped > 1000:
                    raise InputError("the training step gave no loss 1000 times in a row: no usable samples")
                continue
            skipped = 0
            if self.after_step is not None:
                self.after_step(self, self.history[-1])
            if self.cancel is not None and self.step % self.cancel_every == 0:
                self.cancel.raise_if_cancelled()
            if validate is not None and val_every and self.step % val_every == 0:
                self.validate(validate, keep_best)
            if self.log_every and self.step % self.log_every == 0:
                self.log_line()
            if self.checkpoint is not None and time.monotonic() - self._last_ck > self.checkpoint_every_s:
                self.save()
        if validate is not None and self._validated_at != self.step:
            self.validate(validate, keep_best)
        if self.log_every and self._log_from < len(self.history):
            self.log_line()
        if self.checkpoint is not None:
            self.save()
        return self

    def validate(self, validate: Callable, keep_best: bool = True) -> float:
        for m in self.modules.values():
            m.eval()
        with torch.no_grad():
            out = validate()
        metric, extra = out if isinstance(out, tuple) else (out, {})
        self._validated_at = self.step
        rec = {"step": self.step, "minutes": round(self.elapsed_s / 60, 2), "val": round(float(metric), 4), **extra}
        self.records.append(rec)
        if self.log is not None:
            self.log(f"validation at step {self.step}: {rec}")
        if keep_best and metric > self.best["metric"]:
            self.best = {"metric": float(metric), "step": self.step, "state": self.module_states()}
        return metric

    def log_line(self) -> dict:
        recent, self._log_from = self.history[self._log_from:], len(self.history)
        mean = {k: round(float(np.nanmean([h.get(k, np.nan) for h in recent])), 5) for k in (recent[0] if recent else {})}
        rec = {"step": self.step, "minutes": round(self.elapsed_s / 60, 2), "cpu_minutes": round(self.cpu_s / 60, 2),
               "lr": self.opt.param_groups[0]["lr"], **mean}
        self.records.append(rec)
        if self.log is not None:
            self.log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        return rec

    def mean_recent(self, key: str = "loss", n: int = 100) -> float | None:
        """Mean of ``key`` over the last ``n`` steps (NaN steps left out), or ``None`` before any step."""
        vals = [h[key] for h in self.history[-n:] if key in h]
        return float(np.nanmean(vals)) if vals and not np.all(np.isnan(vals)) else None

    # ------------------------------------------------------------------------------------------- state

    def module_states(self) -> dict:
        return {name: cpu_state(m) for name, m in self.modules.items()}

    def best_states(self) -> dict:
        """The best validation's weights, or the current ones without validation."""
        return self.best["state"] if self.best["state"] is not None else self.module_states()

    def checkpoint_dict(self, **extra) -> dict:
        return {"format": FORMAT, "version": 2, "step": self.step, "wall_s": self.elapsed_s, "cpu_s": self.cpu_s,
                "modules": self.module_states(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "best": self.best, "records": self.records, "rng": rng_state(),
                "state": self.state[0]() if self.state else None, **extra}

    def save(self, path=None, **extra) -> Path:
        """Write a checkpoint atomically (``path`` default: the loop's checkpoint file)."""
        path = Path(path or self.checkpoint)
        with atomic_file(path) as tmp:
            torch.save(self.checkpoint_dict(**extra), tmp)
        self._last_ck = time.monotonic()
        return path

    def resume(self, path=None) -> dict:
        """Continue from a checkpoint this loop wrote; returns it (its extra keys are the caller's)."""
        ck = load_checkpoint(path or self.checkpoint)
        if set(ck.get("modules", {})) != set(self.modules):
            raise InputError(f"the checkpoint holds {sorted(ck.get('modules', {}))}, this training "
                             f"{sorted(self.modules)}")
        for name, m in self.modules.items():
            m.load_state_dict(ck["modules"][name])
        self.opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        self.step, self.best, self.records = int(ck["step"]), ck["best"], list(ck["records"])
        self._before = (float(ck["wall_s"]), float(ck["cpu_s"]))
        self._t0, self._c0 = time.monotonic(), time.process_time()
        set_rng_state(ck["rng"])
        if self.state and ck.get("state") is not None:
            self.state[1](ck["state"])
        return ck


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def rng_state() -> dict:
    """torch, CUDA, NumPy (legacy global) and Python random states, in types ``weights_only`` loads."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))


def load_checkpoint(path) -> dict:
    """A checkpoint written by a :class:`Loop` (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"nothing to resume: {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read the checkpoint {path}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise InputError(f"{path} is not a DeepSegRecon training checkpoint")
    return ck
