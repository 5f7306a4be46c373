"""Teeth label conventions: FDI numbers, segment names, colours and Slicer terminology.

Label values on the labelmap: tooth = its FDI number (11..18, 21..28, 31..38, 41..48),
maxilla = 1, mandible = 2, background = 0. Segment names: ``tooth_<FDI>``, ``maxilla``, ``mandible``.

FDI quadrants follow the patient's sides: 1 upper right, 2 upper left, 3 lower left, 4 lower right.
Position 1 (central incisor) .. 8 (third molar) counts from the midline backwards.
"""

from __future__ import annotations

import colorsys

from ..results import SegmentInfo

MAXILLA = 1
MANDIBLE = 2
QUADRANTS = (1, 2, 3, 4)
POSITIONS = tuple(range(1, 9))
FDI = tuple(q * 10 + p for q in QUADRANTS for p in POSITIONS)
UPPER_QUADRANTS = (1, 2)
RIGHT_QUADRANTS = (1, 4)  # the patient's right

TOOTH_TYPES = {1: "central incisor", 2: "lateral incisor", 3: "canine", 4: "first premolar",
               5: "second premolar", 6: "first molar", 7: "second molar", 8: "third molar"}

# Typical mesiodistal crown widths (mm) by position 1..8 (textbook averages), used by the numbering
# as the expected spacing of neighbouring teeth along the arch.
MESIODISTAL_MM = {"upper": (8.6, 6.6, 7.6, 7.0, 6.6, 10.2, 9.2, 8.6),
                  "lower": (5.2, 5.8, 7.0, 7.0, 7.2, 11.2, 10.6, 10.2)}

# Typical tooth volumes (mm3, crown and roots) by position 1..8, for telling merged teeth apart.
TYPICAL_VOLUME_MM3 = {"upper": (560, 360, 620, 540, 540, 840, 690, 560),
                      "lower": (260, 340, 590, 480, 510, 910, 770, 680)}

# Stage-2 network classes: 0 background, 1..8 upper positions 1..8, 9..16 lower positions 1..8.
N_STAGE2 = 17
# Stage-1 network classes: 0 background, 1 maxilla, 2 mandible, 3 teeth.
N_STAGE1 = 4
STAGE1_TEETH = 3

_CONTEXT = "Segmentation category and type - DICOM master list"
_ANATOMIC = "Anatomic codes - DICOM master list"
_ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
_TISSUE = "SCT^85756007^Tissue"
_RIGHT = "SCT^24028007^Right"
_LEFT = "SCT^7771000^Left"


def quadrant(fdi: int) -> int:
    return int(fdi) // 10


def position(fdi: int) -> int:
    return int(fdi) % 10


def is_upper(fdi: int) -> bool:
    return quadrant(fdi) in UPPER_QUADRANTS


def is_right(fdi: int) -> bool:
    return quadrant(fdi) in RIGHT_QUADRANTS


def fdi_from(upper: bool, right: bool, pos: int) -> int:
    q = (1 if right else 2) if upper else (4 if right else 3)
    return q * 10 + int(pos)


def stage2_class(fdi: int) -> int:
    """Network class of a tooth: jaw and position, not side (the classes are left/right symmetric)."""
    return position(fdi) + (0 if is_upper(fdi) else 8)


def segment_name(label: int) -> str:
    if label == MAXILLA:
        return "maxilla"
    if label == MANDIBLE:
        return "mandible"
    if label in FDI:
        return f"tooth_{label}"
    raise ValueError(f"{label} is not a teeth-task label")


def label_of(name: str) -> int:
    if name == "maxilla":
        return MAXILLA
    if name == "mandible":
        return MANDIBLE
    if name.startswith("tooth_") and name[6:].isdigit() and int(name[6:]) in FDI:
        return int(name[6:])
    raise ValueError(f"'{name}' is not a teeth-task segment name")


def describe(label: int) -> str:
    """Human-readable name, e.g. 'upper right first molar (FDI 16)'."""
    if label in (MAXILLA, MANDIBLE):
        return segment_name(label)
    jaw = "upper" if is_upper(label) else "lower"
    side = "right" if is_right(label) else "left"
    return f"{jaw} {side} {TOOTH_TYPES[position(label)]} (FDI {label})"


def color(label: int) -> tuple:
    """Distinct colours: hue walks around the arch, lightness separates quadrants."""
    if label == MAXILLA:
        return (0.87, 0.78, 0.62)
    if label == MANDIBLE:
        return (0.76, 0.69, 0.56)
    q, p = quadrant(label), position(label)
    hue = ((p - 1) / 8.0 + (q - 1) * 0.03) % 1.0
    light = (0.62, 0.48, 0.62, 0.48)[q - 1]
    sat = (0.85, 0.75, 0.6, 0.9)[q - 1]
    return tuple(round(c, 4) for c in colorsys.hls_to_rgb(hue, light, sat))


def terminology(label: int) -> str:
    """Slicer terminology entry (category~type~modifier~anatomic context~region~region modifier)."""
    if label == MAXILLA:
        typ, mod = "SCT^70925003^Maxilla", "^^"
        cat = _ANATOMICAL_STRUCTURE
    elif label == MANDIBLE:
        typ, mod = "SCT^91609006^Mandible", "^^"
        cat = _ANATOMICAL_STRUCTURE
    else:
        cat = _ANATOMICAL_STRUCTURE
        typ = "SCT^38199008^Tooth"
        mod = _RIGHT if is_right(label) else _LEFT
    return f"{_CONTEXT}~{cat}~{typ}~{mod}~{_ANATOMIC}~^^~^^"


def segment_info(label: int) -> SegmentInfo:
    return SegmentInfo(segment_name(label), int(label), color(label), terminology(label))


def segment_infos(present) -> list:
    """SegmentInfo for each label in ``present`` (bones first, then teeth in FDI order)."""
    present = {int(v) for v in present}
    order = [MAXILLA, MANDIBLE] + list(FDI)
    return [segment_info(v) for v in order if v in present]


def all_labels() -> dict:
    """{label value: segment name} for every label the task can produce."""
    return {v: segment_name(v) for v in [MAXILLA, MANDIBLE] + list(FDI)}
