"""Brain tumour label conventions, conversions, names, colours and Slicer terminology.

Internal labelmap (the task's result): BraTS 2023 values, 1 necrosis / non-enhancing core (NCR),
2 peritumoral oedema (ED), 3 enhancing tumour (ET). BraTS 2015-2021 use 4 for ET (1 and 2 the same).
Nested regions (what BraTS scores and the network predicts): ET = {ET}, TC = {NCR, ET}, WT = {NCR, ED, ET}.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..results import SegmentInfo

NCR, ED, ET = 1, 2, 3
CONVENTIONS = {"brats2023": {"NCR": 1, "ED": 2, "ET": 3}, "brats2021": {"NCR": 1, "ED": 2, "ET": 4}}
REGION_NAMES = ("enhancing_tumor", "tumor_core", "whole_tumor")  # channel order of the network: ET, TC, WT
SUBREGION_NAMES = {NCR: "necrotic_core", ED: "edema", ET: "enhancing_tumor"}

# BraTS display colours (as in the BraTS viewer / Slicer's Generic Anatomy colours), RGB 0..1
COLORS = {"necrotic_core": (1.0, 0.0, 0.0), "edema": (0.0, 1.0, 0.0), "enhancing_tumor": (1.0, 1.0, 0.0),
          "tumor_core": (1.0, 0.0, 0.0), "whole_tumor": (0.0, 1.0, 0.0)}

_CAT = "Segmentation category and type - DICOM master list"
_NEO = "SCT^49755003^Morphologically Altered Structure"
TERMS = {
    "necrotic_core": f"{_CAT}~{_NEO}~SCT^6574001^Necrosis~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^",
    "edema": f"{_CAT}~{_NEO}~SCT^79654002^Edema~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^",
    "enhancing_tumor": f"{_CAT}~{_NEO}~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~"
                       "SCT^12738006^Brain~^^",
    "tumor_core": f"{_CAT}~{_NEO}~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^",
    "whole_tumor": f"{_CAT}~{_NEO}~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~"
                   "SCT^12738006^Brain~^^",
}


def convert(labels: np.ndarray, src: str = "brats2021", dst: str = "brats2023") -> np.ndarray:
    """Relabel between BraTS conventions; unknown values are refused."""
    for c in (src, dst):
        if c not in CONVENTIONS:
            raise InputError(f"unknown label convention '{c}'; known: {', '.join(CONVENTIONS)}")
    a = np.asarray(labels)
    allowed = {0, *CONVENTIONS[src].values()}
    bad = sorted(set(np.unique(a).tolist()) - allowed)
    if bad:
        raise InputError(f"label values {bad} are not {src} labels ({sorted(allowed)})")
    out = np.zeros(a.shape, np.uint8)
    for name, v in CONVENTIONS[src].items():
        out[a == v] = CONVENTIONS[dst][name]
    return out


def detect_convention(labels: np.ndarray) -> str:
    """brats2021 if the labelmap uses 4, brats2023 if it uses 3 (neither: brats2023); both: refused."""
    vals = set(np.unique(np.asarray(labels)).tolist())
    bad = sorted(vals - {0, 1, 2, 3, 4})
    if bad:
        raise InputError(f"label values {bad} are not BraTS labels (0 background, 1 necrosis, 2 oedema, "
                         "3 or 4 enhancing tumour)")
    if 3 in vals and 4 in vals:
        raise InputError("the labelmap has both 3 and 4: mixed BraTS 2023 and 2015-2021 conventions")
    return "brats2021" if 4 in vals else "brats2023"


def to_regions(labels: np.ndarray) -> np.ndarray:
    """(3, ...) bool ET, TC, WT from a BraTS 2023 labelmap."""
    a = np.asarray(labels)
    return np.stack([a == ET, (a == ET) | (a == NCR), a > 0])


def from_regions(et: np.ndarray, tc: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """BraTS 2023 labelmap from the three nested masks (nesting enforced: ET within TC within WT)."""
    wt = np.asarray(wt, bool)
    tc = np.asarray(tc, bool) & wt
    et = np.asarray(et, bool) & tc
    out = np.zeros(wt.shape, np.uint8)
    out[wt] = ED
    out[tc] = NCR
    out[et] = ET
    return out


def regions_to_label(seg_name: str, names: list, known: dict, read_mask):
    """Training-set hook of the brain-tumor task (declared in the package's ``CAPABILITY``).

    When the segments ``names`` of ``seg_name`` are the overlapping ET / TC / WT regions (the Segment Brain Tumour
    output) and the model's labels ``known`` ({name: value}) the BraTS sub-regions: (uint8 label array with the
    model's values, {name: value} present); else None. ``read_mask(name)``: that segment as a bool array on the
    volume's grid."""
    if set(names) != set(REGION_NAMES) or set(known) != set(SUBREGION_NAMES.values()):
        return None
    masks = {name: read_mask(name) for name in names}
    if not masks["whole_tumor"].any():
        raise InputError(f"the segment whole_tumor of '{seg_name}' is empty on the volume's grid")
    brats = from_regions(*(masks[n] for n in REGION_NAMES))  # BraTS 2023 values
    lut = np.zeros(256, np.uint8)
    for value, name in SUBREGION_NAMES.items():
        lut[value] = known[name]
    present = {SUBREGION_NAMES[v]: int(known[SUBREGION_NAMES[v]]) for v in np.unique(brats) if v}
    return lut[brats], present


def subregion_infos(present=(NCR, ED, ET), convention: str = "brats2023") -> list:
    values = CONVENTIONS[convention]
    by_internal = {NCR: values["NCR"], ED: values["ED"], ET: values["ET"]}
    return [SegmentInfo(SUBREGION_NAMES[v], by_internal[v], COLORS[SUBREGION_NAMES[v]], TERMS[SUBREGION_NAMES[v]])
            for v in (NCR, ED, ET) if v in present]


def region_infos() -> list:
    """The three nested segments (each in its own layer of a .seg.nrrd, label value 1)."""
    return [SegmentInfo(n, 1, COLORS[n], TERMS[n]) for n in REGION_NAMES]


def region_volumes_ml(labels: np.ndarray, spacing) -> dict:
    vox_ml = float(np.prod(spacing)) / 1000.0
    r = to_regions(labels)
    return {name: round(float(r[i].sum()) * vox_ml, 3) for i, name in enumerate(REGION_NAMES)}
