"""Segment Teeth's parameters, typed (:mod:`deepsegrecon.params`).
No torch here: a host checks a job's parameters with them before it starts the job."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import Params


@dataclass
class TeethParams(Params):
    amp: bool = True  # mixed precision on CUDA
    tta: bool = True  # test-time augmentation (mirrored passes)
