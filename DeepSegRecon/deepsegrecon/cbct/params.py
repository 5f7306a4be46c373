"""Reconstruct CBCT's parameters, typed (:mod:`deepsegrecon.params`).
No torch here: a host checks a job's parameters with them before it starts the job."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import Params


@dataclass
class ReconParams(Params):
    geometry: dict | None = None  # cone-beam geometry (ConeGeometry.to_dict) of given projections
    views: int | None = None  # views to simulate from a CT
    detector: int = 128  # detector pixels per side (simulation)
    arc_deg: float = 360.0
    noise: bool = True  # Poisson + electronic noise on simulated projections
    photons: float = 1e5
    electronic_sd: float = 10.0
    seed: int = 0
    filter: str = "hann"  # FDK ramp filter window
    query_res: int | None = 64  # DIF-Gaussian query grid
    refine_iters: int | None = None  # data-consistency iterations (None: the recommended count)
    keep_projections: bool = False
    method: str | None = None  # the method whose volume is the result (None: the backend's default)
    compare: list | None = None  # methods to run beside it (None: all)
    backend: str = "auto"  # auto | rtk | torch
