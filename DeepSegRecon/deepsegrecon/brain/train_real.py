"""Train the brain-tumour network on real glioma patients (``../shared/data/brats_real_2mm`` and
``brats_flair_wt_2mm``), resumable, and pick the weights on the selection split.

    nice python -m deepsegrecon.brain.train_real --out build/brain --minutes 100 [--resume]

* Data: the 38 four-input cases, split once (:data:`SPLIT_FILE`: train / select / test), and the FLAIR +
  whole-tumour cases, which train the WT output only (the other inputs are zero channels, as in modality
  dropout). Each case goes through the task's own preprocessing (:func:`.preprocess.to_network_input`).
* Each step: one random crop (``crop``; half of them centred near the tumour), flips on every axis,
  intensity scale 0.9-1.1 and shift +-0.1 per channel, modality dropout (35 % of the four-input crops
  keep FLAIR + T1c only, 10 % lose T1, 10 % lose T2); loss = soft Dice + BCE on the ET/TC/WT outputs
  (those a case has) + the VAE's 0.1 L2 + 0.1 KL; Adam, poly learning-rate decay over the time budget;
  mixed precision (bfloat16 on CPUs that have it, float16 on CUDA).
* Every ``--val-every`` steps the task's inference (sliding window, post-processing) scores the selection
  cases (four inputs, and FLAIR + T1c); the best mean Dice is kept. A checkpoint (weights, optimiser, step,
  RNG, elapsed time, best so far) is written atomically, so ``--resume`` continues where it stopped.
* At the end the best weights become the store version ``--version`` (segmentation path, float16); the test
  split is scored only by :mod:`.evaluate` when asked (``--test``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import labels as L
from .nets import build_net, default_network, kl_divergence, state_without_vae

SPLIT_FILE = Path(__file__).with_name("brats_real_split.json")
MODALITIES = ("t1", "t1c", "t2", "flair")
VERSION = "real-v1"


def data_root() -> Path:
    env = os.environ.get("DEEPSEGRECON_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def split() -> dict:
    """The fixed split of the four-input cases: {"train": [...], "select": [...], "test": [...]}."""
    return json.loads(SPLIT_FILE.read_text())


def make_split(names, seed: int = 0, n_select: int = 6, n_test: int = 6) -> dict:
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    picked = [names[i] for i in order]
    return {"seed": seed, "test": sorted(picked[:n_test]), "select": sorted(picked[n_test:n_test + n_select]),
            "train": sorted(picked[n_test + n_select:])}


def read_case(folder: Path) -> dict:
    """{modality: Image} and the labelmap (BraTS 2023 values) or whole-tumour mask of a case folder."""
    from ..io import read_image

    images = {m: read_image(folder / f"{m}.nii.gz") for m in MODALITIES if (folder / f"{m}.nii.gz").exists()}
    if (folder / "label.nii.gz").exists():
        return {"images": images, "label": read_image(folder / "label.nii.gz")}
    return {"images": images, "wt": read_image(folder / "wt.nii.gz")}


def prepare(folder: Path, network: dict) -> dict:
    """A case as training arrays on the model grid: x (C, k, j, i) float32, y (3, ...) uint8, w (3,)."""
    from .preprocess import resample_to, to_network_input

    case = read_case(folder)
    x, grid, ref, _, _ = to_network_input(case["images"], list(network["modalities"]), float(network["spacing_mm"]))
    if "label" in case:
        lab, w = case["label"], np.ones(3, np.float32)
    else:
        lab, w = case["wt"], np.array([0, 0, 1], np.float32)
    lab = lab if lab.same_grid(grid) else resample_to(lab, grid, order=0, dtype=np.int16)
    a = np.asarray(lab.array)
    y = L.to_regions(a) if "label" in case else np.stack([a > 0] * 3)
    return {"name": folder.name, "x": x[0].numpy(), "y": y.astype(np.uint8), "w": w,
            "tumour": np.argwhere(y[2]), "four": "label" in case}


def sample_crop(d: dict, crop, rng):
    shape = np.array(d["x"].shape[1:])
    crop = np.array(crop)
    if rng.random() < 0.5 and len(d["tumour"]):
        c = d["tumour"][rng.integers(len(d["tumour"]))]
        lo = c - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1)
    else:
        lo = np.array([rng.integers(0, max(s - c, 0) + 1) for s, c in zip(shape, crop)])
    lo = np.clip(lo, 0, np.maximum(shape - crop, 0))
    sl = tuple(slice(a, a + s) for a, s in zip(lo, crop))
    x, y = d["x"][(slice(None),) + sl], d["y"][(slice(None),) + sl]
    pad = [(0, 0)] + [(0, int(s - n)) for s, n in zip(crop, x.shape[1:])]
    return np.pad(x, pad), np.pad(y, pad)


def augment(x, y, rng, four: bool):
    for ax in (1, 2, 3):
        if rng.random() < 0.5:
            x, y = np.flip(x, ax), np.flip(y, ax)
    x = x.copy()
    for c in range(len(x)):
        m = x[c] != 0
        x[c][m] = x[c][m] * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    if four:
        r = rng.random()
        drop = ("t1", "t2") if r < 0.35 else ("t1",) if r < 0.45 else ("t2",) if r < 0.55 else ()
        for m in drop:
            x[MODALITIES.index(m)] = 0.0
    return x, np.ascontiguousarray(y)


def region_loss(seg, y, w):
    """Soft Dice (squared, per channel) + BCE over the channels with weight 1 in ``w`` (B, 3)."""
    p = torch.sigmoid(seg.float())
    y = y.float()
    dims = tuple(range(2, seg.ndim))
    dice = 1 - (2 * (p * y).sum(dims) + 1e-5) / ((p * p).sum(dims) + (y * y).sum(dims) + 1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(seg.float(), y, reduction="none").mean(dims)
    return ((dice + bce) * w).sum() / w.sum().clamp(min=1)


def amp_dtype(device: torch.device, mode: str):
    if mode == "off":
        return None
    if device.type == "cuda":
        return torch.float16
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if (bf16 or mode == "on") else None


def score(net, network: dict, cases: list, input_sets, device) -> dict:
    """Mean and per-case Dice of the task's inference on ``cases`` (raw folder data) for each input set."""
    from .evaluate import evaluate_model
    from .task import BrainModel

    model = BrainModel(net, network, {}, "training")
    out = evaluate_model(model, cases, input_sets, device=device, hd95=False)
    net.train()
    return out


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out: Path, minutes: float, init_filters: int = 16, crop=(64, 80, 64), lr: float = 1e-3, seed: int = 0,
          flair_share: float = 0.3, val_every: int = 300, resume: bool = False, device: str = "cpu",
          amp: str = "auto", max_steps=None, flair_cases=None, log=print) -> dict:
    """Train for ``minutes`` of wall clock (over resumed runs too) or ``max_steps``; the weights of the best
    selection score go to ``out/best.pt``, checkpoints to ``out/checkpoint.pt``."""
    from ..training.loop import Budget, Loop

    root = data_root()
    sp = split()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    network = default_network(init_filters, crop)
    torch.manual_seed(seed)  # the network's start (unseeded before: runs were not reproducible)
    net = build_net(network, with_vae=True).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    dtype = amp_dtype(device, amp)
    torch.manual_seed(seed)  # and the training stream, from the same point as the shipped run's
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    four = [prepare(root / "brats_real_2mm" / n, network) for n in sp["train"]]
    flair_dirs = sorted((root / "brats_flair_wt_2mm").iterdir()) if (root / "brats_flair_wt_2mm").is_dir() else []
    flair = [prepare(d, network) for d in flair_dirs[:flair_cases]]
    select = [read_case(root / "brats_real_2mm" / n) | {"name": n} for n in sp["select"]]
    log(f"[brain] {len(four)} four-input + {len(flair)} FLAIR-only training cases, {len(select)} selection cases "
        f"ready in {time.monotonic() - t0:.0f} s; amp {dtype}")

    def step(loop):
        d = flair[rng.integers(len(flair))] if (flair and rng.random() < flair_share) else four[rng.integers(len(four))]
        x, y = augment(*sample_crop(d, crop, rng), rng, d["four"])
        xt = torch.from_numpy(x)[None].to(device)
        yt = torch.from_numpy(y)[None].to(device)
        wt = torch.from_numpy(d["w"])[None].to(device)
        with loop.autocast():
            seg, recon, mu, logvar = net(xt)
        loss_seg = region_loss(seg, yt, wt)
        l2, kl = torch.mean((recon.float() - xt) ** 2), kl_divergence(mu.float(), logvar.float())
        return loss_seg + 0.1 * l2 + 0.1 * kl, {"seg": loss_seg}

    def validate():
        s = score(net, network, select, (MODALITIES, ("t1c", "flair")), device)
        m4, m2 = s["+".join(MODALITIES)], s["t1c+flair"]
        val = float(np.mean([m4["WT"], m4["TC"], m4["ET"]]) * 0.8 + 0.2 * m2["WT"])
        return val, {"four": {k: m4[k] for k in ("WT", "TC", "ET")}, "flair_t1c_WT": m2["WT"]}

    def set_rng(st):
        rng.bit_generator.state = st

    loop = Loop(net, opt, Budget(minutes=minutes, max_steps=max_steps), device=device, amp=dtype,
                schedule=lambda it, frac: lr * (1.0 - min(frac, 0.99)) ** 0.9, log=lambda m: log(f"[brain] {m}"),
                log_every=50, checkpoint=out / "checkpoint.pt", checkpoint_every_s=300,
                state=(lambda: rng.bit_generator.state, set_rng))
    if resume and loop.checkpoint.exists():
        loop.resume()
        log(f"[brain] resumed at step {loop.step} ({loop.elapsed_s / 60:.1f} min)")
    loop.run(step, validate, val_every=val_every)
    atomic_save(loop.best_states()["model"], out / "best.pt")
    history = [r for r in loop.records if "val" in r]
    state = {"step": loop.step, "elapsed": loop.elapsed_s, "best": loop.best["metric"], "best_step": loop.best["step"],
             "history": history}
    return {"network": network, "state": state, "amp": str(dtype), "device": str(device),
            "cases": {"train": len(four), "flair_only": len(flair), "select": len(select)}}


def write_version(out: Path, result: dict, store_root: Path, version: str, command: str, where: str) -> Path:
    """The best weights as store version ``version`` under ``store_root`` (segmentation path, float16)."""
    from ..store import ModelStore
    from .evaluate import evaluate_model, tune_postprocess
    from .task import BrainModel

    network, st = result["network"], result["state"]
    net = build_net(network, with_vae=True)
    net.load_state_dict(torch.load(out / "best.pt", weights_only=True))
    tmp = out / f".{version}-model.pt"
    shipped = state_without_vae(net)
    torch.save(shipped, tmp)
    sp = split()
    # post-processing and its figures on the selection patients, with the float16 weights as shipped
    seg_net = build_net(network, with_vae=False)
    seg_net.load_state_dict({k: v.float() for k, v in shipped.items()})
    seg_net.eval()
    select = [read_case(data_root() / "brats_real_2mm" / n) | {"name": n} for n in sp["select"]]
    sets = (MODALITIES, ("t1c", "flair"))
    tuned = tune_postprocess(BrainModel(seg_net, network, {}, version), select, sets, log=print)
    metrics = evaluate_model(BrainModel(seg_net, network, {"postprocess": tuned["chosen"]}, version), select, sets,
                             hd95=True)
    manifest = {
        "name": f"Segment Brain Tumour {version} (real glioma patients)",
        "task": "brain-tumor",
        "labels": {"1": "necrotic_core", "2": "edema", "3": "enhancing_tumor"},
        "input_spec": {"modalities": list(MODALITIES), "required": ["t1c", "flair"], "spacing_mm": network["spacing_mm"],
                       "normalize": "robust", "outputs": ["ET", "TC", "WT"], "activation": "sigmoid",
                       "expects": "skull-stripped, co-registered MRI (BraTS-like); any grid, resampled to 2 mm"},
        "network": network,
        "postprocess": tuned["chosen"],
        "postprocess_choice": {"on": "selection patients, four inputs and FLAIR + T1c, mean Dice",
                               "table": tuned["table"]},
        "metrics": {"selection": metrics},
        "trained_on": (f"{result['cases']['train']} real glioma patients (four inputs, expert labels, 2 mm; "
                       f"brats_real_2mm, split seed {sp['seed']}) + {result['cases']['flair_only']} FLAIR-only "
                       "patients (whole-tumour loss only, brats_flair_wt_2mm)"),
        "split": sp,
        "training": {"where": where, "minutes": round(st["elapsed"] / 60, 1), "steps": st["step"],
                     "best_step": st["best_step"], "amp": result["amp"], "device": result["device"],
                     "crop": network["vae_input_size"], "batch": 1,
                     "loss": "soft Dice + BCE on ET/TC/WT (+ 0.1 L2 + 0.1 KL VAE)",
                     "selection_history": st["history"], "command": command},
        "description": (f"SegResNet + VAE regulariser (Myronenko 2018), {network['init_filters']} initial filters "
                        "(paper: 32), trained at 2 mm on real BraTS patients; weights chosen on 6 selection patients."),
        "default": True,
    }
    store = ModelStore(root=store_root, builtin_root=store_root)
    return store.write_version("brain-tumor", version, {"model.pt": tmp}, manifest, overwrite=True, move=True).dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="work folder (checkpoints, best weights)")
    ap.add_argument("--store", type=Path, default=None, help="store root for the version (default: OUT/store)")
    ap.add_argument("--version", default=VERSION)
    ap.add_argument("--minutes", type=float, default=100.0, help="wall-clock budget, over resumed runs too")
    ap.add_argument("--init-filters", type=int, default=16)
    ap.add_argument("--crop", type=int, nargs=3, default=(64, 80, 64))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=300)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--flair-cases", type=int, default=None, help="use only the first N FLAIR-only cases")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--where", default="CPU (2 cores)")
    ap.add_argument("--command", default=None, help="the training command to record (default: this one)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = train(a.out, a.minutes, a.init_filters, tuple(a.crop), a.lr, a.seed, val_every=a.val_every,
                   resume=a.resume, device=a.device, amp=a.amp, max_steps=a.max_steps, flair_cases=a.flair_cases,
                   log=log)
    command = a.command or ("python -m deepsegrecon.brain.train_real " + " ".join(
        x for x in (argv if argv is not None else sys.argv[1:]) if x != "--resume"))
    folder = write_version(a.out, result, a.store or a.out / "store", a.version, command, a.where)
    print(json.dumps({"version": str(folder), "best": result["state"]["best"], "best_step": result["state"]["best_step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
