"""Train the two teeth networks on synthetic jaw phantoms, evaluate them, write a model version.

    python -m deepsegrecon.teeth.train --out DIR [--minutes M] [--device auto|cpu|cuda] [--seed S]

writes ``DIR/teeth/<version>/`` (default version ``phantom-v1``): ``manifest.json`` + ``stage1.pt`` +
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
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..training.loop import Budget, Loop
from . import labels as L
from .evaluate import evaluate
from .nets import (
    build_nets,
    default_network,
    state_dict_fp16,
)
from .phantom import HELDOUT_SEEDS, TRAIN_SEED_RANGE
from .samples import EpochSampler, PhantomPatches, training_seeds

DEFAULT_VERSION = "phantom-v1"


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
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=EpochSampler(len(seeds), seed),
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
    return entry


def write_version(out_dir: Path, version: str, states: dict, manifest: dict):
    """Write ``out_dir/teeth/<version>`` (a model store's layout) through the store's one writer: sums, manifest,
    atomic. ``states``: {file name: state dict}."""
    from ..store import ModelStore

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}-", dir=out_dir) as d:
        files = {}
        for name, state in states.items():
            files[name] = Path(d) / name
            torch.save(state, files[name])
        clean = {k: v for k, v in json.loads(json.dumps(manifest, default=_json_default)).items() if k != "files"}
        return ModelStore(root=out_dir, builtin_root=out_dir).write_version("teeth", version, files, clean,
                                                                            overwrite=True, move=True)


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
