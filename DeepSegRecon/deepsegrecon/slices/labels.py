"""Label sets: small JSON files naming each organ's label value, colour and Slicer terminology.

    {"name": "abdomen", "labels": [{"name": "liver", "value": 5, "color": [r, g, b] (0..1),
      "terminology": "SCT^10200004^Liver~^^" (type~modifier), "totalsegmentator": ["liver"]}, ...]}

Built-in sets live in ``labelsets/`` (``abdomen`` is the default); any other JSON file can be given by path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..results import SegmentInfo

BUILTIN = Path(__file__).parent / "labelsets"
DEFAULT = "abdomen"
_PREFIX = "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
_SUFFIX = "~Anatomic codes - DICOM master list~^^~^^"


@dataclass
class Organ:
    name: str
    value: int
    color: tuple
    terminology: str = ""
    totalsegmentator: tuple = ()

    def info(self) -> SegmentInfo:
        term = f"{_PREFIX}{self.terminology}{_SUFFIX}" if self.terminology else ""
        return SegmentInfo(self.name, self.value, self.color, term)


@dataclass
class LabelSet:
    name: str
    organs: list  # [Organ], in file order

    @property
    def names(self) -> list:
        return [o.name for o in self.organs]

    def by_name(self, name: str) -> Organ:
        for o in self.organs:
            if o.name == name:
                return o
        raise KeyError(name)

    def label_map(self) -> dict:
        return {o.name: o.value for o in self.organs}


def builtin_sets() -> list:
    return sorted(p.stem for p in BUILTIN.glob("*.json"))


def read_label_set(source=None) -> LabelSet:
    """A built-in set by name (default ``abdomen``), a JSON file or its parsed dict; :class:`InputError` names any problem."""
    source = DEFAULT if source is None else source
    if isinstance(source, LabelSet):
        return source
    if isinstance(source, dict):
        return parse_label_set(source)
    path = Path(source).expanduser()
    if not path.suffix and not path.exists():
        path = BUILTIN / f"{source}.json"
        if not path.is_file():
            raise InputError(f"unknown label set '{source}'; built-in sets: {', '.join(builtin_sets())}, "
                             "or give a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read the label set {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise InputError(f"label set {path} is not valid JSON: {e}") from e
    return parse_label_set(data, str(path))


def parse_label_set(data, where: str = "label set") -> LabelSet:
    if not isinstance(data, dict) or not isinstance(data.get("labels"), list) or not data["labels"]:
        raise InputError(f"{where}: needs a non-empty 'labels' list")
    organs, seen_v, seen_n = [], {}, set()
    for n, item in enumerate(data["labels"]):
        if not isinstance(item, dict) or "name" not in item or "value" not in item:
            raise InputError(f"{where}: label {n + 1} needs a 'name' and a 'value'")
        name, value = str(item["name"]).strip(), item["value"]
        if not name:
            raise InputError(f"{where}: label {n + 1} has an empty name")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise InputError(f"{where}: '{name}' has value {value!r}; label values are whole numbers 1..255")
        if value in seen_v:
            raise InputError(f"{where}: value {value} is used twice ('{seen_v[value]}' and '{name}'); "
                             "each organ needs its own value")
        if name in seen_n:
            raise InputError(f"{where}: the name '{name}' is used twice")
        color = item.get("color", (0.8, 0.8, 0.2))
        if not (isinstance(color, (list, tuple)) and len(color) == 3
                and all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in color)):
            raise InputError(f"{where}: '{name}' colour must be three numbers 0..1, got {color!r}")
        seen_v[value] = name
        seen_n.add(name)
        ts = item.get("totalsegmentator", [name])
        organs.append(Organ(name, int(value), tuple(float(c) for c in color), str(item.get("terminology", "")),
                            tuple(str(t) for t in (ts if isinstance(ts, list) else [ts]))))
    return LabelSet(str(data.get("name", "custom")), organs)
