"""Training samples of the teeth networks: a phantom (or an annotated case) becomes one stage-1 sample (the whole
volume at ~1 mm, soft targets for background / maxilla / mandible / teeth) and one stage-2 sample (the teeth box at
~0.5 mm, teeth occupancy and tooth class); random patches with flips and intensity jitter are drawn from them.
Shared by the phantom training (:mod:`.train`), the head-phantom fine-tune (:mod:`.train_head`) and fine-tuning on
the user's cases (:mod:`.training`)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..frames import canonical_frame
from . import labels as L
from .nets import coord_channels, grid_size, normalise, resample, teeth_reference
from .phantom import TRAIN_SEED_RANGE


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


class EpochSampler(torch.utils.data.Sampler):
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
