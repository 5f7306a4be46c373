"""From cases to training patches: case -> tensors, a lazily reading dataset, MONAI augmentation.

Tensors follow the :class:`~deepsegrecon.image.Image` array order: spatial axes are (k, j, i), so
``patch_size`` and ``flip_axes`` are given in that order. A sample is a dict:

* ``image``: float32 (C, k, j, i), the modalities stacked in modality order and normalised;
* ``label``: class indices (1, k, j, i), 0 = background, class ``n`` = the ``n``-th value of ``label_values``;
* ``roi``: uint8 (1, k, j, i), 1 where the label was reviewed (all ones when the case has no ROI mask).

Voxels outside the ROI keep their label here; the loss leaves them out (see ``engine.SegLoss``). Padding and
affine augmentation fill the ROI with 0, so invented voxels never count either.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError

FG_KEY, BG_KEY, CLS_KEY = "_fg_idx", "_bg_idx", "_cls_idx"
MAX_CROP_CENTRES = 100_000  # crop centres kept per case for each of foreground and background


class CaseToTensors:
    """Default "case -> tensors" (picklable, so it works with DataLoader workers).

    ``modalities``: channel order (default: the case's own order). ``label_values``: label values in class
    order (class 1 = ``label_values[0]`` ...); ``None`` means the values already are class indices.
    ``normalize``: ``"zscore"`` (per channel, over the whole volume), ``"none"``, a ``(low, high)`` window
    (clipped, then scaled to 0..1, e.g. a CT window in HU), or a picklable callable on the (C, k, j, i) array.
    """

    def __init__(self, modalities: Sequence[str] | None = None, label_values: Sequence[int] | None = None,
                 normalize="zscore"):
        self.modalities = list(modalities) if modalities is not None else None
        self.label_values = [int(v) for v in label_values] if label_values is not None else None
        self.normalize = normalize
        self.num_classes = len(self.label_values) + 1 if self.label_values is not None else None
        self._lut = None
        if self.label_values is not None:
            lut = np.zeros(max(self.label_values) + 1, dtype=np.int16)
            lut[self.label_values] = np.arange(1, len(self.label_values) + 1)
            self._lut = lut

    def __call__(self, case) -> dict:
        names = self.modalities or list(case.images)
        missing = [m for m in names if m not in case.images]
        if missing:
            raise InputError(f"case '{case.name}' has no modality {missing}")
        image = np.stack([np.asarray(case.images[m].array, dtype=np.float32) for m in names])
        image = self._normalise(image)
        lab = np.asarray(case.label.array)
        if self._lut is not None:
            bad = sorted(set(int(v) for v in np.unique(lab)) - set(self.label_values) - {0})
            if bad:
                raise InputError(f"case '{case.name}': label values {bad} are not among the task's labels "
                                 f"{self.label_values}")
            lab = self._lut[lab]
        lab = lab.astype(np.int16 if lab.max() < 2**15 else np.int32)
        roi = (np.asarray(case.roi.array) > 0).astype(np.uint8) if case.roi is not None \
            else np.ones(lab.shape, np.uint8)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(lab[None]),
                "roi": torch.from_numpy(roi[None])}

    def _normalise(self, image: np.ndarray) -> np.ndarray:
        n = self.normalize
        if callable(n):
            return np.asarray(n(image), dtype=np.float32)
        if n in (None, "none"):
            return image
        if n == "zscore":
            mean = image.reshape(len(image), -1).mean(1)
            std = image.reshape(len(image), -1).std(1)
            std[std < 1e-8] = 1.0
            return (image - mean[:, None, None, None]) / std[:, None, None, None]
        lo, hi = (float(v) for v in n)
        return (np.clip(image, lo, hi) - lo) / max(hi - lo, 1e-8)


def _at_most(idx: np.ndarray, rng) -> np.ndarray:
    """``idx``, or a sorted random subset of ``MAX_CROP_CENTRES`` of them when there are more."""
    if len(idx) > MAX_CROP_CENTRES:
        idx = np.sort(rng.choice(idx, MAX_CROP_CENTRES, replace=False))
    return idx


class RoiCropCentres:
    """Foreground and background crop centres for ``RandCropByPosNegLabeld``, inside the ROI only.

    Foreground = labelled voxels in the ROI; background = unlabelled voxels in the ROI. At most
    ``MAX_CROP_CENTRES`` of each are kept (a random subset, fixed per case), so a 400x400x300 volume never
    needs an index array of every background voxel.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        lab = np.asarray(d["label"][0])
        roi = np.asarray(d["roi"][0]) > 0
        rng = np.random.default_rng(self.seed + lab.size)
        fg = _at_most(np.flatnonzero((lab > 0) & roi), rng)
        flat_lab, flat_roi = lab.reshape(-1), roi.reshape(-1)
        want = MAX_CROP_CENTRES
        if lab.size <= 4 * want:
            bg = np.flatnonzero((flat_lab == 0) & flat_roi)
        else:  # sample candidates instead of listing every background voxel
            cand = np.unique(rng.integers(0, lab.size, 4 * want))
            bg = cand[(flat_lab[cand] == 0) & flat_roi[cand]][:want]
        if len(bg) == 0:
            bg = fg[:1] if len(fg) else np.flatnonzero(flat_roi)[:1]
        if len(fg) == 0:
            fg = bg[:1]
        d[FG_KEY], d[BG_KEY] = fg, bg
        return d


class RoiClassCentres:
    """Deterministic step of the ``classes`` crop: for each class 0..n-1, the flat indices of its voxels inside the
    ROI (at most ``MAX_CROP_CENTRES`` each, a random subset fixed per case), for ``RandCropByLabelClassesd``."""

    def __init__(self, num_classes: int, seed: int = 0):
        self.num_classes, self.seed = int(num_classes), seed

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        lab = np.asarray(d["label"][0]).reshape(-1)
        roi = np.asarray(d["roi"][0]).reshape(-1) > 0
        rng = np.random.default_rng(self.seed + lab.size)
        d[CLS_KEY] = [_at_most(np.flatnonzero((lab == c) & roi), rng) for c in range(self.num_classes)]
        return d


def build_transforms(config, keys=("image", "label", "roi"), num_classes=None):
    """(deterministic part, random part) of the training pipeline (MONAI dictionary transforms). The
    ``classes`` crop (centres drawn class by class, equally often, so small organs are seen as often as large
    ones) needs ``num_classes``."""
    from monai.transforms import (
        Compose,
        DeleteItemsd,
        EnsureTyped,
        RandAffined,
        RandCropByLabelClassesd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropSamplesd,
        SpatialPadd,
    )

    keys = list(keys)
    patch = tuple(int(p) for p in config.patch_size)
    det = [SpatialPadd(keys, spatial_size=patch, mode="constant")]
    if config.crop == "posneg":
        det.append(RoiCropCentres(config.seed))
        pos = float(config.pos_fraction)
        rnd = [RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=pos, neg=1.0 - pos,
                                      num_samples=config.samples_per_case, fg_indices_key=FG_KEY,
                                      bg_indices_key=BG_KEY),
               DeleteItemsd([FG_KEY, BG_KEY])]
    elif config.crop == "classes":
        if not num_classes:
            raise InputError("the classes crop needs the number of classes")
        det.append(RoiClassCentres(num_classes, config.seed))
        rnd = [RandCropByLabelClassesd(keys, label_key="label", spatial_size=patch, num_classes=int(num_classes),
                                       num_samples=config.samples_per_case, indices_key=CLS_KEY, warn=False),
               DeleteItemsd([CLS_KEY])]
    else:
        rnd = [RandSpatialCropSamplesd(keys, roi_size=patch, num_samples=config.samples_per_case, random_size=False)]
    for axis in config.flip_axes:
        rnd.append(RandFlipd(keys, prob=config.flip_prob, spatial_axis=int(axis)))
    if config.rotate90_prob > 0:
        rnd.append(RandRotate90d(keys, prob=config.rotate90_prob, max_k=3,
                                 spatial_axes=tuple(int(a) for a in config.rotate90_axes)))
    if config.affine_prob > 0:
        rad = math.radians(config.rotate_degrees)
        rnd.append(RandAffined(keys, prob=config.affine_prob, rotate_range=(rad, rad, rad),
                               scale_range=(config.scale_range,) * 3, mode=("bilinear", "nearest", "nearest"),
                               padding_mode="zeros"))
    if config.intensity_prob > 0:
        rnd.append(RandScaleIntensityd("image", factors=config.intensity_scale, prob=config.intensity_prob))
        rnd.append(RandShiftIntensityd("image", offsets=config.intensity_shift, prob=config.intensity_prob))
    if config.noise_prob > 0:
        rnd.append(RandGaussianNoised("image", prob=config.noise_prob, std=config.noise_std))
    rnd.append(EnsureTyped(keys, track_meta=False))
    return Compose(det), Compose(rnd)


class CaseDataset(torch.utils.data.Dataset):
    """Reads a case when indexed (``case.load()`` -> ``to_sample`` -> deterministic transforms), keeps at most
    ``cache`` prepared cases (least recently used out), then applies the random transforms. An item is a
    list of ``samples_per_case`` patch dicts (MONAI's ``list_data_collate`` flattens them into the batch)."""

    def __init__(self, cases, to_sample: Callable, deterministic=None, random=None, cache: int = 0,
                 length: int | None = None, num_classes: int | None = None):
        self.cases = list(cases)
        self.num_classes = num_classes
        self.to_sample = to_sample
        self.deterministic = deterministic
        self.random = random
        self.cache_size = int(cache)
        self._cache: OrderedDict = OrderedDict()
        self.length = max(int(length or 0), len(self.cases))

    def __len__(self) -> int:
        return self.length

    def set_random_state(self, seed=None, state=None):
        """Called by MONAI's DataLoader (and its worker_init_fn) to seed the random transforms."""
        if self.random is not None:
            self.random.set_random_state(seed=seed, state=state)
        return self

    def prepared(self, index: int) -> dict:
        index = index % len(self.cases)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        case = self.cases[index]
        d = self.to_sample(case.load())
        if self.num_classes is not None:
            top = int(d["label"].max())
            if top >= self.num_classes or int(d["label"].min()) < 0:
                raise InputError(f"case '{case.name}': class index {top} is outside 0..{self.num_classes - 1} "
                                 "(is the label map right?)")
        if self.deterministic is not None:
            d = self.deterministic(d)
        if self.cache_size > 0:
            self._cache[index] = d
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return d

    def __getitem__(self, index: int):
        d = dict(self.prepared(index))
        return self.random(d) if self.random is not None else d
