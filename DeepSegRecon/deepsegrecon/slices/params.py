"""Segment Slices' parameters, typed (:mod:`deepsegrecon.params`).
No torch here: a host checks a job's parameters with them before it starts the job."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import Params


@dataclass
class SliceParams(Params):
    labels: str | None = None  # label set file (default: the model's classes)
    batch: int = 16  # slices per network pass
    postprocess: bool = True  # largest component per organ
    window: list | None = None  # [low, high] HU (default: the model's)
