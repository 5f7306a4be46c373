"""Label maps: which label value means which structure (``{name: value}``), from a dict or a file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import InputError


def read_label_map(source) -> dict | None:
    """A label map as ``{name: value}`` (values are positive integers, names and values unique).

    ``source`` is ``None``, a dict (``{name: value}`` or ``{value: name}``), or a file:
    ``.json`` (either dict form, or a list of ``{"name", "value"}``), ``.csv`` / ``.tsv`` (two columns, value and
    name in either order, header optional) or a Slicer colour table (``.ctbl`` / ``.txt``:
    ``value name r g b a`` lines, ``#`` comments). A ``0`` entry (the background) is ignored.
    """
    if source is None:
        return None
    if isinstance(source, dict):
        return _normalise_map(source, "the label map")
    path = Path(source)
    if not path.is_file():
        raise InputError(f"label map file {path} does not exist")
    what = f"label map {path.name}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what}: {e}") from e
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{what} is not valid JSON: {e}") from e
        if isinstance(data, list):
            try:
                data = {str(d["name"]): d["value"] for d in data}
            except (TypeError, KeyError) as e:
                raise InputError(f"{what}: a list must hold objects with 'name' and 'value'") from e
        if not isinstance(data, dict):
            raise InputError(f"{what} must hold an object mapping names to values")
        return _normalise_map(data, what)
    rows = []
    if suffix in (".csv", ".tsv"):
        dialect = "excel-tab" if suffix == ".tsv" else "excel"
        rows = [r for r in csv.reader(text.splitlines(), dialect) if any(c.strip() for c in r)]
    else:  # Slicer colour table / plain text: "value name [r g b a]"
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append(line.split())
    pairs = {}
    for n, row in enumerate(rows):
        cells = [c.strip() for c in row]
        if len(cells) < 2:
            raise InputError(f"{what}, line {n + 1}: expected a value and a name, got {row}")
        a, b = cells[0], cells[1]
        if _is_int(a) and not _is_int(b):
            pairs[b] = int(a)
        elif _is_int(b) and not _is_int(a):
            pairs[a] = int(b)
        elif n == 0:
            continue  # a header row
        else:
            raise InputError(f"{what}, line {n + 1}: cannot tell the value from the name in {row}")
    return _normalise_map(pairs, what)


def _is_int(s) -> bool:
    try:
        int(str(s).strip())
        return True
    except ValueError:
        return False


def _normalise_map(data: dict, what: str) -> dict:
    out = {}
    for k, v in data.items():
        if _is_int(k) and not _is_int(v) and not isinstance(v, (int, np.integer)):
            k, v = v, k  # {value: name}
        if isinstance(v, bool) or not _is_int(v):
            raise InputError(f"{what}: the value of '{k}' must be an integer, got {v!r}")
        name, value = str(k), int(v)
        if value < 0:
            raise InputError(f"{what}: label values must be positive, '{name}' has {value}")
        if value == 0:
            continue
        if name in out:
            raise InputError(f"{what}: the name '{name}' is given twice")
        out[name] = value
    values = list(out.values())
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise InputError(f"{what}: label values {dup} are given to more than one name")
    if not out:
        raise InputError(f"{what} names no labels")
    return out
