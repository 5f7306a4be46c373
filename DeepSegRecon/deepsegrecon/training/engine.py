"""Training and fine-tuning, the same for every segmentation task.

:func:`train` runs in one process, or as one rank of a DistributedDataParallel job (``distributed=True``,
process group already initialised: see :mod:`.ddp`). The caller gives the network, how a case becomes
tensors (``to_sample``, default :class:`~.data.CaseToTensors`), the number of classes, and an inferer for
validation. Per epoch it reports the training loss and the validation mean Dice through ``progress(event)``,
keeps the weights of the best validation epoch, writes a checkpoint (model + optimizer + epoch + RNG
state, atomically) that ``resume=True`` continues from, stops early when validation stops improving, and
checks ``cancel`` every few iterations. A run that ends normally writes ``out_dir/model.pt`` (best weights)
and ``out_dir/metrics.json``; a cancelled run raises :class:`Cancelled` and writes neither.

Seeding: ``monai.utils.set_determinism(seed)`` at the start; each epoch's shuffling and augmentation are
drawn from a generator seeded by (seed, epoch, rank), so a resumed run sees the same data as an
uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import Cancelled, InputError
from ..files import atomic_file, check_writable_dir, json_text
from ..task import CancelToken
from .data import CaseDataset, CaseToTensors, build_transforms
from .loop import Budget, Loop, cpu_state, load_checkpoint
from .losses import IGNORE_INDEX, SegLoss, dice_per_class  # noqa: F401 (IGNORE_INDEX re-exported)

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"


@dataclass
class TrainConfig:
    """Training settings. Spatial sizes and axes are in array order (k, j, i)."""

    epochs: int | None = 100  # at most this many epochs (None: until the time budget)
    minutes: float | None = None  # wall-clock budget, over resumed runs too (None: no limit)
    batch_size: int = 2  # cases per batch; a batch holds batch_size * samples_per_case patches
    samples_per_case: int = 2
    patch_size: tuple = (96, 96, 96)
    iterations_per_epoch: int | None = None  # repeat the cases to at least this many batches an epoch
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adamw"  # adam | adamw | sgd
    momentum: float = 0.99  # sgd only
    scheduler: str = "none"  # none | cosine (cosine needs epochs)
    loss: str = "dicece"  # dice | dicece
    include_background: bool = False  # in the Dice term
    val_fraction: float = 0.2
    val_seed: int = 0
    val_every: int = 1
    patience: int = 0  # early stopping after this many validations without improvement (0: never)
    min_delta: float = 0.0
    checkpoint_every: int = 1
    resume: bool = False
    amp: bool = True  # mixed precision, used on CUDA only
    seed: int = 0
    cudnn_benchmark: bool = False  # faster on GPUs, but no longer bit-for-bit reproducible
    num_workers: int = 0
    cache_cases: int = 0  # prepared cases kept in memory per process (LRU)
    check_cases: bool = True  # read every case once before training, refusing bad ones up front
    cancel_every: int = 5  # iterations between cancel / time checks (and iteration progress events)
    crop: str = "posneg"  # posneg (RandCropByPosNegLabeld) | classes (RandCropByLabelClassesd, every class
    # equally often) | random (RandSpatialCropSamplesd)
    pos_fraction: float = 0.67
    flip_axes: tuple = (0, 1, 2)  # () for tasks whose labels are not mirror-symmetric (e.g. FDI teeth)
    flip_prob: float = 0.5
    rotate90_prob: float = 0.0
    rotate90_axes: tuple = (1, 2)
    affine_prob: float = 0.2
    rotate_degrees: float = 15.0
    scale_range: float = 0.1
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_prob: float = 0.15
    noise_std: float = 0.05
    sw_batch_size: int = 2
    sw_overlap: float = 0.25

    def check(self) -> TrainConfig:
        """Refuse settings that cannot work, with an :class:`InputError` naming the setting."""
        if self.epochs is None and self.minutes is None:
            raise InputError("give a training budget: a number of epochs or of minutes")
        for name in ("epochs", "minutes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
                raise InputError(f"the training budget must be positive ({name} = {v})")
        if self.epochs is not None and int(self.epochs) != self.epochs:
            raise InputError(f"epochs must be a whole number, got {self.epochs}")
        for name in ("batch_size", "samples_per_case", "val_every", "checkpoint_every", "cancel_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise InputError(f"patch_size must be three positive sizes (k, j, i), got {self.patch_size}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise InputError(f"unknown optimizer '{self.optimizer}': use adam, adamw or sgd")
        if self.loss not in ("dice", "dicece"):
            raise InputError(f"unknown loss '{self.loss}': use dice or dicece")
        if self.scheduler not in ("none", "cosine"):
            raise InputError(f"unknown scheduler '{self.scheduler}': use none or cosine")
        if self.scheduler == "cosine" and self.epochs is None:
            raise InputError("the cosine schedule needs a number of epochs")
        if self.crop not in ("posneg", "classes", "random"):
            raise InputError(f"unknown crop '{self.crop}': use posneg, classes or random")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.pos_fraction <= 1:
            raise InputError(f"pos_fraction must be in [0, 1], got {self.pos_fraction}")
        if self.patience < 0 or self.num_workers < 0 or self.cache_cases < 0:
            raise InputError("patience, num_workers and cache_cases cannot be negative")
        if any(int(a) not in (0, 1, 2) for a in (*self.flip_axes, *self.rotate90_axes)):
            raise InputError("flip_axes and rotate90_axes are spatial axes 0, 1, 2 (k, j, i)")
        return self

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def check_settings(cls, d: dict, part: str = "") -> dict:
        """Refuse an unknown key or a value of the wrong type with an :class:`InputError` naming the key, the
        type it needs and the allowed keys; returns the settings with whole-number floats made ints."""
        if not isinstance(d, dict):
            raise InputError(f"training settings{' of ' + part if part else ''} must be a dict of KEY: VALUE")
        types = {f.name: str(f.type) for f in fields(cls)}  # "int", "Optional[float]" ... (postponed annotations)
        out = {}
        for key, value in d.items():
            name = f"{part}.{key}" if part else key
            if key not in types:
                raise InputError(f"unknown training setting '{name}'; allowed: {', '.join(types)}")
            optional = types[key].startswith("Optional[")
            kind = types[key].removeprefix("Optional[").rstrip("]")
            fixed = None if optional and value is None else _typed(value, kind)
            if fixed is _WRONG:
                raise InputError(f"training setting '{name}' must be {_TYPE_WORDS[kind]}"
                                 f"{' or null' if optional else ''}, got {value!r}; allowed keys: {', '.join(types)}")
            out[key] = fixed
        return out

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> TrainConfig:
        return cls(**cls.check_settings({**d, **overrides}))


_WRONG = object()
_TYPE_WORDS = {"int": "a whole number", "float": "a finite number", "bool": "true or false", "str": "a text",
               "tuple": "a list of whole numbers"}


def _typed(value, kind: str):
    """``value`` as ``kind`` (whole-number floats become ints, lists tuples), or _WRONG."""
    number = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if kind == "int":
        return int(value) if number and math.isfinite(value) and float(value).is_integer() else _WRONG
    if kind == "float":
        return value if number and math.isfinite(value) else _WRONG
    if kind == "bool":
        return value if isinstance(value, bool) else _WRONG
    if kind == "str":
        return value if isinstance(value, str) else _WRONG
    if kind == "tuple":
        items = [_typed(v, "int") for v in value] if isinstance(value, (list, tuple)) else [_WRONG]
        return _WRONG if _WRONG in items else tuple(items)
    return value


@dataclass
class TrainResult:
    best_state: dict  # state_dict of the best validation epoch (CPU tensors)
    last_state: dict
    history: list  # one dict per epoch
    metrics: dict
    out_dir: Path | None = None

    def manifest_fields(self) -> dict:
        """The model-store manifest keys training fills in (``metrics``, ``trained_on``)."""
        return {"metrics": self.metrics, "trained_on": {"train": self.metrics.get("train_cases", []),
                                                        "validation": self.metrics.get("val_cases", [])}}


# --------------------------------------------------------------------------------------------------- helpers


def local_rank() -> int:
    """This process' GPU index in a ``torchrun`` job (0 outside one)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def split_cases(cases: Sequence, fraction: float, seed: int = 0):
    """(train, validation): a seeded shuffle; at least one validation case when ``fraction > 0`` and there
    are two cases or more; none when there is a single case."""
    cases = list(cases)
    if fraction <= 0 or len(cases) < 2:
        return cases, []
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(1, int(round(fraction * len(cases)))), len(cases) - 1)
    val = sorted(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


def default_inferer(config: TrainConfig, device):
    from ..inference import sliding_window

    def infer(net, image):
        return sliding_window(net, image, config.patch_size, device, overlap=config.sw_overlap,
                              sw_batch_size=config.sw_batch_size)

    return infer


def _run_inferer(inferer, net, image, device):
    from monai.inferers import Inferer

    if isinstance(inferer, Inferer):
        with torch.no_grad():
            return inferer(image.to(device), net)
    return inferer(net, image)


class _Dist:
    """The few collective operations training needs (no-ops in one process)."""

    def __init__(self, enabled: bool, device):
        import torch.distributed as dist

        self.on = bool(enabled)
        if self.on and not dist.is_initialized():
            raise InputError("distributed=True needs an initialised process group (see deepsegrecon.training.ddp)")
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.device = device if (self.on and dist.get_backend() == "nccl") else torch.device("cpu")

    def sum(self, values) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def gather_messages(self, message: str | None) -> list:
        """Every rank's message (``None`` ones left out), in rank order, on every rank."""
        if not self.on:
            return [message] if message is not None else []
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, message)
        return [m for m in out if m is not None]

    def max(self, values) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu()


# --------------------------------------------------------------------------------------------------- train


def train(net: torch.nn.Module, cases, config: TrainConfig, out_dir, base_state: dict | None = None,
          progress: Callable[[dict], None] | None = None, cancel: CancelToken | None = None,
          distributed: bool = False, *, num_classes: int | None = None, to_sample: Callable | None = None,
          inferer: Callable | None = None, val_cases=None, device=None) -> TrainResult:
    """Train ``net`` on ``cases`` (:class:`~.cases.Case` objects) and return the best weights, the history
    and the metrics.

    ``base_state``: weights to start from (fine-tuning). ``progress(event)``: called on rank 0 with dicts:
    ``{"event": "epoch", "epoch", "epochs", "loss", "val_dice", "best_val_dice", "best_epoch", "lr",
    "elapsed_s", "eta_s", "fraction", "stage", "message"}`` after each epoch and ``{"event": "iteration", ...}``
    every ``config.cancel_every`` iterations (``{"event": "check", ...}`` while the cases are read first, and
    ``{"event": "done", ...}`` at the end). ``cancel``: a :class:`CancelToken`, checked every
    ``config.cancel_every`` iterations (all ranks agree): raises :class:`Cancelled`, nothing final written.
    ``to_sample(case_data) -> {"image", "label", "roi"}`` tensors; ``num_classes`` (default
    ``to_sample.num_classes``); ``inferer(net, image (1, C, k, j, i)) -> logits`` or a MONAI ``Inferer``
    (default: :func:`deepsegrecon.inference.sliding_window` with the patch size). ``val_cases``: explicit
    validation cases (otherwise ``config.val_fraction`` of ``cases``). ``device``: default ``auto`` (the
    local GPU of this rank under DDP).
    """
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from ..device import amp_enabled, resolve_device

    config = copy.deepcopy(config).check()
    cancel = cancel or CancelToken()
    out_dir = Path(out_dir)
    to_sample = to_sample or CaseToTensors()
    num_classes = num_classes or getattr(to_sample, "num_classes", None)
    if not num_classes or num_classes < 2:
        raise InputError("train needs num_classes (2 or more, background included)")
    if device is None:
        if distributed and torch.cuda.is_available():
            device = torch.device("cuda", local_rank())
        else:
            device = resolve_device("auto")
    device = torch.device(device)
    dist = _Dist(distributed, device)
    rank0 = dist.rank == 0
    cases = list(cases)
    if val_cases is None:
        train_cases, val_cases = split_cases(cases, config.val_fraction, config.val_seed)
    else:
        train_cases, val_cases = cases, list(val_cases)
    if not train_cases:
        raise InputError("no training cases")

    # ---- refuse bad cases before anything is written (each rank reads its share, all agree)
    if config.check_cases:
        everything = train_cases + val_cases
        mine = everything[dist.rank::dist.world]
        error = None
        for n, case in enumerate(mine):
            if cancel.cancelled:
                break
            try:
                case.check()
            except InputError as e:
                error = e
                break
            if rank0 and progress is not None:
                progress({"event": "check", "stage": "check cases", "fraction": round((n + 1) / len(mine), 4),
                          "elapsed_s": None, "eta_s": None,
                          "message": f"checked case {case.name} ({n + 1}/{len(mine)})"})
        messages = dist.gather_messages(str(error) if error is not None else None)
        if error is not None:
            raise error
        if messages:
            raise InputError(messages[0])
        if dist.max([cancel.cancelled])[0]:
            raise Cancelled("training cancelled by the user")
    if config.resume and not (out_dir / CHECKPOINT).is_file():
        raise InputError(f"nothing to resume: {out_dir / CHECKPOINT} does not exist")
    if rank0:
        check_writable_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- model, optimiser, state
    set_determinism(seed=config.seed)
    if config.cudnn_benchmark:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    model = net
    if base_state is not None:
        try:
            model.load_state_dict(base_state)
        except RuntimeError as e:
            raise InputError(f"the base weights do not fit this network: {str(e).splitlines()[0]}") from e
    model.to(device)
    opt = _optimizer(model, config)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(config.epochs)) \
        if config.scheduler == "cosine" else None
    amp = bool(config.amp) and amp_enabled(device)
    loop = Loop(model, opt, Budget(minutes=config.minutes), device=device, amp=torch.float16 if amp else None)
    start_epoch, history = 0, []
    best = {"metric": -math.inf, "epoch": 0, "state": None, "bad": 0}
    if config.resume:
        ck = load_checkpoint(out_dir / CHECKPOINT)
        if ck.get("num_classes") != num_classes:
            raise InputError(f"the checkpoint has {ck.get('num_classes')} classes, this training {num_classes}")
        loop.resume(out_dir / CHECKPOINT)
        if sched is not None and ck.get("scheduler"):
            sched.load_state_dict(ck["scheduler"])
        start_epoch, history = int(ck["epoch"]), list(ck["history"])
        best = {"metric": float(ck["best_metric"]), "epoch": int(ck["best_epoch"]), "state": ck["best_state"],
                "bad": int(ck["bad_epochs"])}
    core = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = SegLoss(config.loss, config.include_background)
    inferer = inferer or default_inferer(config, device)

    det, rnd = build_transforms(config, num_classes=num_classes)
    per_step = config.batch_size * dist.world
    length = config.iterations_per_epoch * per_step if config.iterations_per_epoch else None
    dataset = CaseDataset(train_cases, to_sample, det, rnd, cache=config.cache_cases, length=length,
                          num_classes=num_classes)
    # With workers and a case cache, keep the workers (and their caches) for the whole run; shuffling and
    # augmentation then continue one random stream instead of being re-seeded each epoch.
    persistent = config.num_workers > 0 and config.cache_cases > 0
    loader = sampler = None
    val_cache: dict = {}

    budget_s = config.minutes * 60.0 if config.minutes is not None else math.inf
    max_epochs = int(config.epochs) if config.epochs is not None else None
    run_start = time.monotonic()
    val_time = 0.0
    stopped = "epochs"
    epoch = start_epoch

    def elapsed() -> float:
        return loop.elapsed_s

    def eta(done_epochs: float) -> float | None:
        run_epochs = done_epochs - start_epoch
        cands = []
        if max_epochs is not None and run_epochs > 0:
            cands.append((time.monotonic() - run_start) / run_epochs * (max_epochs - done_epochs))
        if budget_s < math.inf:
            cands.append(max(budget_s - elapsed(), 0.0))
        return round(min(cands), 1) if cands else None

    def fraction(done_epochs: float) -> float:
        f = [done_epochs / max_epochs] if max_epochs else []
        if budget_s < math.inf:
            f.append(elapsed() / budget_s)
        return round(min(max(f), 1.0), 4)

    def stop_flags() -> tuple:
        """(cancelled, out of time), agreed by every rank."""
        time_up = elapsed() + val_time >= budget_s
        flags = dist.max([cancel.cancelled, time_up])
        return bool(flags[0]), bool(flags[1])

    def save_checkpoint(done_epochs: int) -> None:
        if rank0:
            loop.save(out_dir / CHECKPOINT, epoch=done_epochs, history=history, num_classes=num_classes,
                      scheduler=sched.state_dict() if sched is not None else None, best_state=best["state"],
                      best_metric=float(best["metric"]), best_epoch=best["epoch"], bad_epochs=best["bad"],
                      config=config.to_dict())

    while max_epochs is None or epoch < max_epochs:
        if budget_s < math.inf and stop_flags()[1]:
            stopped = "time budget"
            break
        if loader is None or not persistent:
            g = torch.Generator()
            g.manual_seed(int(config.seed) * 1_000_003 + epoch * 7919 + dist.rank)
            opts = dict(batch_size=config.batch_size, generator=g, num_workers=config.num_workers,
                        persistent_workers=persistent, pin_memory=device.type == "cuda")
            if distributed:
                from torch.utils.data.distributed import DistributedSampler

                sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                             seed=int(config.seed), drop_last=False)
                loader = DataLoader(dataset, sampler=sampler, **opts)
            else:
                loader = DataLoader(dataset, shuffle=True, **opts)
        if sampler is not None:
            sampler.set_epoch(epoch)
        n_iter = len(loader)
        model.train()
        loss_sum, n_seen, time_up = 0.0, 0, False
        for it, batch in enumerate(loader):
            loss_sum += loop.train_step(lambda lp, b=batch: seg_loss(lp, model, loss_fn, b))["loss"]
            n_seen += 1
            if (it + 1) % config.cancel_every == 0 and it + 1 < n_iter:
                cancelled, time_up = stop_flags()
                if cancelled:
                    raise Cancelled("training cancelled by the user")
                if rank0 and progress is not None:
                    done = epoch + (it + 1) / n_iter
                    progress({"event": "iteration", "stage": "train", "epoch": epoch + 1, "iteration": it + 1,
                              "iterations": n_iter, "elapsed_s": round(elapsed(), 2), "eta_s": eta(done),
                              "fraction": fraction(done),
                              "message": f"epoch {epoch + 1}: batch {it + 1}/{n_iter}"})
                if time_up:
                    break
        if stop_flags()[0]:
            raise Cancelled("training cancelled by the user")
        tot = dist.sum([loss_sum, n_seen])
        epoch_loss = float(tot[0] / max(tot[1], 1))
        epoch += 1
        if sched is not None:
            sched.step()

        val_dice, per_class = None, None
        if val_cases and (epoch % config.val_every == 0 or epoch == max_epochs or time_up):
            t0 = time.monotonic()
            val_dice, per_class = _validate(core, val_cases, to_sample, inferer, num_classes, device, dist,
                                            cancel, val_cache, config.cache_cases)
            val_time = time.monotonic() - t0
            model.train()
        metric = val_dice if val_dice is not None else (-epoch_loss if not val_cases else None)
        if metric is not None:
            if metric > best["metric"] + config.min_delta or best["state"] is None:
                best.update(metric=metric, epoch=epoch, state=cpu_state(core), bad=0)
            else:
                best["bad"] += 1
        entry = {"epoch": epoch, "loss": round(epoch_loss, 6), "val_dice": val_dice, "per_class_dice": per_class,
                 "lr": opt.param_groups[0]["lr"], "iterations": n_seen, "elapsed_s": round(elapsed(), 2)}
        history.append(entry)
        if rank0 and progress is not None:
            best_dice = best["metric"] if val_cases and best["metric"] > -math.inf else None
            msg = f"epoch {epoch}{'/' + str(max_epochs) if max_epochs else ''}: loss {epoch_loss:.4f}"
            if val_dice is not None:
                msg += f", validation Dice {val_dice:.3f}"
            progress({"event": "epoch", "stage": "train", **entry, "epochs": max_epochs,
                      "best_val_dice": best_dice, "best_epoch": best["epoch"], "eta_s": eta(epoch),
                      "fraction": fraction(epoch), "message": msg})
        early = config.patience > 0 and best["bad"] >= config.patience
        last = early or time_up or (max_epochs is not None and epoch >= max_epochs)
        if epoch % config.checkpoint_every == 0 or last:
            save_checkpoint(epoch)
        if early:
            stopped = "early stopping"
            break
        if time_up:
            stopped = "time budget"
            break

    last_state = cpu_state(core)
    best_state = best["state"] if best["state"] is not None else last_state
    metrics = {
        "best_val_dice": best["metric"] if val_cases and best["metric"] > -math.inf else None,
        "best_epoch": best["epoch"] or epoch,
        "per_class_dice": next((h["per_class_dice"] for h in history if h["epoch"] == best["epoch"]), None),
        "final_loss": history[-1]["loss"] if history else None,
        "epochs": epoch,
        "stopped": stopped,
        "elapsed_s": round(elapsed(), 1),
        "train_cases": [c.name for c in train_cases],
        "val_cases": [c.name for c in val_cases],
        "num_classes": num_classes,
        "config": config.to_dict(),
    }
    if rank0:
        with atomic_file(out_dir / MODEL_FILE) as tmp:
            torch.save(best_state, tmp)
        with atomic_file(out_dir / METRICS_FILE) as tmp:
            tmp.write_text(json_text({"metrics": metrics, "history": history}))
        if progress is not None:
            progress({"event": "done", "stage": "train", "fraction": 1.0, "elapsed_s": round(elapsed(), 2),
                      "eta_s": 0.0, "epochs": epoch, "stopped": stopped,
                      "best_val_dice": metrics["best_val_dice"],
                      "message": f"training finished after {epoch} epochs ({stopped})"})
    return TrainResult(best_state, last_state, history, metrics, out_dir)


def seg_loss(loop: Loop, model, loss_fn, batch) -> torch.Tensor:
    """The loss of one batch of ``{"image", "label", "roi"}`` patches (the forward pass in the loop's AMP)."""
    dev = loop.device
    x, y, roi = (batch[k].to(dev, non_blocking=True) for k in ("image", "label", "roi"))
    with loop.autocast():
        logits = model(x)
    return loss_fn(logits.float(), y, roi)


def _optimizer(model, config):
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.learning_rate, weight_decay=config.weight_decay)


class _CancelChecked(torch.nn.Module):
    """``net`` that checks the cancel token before each forward pass (each sliding window batch)."""

    def __init__(self, net, cancel):
        super().__init__()
        self.net, self.cancel = net, cancel

    def forward(self, x):
        self.cancel.raise_if_cancelled()
        return self.net(x)


def _validate(net, val_cases, to_sample, inferer, num_classes, device, dist, cancel, cache, cache_size):
    """Mean foreground Dice over the validation cases (each rank takes a share; all get the same numbers).
    Voxels outside a case's ROI are left out (set to background in both prediction and label)."""
    sums = torch.zeros(num_classes - 1, dtype=torch.float64)
    counts = torch.zeros(num_classes - 1, dtype=torch.float64)
    net.eval()
    for i in range(dist.rank, len(val_cases), dist.world):
        if dist.world == 1:  # under DDP the ranks agree on cancelling after validation
            cancel.raise_if_cancelled()
        s = cache.get(i)
        if s is None:
            s = to_sample(val_cases[i].load())
            if len(cache) < cache_size:
                cache[i] = s
        model = _CancelChecked(net, cancel) if dist.world == 1 else net  # a cancel lands between windows
        logits = _run_inferer(inferer, model, s["image"][None], device)
        pred = logits.argmax(1).cpu()
        lab = s["label"].cpu().long()
        roi = s["roi"].cpu() > 0
        pred = torch.where(roi, pred, 0)
        lab = torch.where(roi, lab, 0)
        d = dice_per_class(pred, lab, num_classes)
        ok = ~torch.isnan(d)
        sums += torch.where(ok, d, 0.0)
        counts += ok.double()
    tot = dist.sum(torch.cat([sums, counts]))
    sums, counts = tot[: num_classes - 1], tot[num_classes - 1:]
    per_class = [round(float(s / c), 4) if c > 0 else None for s, c in zip(sums, counts)]
    valid = [v for v in per_class if v is not None]
    return (round(float(np.mean(valid)), 4) if valid else None), per_class
