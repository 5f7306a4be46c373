"""Typed task parameters: each task declares a :class:`Params` dataclass (a field per parameter: its type and
default), checked once where a run starts (:func:`deepsegrecon.runner.run_inline`).

``TeethParams.parse({"device": "cpu", "tta": False}, "teeth")`` refuses an unknown key or a value of the wrong type
with an :class:`~deepsegrecon.errors.InputError` naming the key, the type it needs and the allowed keys. Tasks read
attributes (``p.device``); a Params also reads like a dict (``p.get("device")``, ``{**p}``) for code that takes
plain dicts, and ``to_dict()`` is what goes into JSON (job files, batch keys, reports).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .errors import InputError

_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a text", list: "a list",
          dict: "a mapping (JSON object)", type(None): "null"}


@dataclass
class Params:
    """Base of every task's parameters: the device and the model version all weight-using tasks share."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    model: str | None = None  # model version (None: the task's choice, else the store's default)

    @classmethod
    def parse(cls, values=None, task: str = "") -> Params:
        """``values`` (a dict or Params; missing keys take the defaults) checked and converted."""
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        out = {}
        for key, value in values.items():
            if key not in hints:
                raise InputError(f"{task or cls.__name__} has no parameter '{key}'; its parameters are: "
                                 f"{', '.join(names)}")
            ok, fixed = _convert(value, hints[key])
            if not ok:
                raise InputError(f"{task or cls.__name__}: parameter '{key}' must be {_describe(hints[key])}, "
                                 f"got {value!r}")
            out[key] = fixed
        return cls(**out).check(task)

    def check(self, task: str = "") -> Params:
        """Refuse values of the right type that no run can use (subclasses add their own checks)."""
        from .device import CHOICES

        dev = str(self.device).lower()
        if not (dev in CHOICES or dev.startswith("cuda:")):
            raise InputError(f"unknown device '{self.device}'; choose one of {', '.join(CHOICES)} or cuda:N")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    # dict-like reading, for code that takes plain dicts
    def keys(self):
        return [f.name for f in fields(self)]

    def __getitem__(self, key):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key, value):
        setattr(self, key, type(self).parse({key: value}).__dict__[key])

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def get(self, key, default=None):
        return getattr(self, key, default) if key in self.keys() else default


def _members(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (typing.get_origin(hint) or hint,)


def _describe(hint) -> str:
    return " or ".join(_WORDS.get(t, getattr(t, "__name__", str(t))) for t in _members(hint))


def _convert(value, hint) -> tuple:
    """(True, value as the hint's type) or (False, value)."""
    for t in _members(hint):
        if t is typing.Any or t is object:
            return True, value
        if t is type(None) and value is None:
            return True, None
        if t is bool and isinstance(value, (bool, np.bool_)):
            return True, bool(value)
        if isinstance(value, (bool, np.bool_)):
            continue
        if t is int and isinstance(value, (int, np.integer)):
            return True, int(value)
        if t is int and isinstance(value, (float, np.floating)) and float(value).is_integer():
            return True, int(value)
        if t is float and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value):
            return True, float(value)
        if t is str and isinstance(value, (str, Path)):
            return True, str(value)
        if t is list and isinstance(value, (list, tuple)):
            return True, list(value)
        if t is dict and isinstance(value, dict):
            return True, value
    return False, value
