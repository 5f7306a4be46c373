"""Cone-beam geometry: one object, saved as JSON beside the projections.

Frame: millimetres, centred on the reconstruction volume, axes along the volume's i, j, k axes. The source turns
about the k axis: at angle a it sits at ``dso * (cos a, sin a, 0)``; the flat detector is ``dsd`` from the source,
its u axis ``(-sin a, cos a, 0)`` and its v axis ``k``. Projections are arrays (view, row, column): rows along v,
columns along u. Detector offsets shift the detector centre along u and v. The volume grid (size, spacing, origin,
direction) is part of the geometry, so a reconstruction lands on the grid of the CT it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import Image

FIELDS = ("dsd", "dso", "detector_shape", "detector_spacing", "detector_offset", "angles_deg", "volume")
VOLUME_FIELDS = ("size", "spacing", "origin", "direction")


@dataclass
class ConeGeometry:
    dsd: float  # source-detector distance, mm
    dso: float  # source-isocentre distance, mm
    detector_shape: tuple  # (rows, columns)
    detector_spacing: tuple  # (u, v) pixel size, mm
    detector_offset: tuple  # (u, v) detector centre shift, mm
    angles_deg: list
    volume_size: tuple  # (i, j, k) voxels
    volume_spacing: tuple  # (i, j, k) mm
    volume_origin: tuple = (0.0, 0.0, 0.0)  # LPS of voxel (0, 0, 0)
    volume_direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        self.detector_shape = tuple(int(v) for v in self.detector_shape)
        self.detector_spacing = tuple(float(v) for v in self.detector_spacing)
        self.detector_offset = tuple(float(v) for v in self.detector_offset)
        self.angles_deg = [float(a) for a in self.angles_deg]
        self.volume_size = tuple(int(v) for v in self.volume_size)
        self.volume_spacing = tuple(float(v) for v in self.volume_spacing)
        self.volume_origin = tuple(float(v) for v in self.volume_origin)
        self.volume_direction = np.asarray(self.volume_direction, float).reshape(3, 3)
        self.dsd, self.dso = float(self.dsd), float(self.dso)

    # ------------------------------------------------------------------ derived
    @property
    def n_views(self) -> int:
        return len(self.angles_deg)

    @property
    def angles(self) -> np.ndarray:
        return np.deg2rad(np.asarray(self.angles_deg, float))

    @property
    def half_extent(self) -> np.ndarray:
        """Frame position (mm) of the last voxel centre along i, j, k (the first is its negative)."""
        return (np.asarray(self.volume_size) - 1) * np.asarray(self.volume_spacing) / 2.0

    def grid_image(self, array=None) -> Image:
        """An Image on the volume grid (zeros unless ``array`` (k, j, i) is given)."""
        shape = tuple(reversed(self.volume_size))
        arr = np.zeros(shape, np.float32) if array is None else array
        return Image(arr, self.volume_spacing, self.volume_origin, self.volume_direction.copy())

    def frame_to_lps(self, pts: np.ndarray) -> np.ndarray:
        idx = (np.asarray(pts, float) + self.half_extent) / np.asarray(self.volume_spacing)
        return idx @ (self.volume_direction @ np.diag(self.volume_spacing)).T + np.asarray(self.volume_origin)

    def lps_to_frame(self, lps: np.ndarray) -> np.ndarray:
        m = self.volume_direction @ np.diag(self.volume_spacing)
        idx = np.linalg.solve(m, (np.asarray(lps, float) - np.asarray(self.volume_origin)).T).T
        return idx * np.asarray(self.volume_spacing) - self.half_extent

    def project(self, pts: np.ndarray) -> np.ndarray:
        """Detector (column, row) pixel coordinates of frame points (N, 3) in every view: (views, N, 2)."""
        pts = np.asarray(pts, float)
        out = []
        for a in self.angles:
            e = np.array([math.cos(a), math.sin(a), 0.0])
            uax = np.array([-math.sin(a), math.cos(a), 0.0])
            depth = self.dso - pts @ e
            u = self.dsd * (pts @ uax) / depth
            v = self.dsd * pts[:, 2] / depth
            out.append(np.stack([self.u_to_col(u), self.v_to_row(v)], -1))
        return np.stack(out)

    def u_to_col(self, u):
        return (u - self.detector_offset[0]) / self.detector_spacing[0] + (self.detector_shape[1] - 1) / 2.0

    def v_to_row(self, v):
        return (v - self.detector_offset[1]) / self.detector_spacing[1] + (self.detector_shape[0] - 1) / 2.0

    def detector_uv(self) -> tuple:
        """u of each column and v of each row (mm on the detector)."""
        nv, nu = self.detector_shape
        u = (np.arange(nu) - (nu - 1) / 2.0) * self.detector_spacing[0] + self.detector_offset[0]
        v = (np.arange(nv) - (nv - 1) / 2.0) * self.detector_spacing[1] + self.detector_offset[1]
        return u, v

    # ------------------------------------------------------------------ checks and JSON
    def check(self) -> ConeGeometry:
        """Refuse a geometry no reconstruction can use; the message names the problem."""
        for name in ("dsd", "dso"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise InputError(f"geometry: {name} must be a positive distance in mm, got {getattr(self, name)}")
        if self.dsd <= self.dso:
            raise InputError(f"geometry: the source-detector distance ({self.dsd} mm) must exceed the "
                             f"source-isocentre distance ({self.dso} mm)")
        if len(self.detector_shape) != 2 or min(self.detector_shape) < 2:
            raise InputError(f"geometry: detector_shape must be (rows, columns) of 2 or more, got {self.detector_shape}")
        if len(self.detector_spacing) != 2 or min(self.detector_spacing) <= 0:
            raise InputError(f"geometry: detector_spacing must be two positive sizes, got {self.detector_spacing}")
        if len(self.detector_offset) != 2:
            raise InputError(f"geometry: detector_offset must be (u, v), got {self.detector_offset}")
        if self.n_views < 2:
            raise InputError(f"geometry: at least 2 projection angles are needed, got {self.n_views}")
        if len(self.volume_size) != 3 or min(self.volume_size) < 2:
            raise InputError(f"geometry: volume size must be 3 sizes of 2 or more, got {self.volume_size}")
        if len(self.volume_spacing) != 3 or min(self.volume_spacing) <= 0:
            raise InputError(f"geometry: volume spacing must be 3 positive sizes, got {self.volume_spacing}")
        d = self.volume_direction
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise InputError("geometry: the volume direction is not a rotation (its columns must be orthonormal)")
        h = np.asarray(self.volume_size) * np.asarray(self.volume_spacing) / 2.0
        for a in self.angles:
            s = self.dso * np.array([math.cos(a), math.sin(a)])
            if abs(s[0]) <= h[0] and abs(s[1]) <= h[1]:
                raise InputError(f"geometry: the source at {math.degrees(a):.1f} deg is inside the volume "
                                 f"(source-isocentre distance {self.dso} mm, volume half-size {h[0]:.1f} x "
                                 f"{h[1]:.1f} mm): increase dso or shrink the volume")
        return self

    def to_dict(self) -> dict:
        return {"dsd": self.dsd, "dso": self.dso, "detector_shape": list(self.detector_shape),
                "detector_spacing": list(self.detector_spacing), "detector_offset": list(self.detector_offset),
                "angles_deg": list(self.angles_deg),
                "volume": {"size": list(self.volume_size), "spacing": list(self.volume_spacing),
                           "origin": list(self.volume_origin), "direction": self.volume_direction.tolist()}}

    @classmethod
    def from_dict(cls, d: dict, where: str = "geometry") -> ConeGeometry:
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected a JSON object with {', '.join(FIELDS)}")
        missing = [f for f in FIELDS if f not in d]
        vol = d.get("volume")
        if isinstance(vol, dict):
            missing += [f"volume.{f}" for f in VOLUME_FIELDS if f not in vol]
        if missing:
            raise InputError(f"{where} is missing the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        if not isinstance(vol, dict):
            raise InputError(f"{where}: 'volume' must be an object with {', '.join(VOLUME_FIELDS)}")
        try:
            return cls(d["dsd"], d["dso"], d["detector_shape"], d["detector_spacing"], d["detector_offset"],
                       d["angles_deg"], vol["size"], vol["spacing"], vol["origin"], vol["direction"]).check()
        except (TypeError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{where}: a field has the wrong type or length ({e})") from e

    def save(self, path) -> Path:
        from ..files import atomic_file

        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> ConeGeometry:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"geometry file {path} does not exist")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the geometry {path}: not JSON ({e})") from e
        return cls.from_dict(d, where=f"geometry {path.name}")


def full_circle(angles_deg) -> bool:
    """True when the views are equally spaced over 360 deg (the layout the shipped weights learnt)."""
    a = np.sort(np.mod(np.asarray(angles_deg, float), 360.0))
    steps = np.diff(np.append(a, a[0] + 360.0))
    return len(a) > 1 and bool(np.all(np.abs(steps - 360.0 / len(a)) < 0.5))


def circular_angles(n_views: int, arc_deg: float = 360.0) -> list:
    """``n_views`` angles over a full circle (end excluded) or a shorter arc (both ends included)."""
    if arc_deg >= 360.0:
        return [360.0 * i / n_views for i in range(n_views)]
    return [arc_deg * i / max(1, n_views - 1) for i in range(n_views)]


def geometry_for_grid(grid: Image, n_views: int, detector: int = 128, arc_deg: float = 360.0,
                      dso_factor: float = 2.0, dsd_factor: float = 1.5) -> ConeGeometry:
    """A CBCT geometry around the grid of ``grid``: dso = ``dso_factor`` x the largest extent, dsd =
    ``dsd_factor`` x dso, a square ``detector`` x ``detector`` panel that sees the whole volume at every angle."""
    size = np.asarray(grid.size, float)
    sp = np.asarray(grid.spacing, float)
    h = size * sp / 2.0
    dso = dso_factor * float(np.max(size * sp))
    dsd = dsd_factor * dso
    r = float(np.hypot(h[0], h[1]))
    half_u = dsd * r / math.sqrt(dso ** 2 - r ** 2)
    half_v = dsd * h[2] / (dso - r)
    pix = 2.04 * max(half_u, half_v) / detector
    return ConeGeometry(dsd, dso, (detector, detector), (pix, pix), (0.0, 0.0), circular_angles(n_views, arc_deg),
                        grid.size, grid.spacing, grid.origin, grid.direction).check()
