"""Train the two teeth networks on synthetic jaw phantoms, evaluate them, write a model version.

    python -m deepsegrecon.teeth.train --out DIR [--minutes M] [--device auto|cpu|cuda] [--seed S]

writes ``DIR/<version>/`` (default version ``phantom-v1``): ``manifest.json`` + ``stage1.pt`` +
``stage2.pt`` (float16 state dicts; they load with ``torch.load(weights_only=True)``).

Data: phantoms are generated on the fly by DataLoader workers from *training seeds* (0 .. 9999,
drawn deterministically from ``seed``); *held-out seeds* (10000 and up, :data:`HELDOUT_SEEDS`)
are never used for training and serve for evaluation, the demo volume and the tests. Each phantom
becomes one stage-1 sample (whole volume at ~1 mm, soft targets for background / maxilla /
mandible / teeth) and one stage-2 sample (teeth box at ~0.5 mm, teeth occupancy and tooth class);
random patches with flips and intensity jitter are drawn from them. With ``cache_dir`` the prepared
samples are kept on disk, so later epochs (and reruns) skip the generation.

Loss: MONAI DiceCELoss (softmax, soft targets). On CUDA: autocast (float16) + GradScaler.
No SimpleITK is needed here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..frames import canonical_frame
from ..training.loop import Budget, Loop
from . import labels as L
from .evaluate import evaluate
from .nets import (
    build_nets,
    coord_channels,
    default_network,
    grid_size,
    normalise,
    resample,
    state_dict_fp16,
    teeth_reference,
)
from .phantom import HELDOUT_SEEDS, TRAIN_SEED_RANGE

DEFAULT_VERSION = "phantom-v1"


# ---------------------------------------------------------------------------------------------
# samples


def _onehot_area(lab: np.ndarray, values, size) -> torch.Tensor:
    """Area fractions (len(values), *size) of each label value set (a value or a tuple of values)."""
    out = torch.empty((len(values),) + tuple(size))
    for n, v in enumerate(values):
        m = np.isin(lab, v) if isinstance(v, (tuple, list)) else (lab == v)
        out[n] = resample(torch.from_numpy(m.astype(np.float32))[None], size)[0]
    return out


def prepare_sample(cbct, lab, network: dict, rng: np.random.Generator) -> dict:
    """A phantom (image + labelmap) -> stage-1 and stage-2 training arrays (compact dtypes)."""
    can = canonical_frame(cbct)
    arr = can.to_canonical(cbct.array)
    gl = can.to_canonical(lab.array)
    sp = np.array(can.spacing)
    shape = np.array(arr.shape)
    c1, c2 = network["stage1"], network["stage2"]
    n1 = grid_size(shape, sp, float(c1["spacing_mm"]))
    x1 = resample(normalise(torch.from_numpy(arr), network)[None], n1)[0]
    teeth_vals = tuple(L.FDI)
    y1 = _onehot_area(gl, [0, L.MAXILLA, L.MANDIBLE, teeth_vals], n1)
    y1[0] = (1 - y1[1:].sum(0)).clamp(0, 1)
    teeth1 = (y1[3] > 0.5).numpy()
    ref1, lo1, hi1 = teeth_reference(teeth1)
    out = {"x1": x1.half().numpy(), "y1": (y1 * 255).round().to(torch.uint8).numpy()}
    if ref1 is None:
        return out
    scale = shape / np.array(n1)
    ref = np.array([(ref1[0] + 0.5) * scale[0] - 0.5, lo1[1] * scale[1], (ref1[2] + 0.5) * scale[2] - 0.5])
    margin_mm = float(c2["margin_mm"]) + rng.uniform(-1.5, 2.5, size=(2, 3))
    lo = np.maximum(np.floor(lo1 * scale).astype(int) - np.ceil(margin_mm[0] / sp).astype(int), 0)
    hi = np.minimum(np.ceil(hi1 * scale).astype(int) + np.ceil(margin_mm[1] / sp).astype(int), shape)
    n2 = tuple(max(n, 8) for n in grid_size(hi - lo, sp, float(c2["spacing_mm"])))
    crop = arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    gcrop = gl[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    x2 = resample(normalise(torch.from_numpy(np.ascontiguousarray(crop)), network)[None], n2)[0]
    cls_of = np.zeros(256, np.uint8)
    for f in L.FDI:
        cls_of[f] = L.stage2_class(f)
    g2 = cls_of[gcrop]
    fg = resample(torch.from_numpy((g2 > 0).astype(np.float32))[None], n2)[0]
    best = torch.zeros(n2)
    cls = torch.zeros(n2, dtype=torch.uint8)
    for c in np.unique(g2):
        if c == 0:
            continue
        frac = resample(torch.from_numpy((g2 == c).astype(np.float32))[None], n2)[0]
        better = frac > best
        cls[better] = int(c)
        best = torch.maximum(best, frac)
    out.update(x2=x2.half().numpy(), fg2=(fg * 255).round().to(torch.uint8).numpy(), cls2=cls.numpy(),
               box=np.stack([lo, hi]), ref=ref, spacing=sp, n2=np.array(n2))
    return out


def _phantom_spacing(family: str, rng) -> float:
    from .phantom import FAMILIES

    lo, hi = FAMILIES[family.upper()]["spacing"]
    return float(rng.uniform(max(lo, 0.3), hi))  # coarser than 0.3 mm keeps generation fast


def make_sample(seed: int, family: str, network: dict, cache_dir=None) -> dict:
    """Generate (or load from ``cache_dir``) the prepared sample of one phantom seed."""
    from .phantom import FAMILIES, PHANTOM_VERSION, generate_teeth_phantom

    path = None
    if cache_dir is not None:
        key = [PHANTOM_VERSION, network["stage1"]["spacing_mm"], network["stage2"]["spacing_mm"],
               network["stage2"]["margin_mm"], network["intensity"], FAMILIES[family.upper()]]
        tag = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
        path = Path(cache_dir) / f"{family}-{seed}-{tag}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError):
                pass
    rng = np.random.default_rng([int(seed), 7])
    cbct, lab, _ = generate_teeth_phantom(seed, spacing=_phantom_spacing(family, rng), family=family)
    sample = prepare_sample(cbct, lab, network, rng)
    if path is not None:
        save_sample(path, sample)
    return sample


def save_sample(path: Path, sample: dict) -> None:
    """Write a prepared sample to ``path`` (.npz) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez(tmp, **sample)
    os.replace(tmp, path)


def _crop(a: np.ndarray, centre, size):
    """Crop (C, D, H, W) around ``centre`` to ``size``, zero-padding outside."""
    out = np.zeros((a.shape[0],) + tuple(size), a.dtype)
    src, dst = [], []
    for ax, (c, s) in enumerate(zip(centre, size)):
        n = a.shape[ax + 1]
        start = int(c) - s // 2
        a0, a1 = max(start, 0), min(start + s, n)
        src.append(slice(a0, a1))
        dst.append(slice(a0 - start, a1 - start))
    out[(slice(None),) + tuple(dst)] = a[(slice(None),) + tuple(src)]
    return out


def _centre(mask: np.ndarray, size, rng, p_fg: float):
    shape = mask.shape
    if rng.random() < p_fg:
        idx = np.flatnonzero(mask)
        if idx.size:
            return np.unravel_index(int(idx[rng.integers(idx.size)]), shape)
    return tuple(int(rng.integers(max(1, n - s // 2 + 1))) + min(s // 2, n // 2) if n > s else n // 2
                 for n, s in zip(shape, size))


def _augment_intensity(x: np.ndarray, rng) -> np.ndarray:
    a = rng.uniform(0.9, 1.1)
    b = rng.uniform(-0.08, 0.08)
    x = x * a + b
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(0.0, 0.05), size=x.shape).astype(np.float32)
    return x.astype(np.float32)


def sample_patches(sample: dict, network: dict, rng, n1: int, n2: int) -> dict:
    """Random training patches (with flips and intensity jitter) from one prepared sample."""
    c1, c2 = network["stage1"], network["stage2"]
    out = {}
    x1 = sample["x1"].astype(np.float32)[None]
    y1 = sample["y1"].astype(np.float32) / 255.0
    xs, ys = [], []
    for _ in range(n1):
        cen = _centre(y1[3] > 0.5, c1["roi"], rng, 0.5)
        xi, yi = _crop(x1, cen, c1["roi"]), _crop(y1, cen, c1["roi"])
        yi[0] += 1.0 - yi.sum(0)  # padded voxels are background
        if rng.random() < 0.5:
            xi, yi = xi[..., ::-1], yi[..., ::-1]
        xs.append(_augment_intensity(xi, rng))
        ys.append(np.ascontiguousarray(yi))
    if n1:
        out["x1"], out["y1"] = np.stack(xs), np.stack(ys)
    if "x2" not in sample or n2 == 0:
        return out
    lo, hi = sample["box"]
    ref = sample["ref"] + rng.normal(0, 1.0, 3) / sample["spacing"]  # stage-1 box jitter (~1 mm)
    coords = coord_channels(lo, hi, tuple(sample["n2"]), sample["spacing"], ref,
                            float(c2.get("coord_scale_mm", 30.0))).numpy()
    img = np.concatenate([sample["x2"].astype(np.float32)[None], coords], 0)
    fg = sample["fg2"].astype(np.float32) / 255.0
    cls = sample["cls2"]
    xs, ys = [], []
    for _ in range(n2):
        cen = _centre(fg > 0.5, c2["roi"], rng, 0.85)
        xi = _crop(img, cen, c2["roi"])
        f = _crop(fg[None], cen, c2["roi"])[0]
        c = _crop(cls[None], cen, c2["roi"])[0]
        y = np.zeros((L.N_STAGE2,) + tuple(c2["roi"]), np.float32)
        y[0] = 1.0 - f
        # tooth class c gets the teeth occupancy f, background the rest (c == 0 rewrites channel 0 alike)
        np.put_along_axis(y, c[None].astype(np.int64), np.where(c > 0, f, 1.0 - f)[None], 0)
        if rng.random() < 0.5:
            xi, y = xi[..., ::-1], y[..., ::-1]
        xi = np.ascontiguousarray(xi)
        xi[0] = _augment_intensity(xi[0], rng)
        xs.append(xi)
        ys.append(np.ascontiguousarray(y))
    out["x2"], out["y2"] = np.stack(xs), np.stack(ys)
    return out


class PhantomPatches(torch.utils.data.Dataset):
    """Item n: the patches of training seed ``seeds[n]`` (generated, or loaded from the cache)."""

    def __init__(self, seeds, family, network, cache_dir, patches1, patches2, base_seed):
        self.seeds, self.family, self.network = list(seeds), family, network
        self.cache_dir, self.p1, self.p2, self.base_seed = cache_dir, patches1, patches2, base_seed
        self.calls = 0

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, n):
        seed = self.seeds[n % len(self.seeds)]
        sample = make_sample(seed, self.family, self.network, self.cache_dir)
        self.calls += 1
        rng = np.random.default_rng([self.base_seed, seed, n // len(self.seeds), self.calls])
        out = sample_patches(sample, self.network, rng, self.p1, self.p2)
        return {k: torch.from_numpy(v) for k, v in out.items()}


class _EpochSampler(torch.utils.data.Sampler):
    """Endless shuffled passes over the seeds (item index n + epoch * len), deterministic per seed."""

    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def __iter__(self):
        epoch = 0
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for i in perm:
                yield int(i) + epoch * self.n
            epoch += 1


def training_seeds(seed: int, n: int) -> list:
    rng = np.random.default_rng([seed, 12345])
    return sorted(int(s) for s in rng.choice(np.arange(*TRAIN_SEED_RANGE), size=n, replace=False))


# ---------------------------------------------------------------------------------------------
# training


def train_from_phantoms(out_dir, minutes: float = 30.0, device: str = "auto", seed: int = 0, family: str = "A",
                        version: str = DEFAULT_VERSION, n_phantoms: int = None, workers: int = None,
                        cache_dir=None, eval_seeds=None, network: dict = None, lr: float = 2e-3,
                        batch1: int = 2, batch2: int = None, patches_per_phantom: int = None,
                        init_from=None, log=print, eval_shape=None, resume=None, threads=None,
                        stage1_every: int = None):
    """Train stage 1 and stage 2 together for ``minutes`` of wall time, then evaluate on held-out phantoms
    and write the version folder ``out_dir/<version>``. Returns the :class:`~deepsegrecon.store.ModelEntry`.

    ``init_from``: a model version folder to start from (fine-tuning); its network config is kept.
    A checkpoint ``out_dir/.<version>-checkpoint.pt`` is written every 10 minutes; ``resume=True``
    continues from it (same schedule), ``resume=False`` writes none.
    """
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from ..device import amp_enabled, resolve_device
    from ..store import ModelEntry

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    set_determinism(seed)
    torch.manual_seed(seed)
    if threads is None and not cuda:
        # a CPU shared with other work: one thread avoids waiting on descheduled sibling threads
        busy = os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1) if hasattr(os, "getloadavg") else False
        threads = 1 if busy else min(4, os.cpu_count() or 1)
    if threads:
        torch.set_num_threads(int(threads))
    base_manifest = None
    if init_from is not None:
        base_manifest = json.loads((Path(init_from) / "manifest.json").read_text())
        network = base_manifest["network"]
    network = network or default_network()
    net1, net2 = build_nets(network)
    if init_from is not None:
        from ..store import entry_from_dir
        from .task import load_model

        m = load_model(entry_from_dir(init_from))
        net1.load_state_dict(m.net1.state_dict())
        net2.load_state_dict(m.net2.state_dict())
    net1, net2 = net1.to(dev).train(), net2.to(dev).train()
    n_phantoms = n_phantoms or (4000 if cuda else 96)
    workers = workers if workers is not None else (min(12, (os.cpu_count() or 2) - 2) if cuda else 1)
    batch2 = batch2 or (4 if cuda else 1)
    patches_per_phantom = patches_per_phantom or (2 if cuda else 4)
    stage1_every = stage1_every or (1 if cuda else 2)  # stage 1 learns fast: on a CPU train it every other step
    seeds = training_seeds(seed, n_phantoms)
    ds = PhantomPatches(seeds, family, network, cache_dir, batch1 * patches_per_phantom,
                        batch2 * patches_per_phantom, seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=_EpochSampler(len(seeds), seed),
                                         num_workers=workers, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers > 0 else None, pin_memory=cuda)
    params = [{"params": net1.parameters()}, {"params": net2.parameters()}]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    loss1 = DiceCELoss(softmax=True, include_background=False, batch=True)
    loss2 = DiceCELoss(softmax=True, include_background=False, batch=True)
    amp = amp_enabled(dev)
    seen = {"phantoms": 0}

    def patches():  # (phantom's patches, index) pairs, patches_per_phantom of them per phantom
        for item in loader:
            seen["phantoms"] += 1
            yield from ((item, k) for k in range(patches_per_phantom))

    batches = patches()

    def step(loop):
        item, k = next(batches)
        loss, l1, l2 = None, torch.full((), float("nan")), torch.zeros(())
        for stage, (net, lossf, b) in enumerate(((net1, loss1, batch1), (net2, loss2, batch2)), 1):
            if f"x{stage}" not in item or (stage == 1 and loop.step % stage1_every):
                continue
            x = item[f"x{stage}"][k * b:(k + 1) * b].to(dev, non_blocking=True)
            y = item[f"y{stage}"][k * b:(k + 1) * b].to(dev, non_blocking=True)
            with loop.autocast():
                out = net(x)
            term = lossf(out.float(), y)
            l1, l2 = (term, l2) if stage == 1 else (l1, term)
            loss = term if loss is None else loss + term
        return None if loss is None else (loss, {"stage1": l1, "stage2": l2})

    def set_seen(n):
        seen["phantoms"] = int(n)

    warmup = 50
    loop = Loop({"stage1": net1, "stage2": net2}, opt, Budget(minutes=minutes), device=dev,
                amp=torch.float16 if amp else None, clip=5.0, log=lambda m: log(f"[train] {m}"), log_every=100,
                schedule=lambda it, frac: lr * min(1.0, (it + 1) / warmup)
                * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))),
                checkpoint=Path(out_dir) / f".{version}-checkpoint.pt" if resume is not False else None,
                state=(lambda: seen["phantoms"], set_seen))
    if resume and loop.checkpoint.is_file():
        loop.resume()
        log(f"[train] resumed from {loop.checkpoint}: iteration {loop.step}, {loop.elapsed_s / 60:.1f} min done")
    loop.run(step)
    it, phantoms_seen, train_s = loop.step, seen["phantoms"], loop.elapsed_s
    batches.close()  # ends the loader's workers

    net1.eval().cpu()
    net2.eval().cpu()
    manifest = {
        "name": f"Segment Teeth {version} (synthetic phantoms)",
        "task": "teeth",
        "version": version,
        "labels": {str(k): v for k, v in L.all_labels().items()},
        "input_spec": {"modality": "CBCT", "intensity": "HU-like (air -1000, enamel ~2700)", "ndim": 3,
                       "orientation": "any direction matrix (re-indexed to S/P/L internally)",
                       "stage1_spacing_mm": network["stage1"]["spacing_mm"],
                       "stage2_spacing_mm": network["stage2"]["spacing_mm"]},
        "network": network,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "trained_on": (f"synthetic jaw phantoms family {family} seeds {len(seeds)} drawn from "
                       f"{TRAIN_SEED_RANGE[0]}..{TRAIN_SEED_RANGE[1] - 1} (training seed {seed}); held-out seeds "
                       f"{HELDOUT_SEEDS.start}..{HELDOUT_SEEDS.stop - 1} never used"),
        "base_version": base_manifest.get("version") if base_manifest else None,
        "training": {"minutes": round(train_s / 60, 1), "iterations": it, "phantoms_seen": phantoms_seen,
                     "device": str(dev), "amp": amp, "batch1": batch1, "batch2": batch2, "lr": lr,
                     "final_loss1": loop.mean_recent("stage1"), "final_loss2": loop.mean_recent("stage2"),
                     "command": (f"python -m deepsegrecon.teeth.train --out DIR --minutes {minutes} --device {device} "
                                 f"--seed {seed} --family {family} --phantoms {len(seeds)} --lr {lr} --version {version}"
                                 + (f" --init-from {init_from}" if init_from is not None else ""))},
        "description": ("Two-stage MONAI 3D U-Net for dental CBCT: stage 1 jaws + teeth at 1 mm, stage 2 tooth "
                        "classes (jaw x position) at 0.5 mm in the teeth box; instance split and FDI numbering "
                        "in physical space. Trained on synthetic phantoms only: not validated on patient data."),
        "default": True,
    }
    out_dir = Path(out_dir)
    entry = write_version(out_dir, version, {"stage1.pt": state_dict_fp16(net1), "stage2.pt": state_dict_fp16(net2)},
                          manifest)
    eval_seeds = list(eval_seeds) if eval_seeds is not None else list(HELDOUT_SEEDS)[:4]
    if eval_seeds:
        log(f"[eval] held-out seeds {eval_seeds}")
        metrics = evaluate(entry.dir, eval_seeds, family=family, device=str(dev), shape=eval_shape, log=log)
        manifest["metrics"] = {k: v for k, v in metrics.items() if k != "per_seed"} | {"per_seed": metrics["per_seed"]}
        entry = write_version(out_dir, version, {"stage1.pt": state_dict_fp16(net1),
                                                 "stage2.pt": state_dict_fp16(net2)}, manifest)
    return ModelEntry("teeth", version, entry.dir, manifest)


def write_version(out_dir: Path, version: str, states: dict, manifest: dict):
    """Write ``out_dir/version`` atomically (staging folder renamed into place)."""
    from ..store import ModelEntry, sha256_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=out_dir))
    try:
        files = {}
        for name, state in states.items():
            torch.save(state, stage / name)
            files[name] = sha256_file(stage / name)
        manifest = dict(manifest, files=files)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_json_default), encoding="utf-8")
        target = out_dir / version
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{version}-", dir=out_dir))
            os.replace(target, old / "v")
        os.rename(stage, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ModelEntry("teeth", version, target, manifest)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepsegrecon.teeth.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder that receives the version folder <out>/<version>")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", default="A")
    ap.add_argument("--version", default=DEFAULT_VERSION)
    ap.add_argument("--phantoms", type=int, default=None, help="number of training phantoms (seeds)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cache", default=None, help="folder to keep prepared samples in")
    ap.add_argument("--eval-seeds", type=int, nargs="*", default=None)
    ap.add_argument("--init-from", default=None, help="version folder to fine-tune from")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on a busy machine)")
    args = ap.parse_args(argv)
    entry = train_from_phantoms(Path(args.out), minutes=args.minutes, device=args.device, seed=args.seed,
                                family=args.family, version=args.version, n_phantoms=args.phantoms,
                                workers=args.workers, cache_dir=args.cache, eval_seeds=args.eval_seeds,
                                init_from=args.init_from, lr=args.lr, resume=args.resume or None,
                                threads=args.threads,
                                log=lambda m: print(m, flush=True))
    print(json.dumps({"dir": str(entry.dir), "metrics": entry.manifest.get("metrics")}, default=_json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
