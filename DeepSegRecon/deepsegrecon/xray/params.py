"""Register X-ray's and the DRR's parameters, typed (:mod:`deepsegrecon.params`).
No torch here: a host checks a job's parameters with them before it starts the job."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..params import Params


@dataclass
class CarmParams(Params):
    """The C-arm (see :func:`.task.carm_from_params`); a radiograph's file usually gives them."""

    device: str = "cpu"
    sdd: float | None = None  # source-to-detector distance, mm
    pixel_spacing: list | None = None  # [x, y] mm (default: the image's own)
    x0: float = 0.0  # principal point offset, mm
    y0: float = 0.0
    sid: float | None = None  # source-to-isocentre distance, mm
    view: str = "AP"
    bone_attenuation: float = 1.0


@dataclass
class RegisterParams(CarmParams):
    values: str = "auto"  # auto | intensity | attenuation (what the radiograph's pixels are)
    photometric: str | None = None  # DICOM PhotometricInterpretation (MONOCHROME1: bright air)
    crop: str = "auto"  # collimator crop: auto | on | off
    xray_plane: dict | None = None  # {"origin", "direction"} of the radiograph in LPS
    size: int = 128  # registration image size
    ct_spacing_mm: float = 3.0
    train_minutes: float = 10.0  # train the patient's regressor this long when the store has none
    train_steps: int | None = None  # or this many steps
    parameterization: str = "se3_log_map"
    convention: str | None = None
    levels: list | None = None  # [[size, iterations], ...] of the refinement
    landmarks: list | None = None  # CT points (LPS mm) for mTRE
    init_pose: dict | str | None = None  # a start pose (pose JSON)
    truth_pose: dict | str | None = None  # the true pose, to report errors


@dataclass
class DrrParams(CarmParams):
    sdd: float | None = 1020.0
    pixel_spacing: list | None = field(default_factory=lambda: [400 / 128] * 2)
    height: int = 128
    width: int = 128
    ct_spacing_mm: float = 0.0  # resample the CT first (0: as it is)
    pose: dict | str | None = None  # the pose JSON (required)
