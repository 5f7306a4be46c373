"""C-arm geometry, poses and frames.

Frames (all in mm):
- *CT LPS*: the CT's physical space.
- *DiffDRR world*: the CT's RAS space moved so that the CT centre is at the origin (``diffdrr.data.read``).
- *camera*: the source at the origin, the detector plane at ``z = sdd`` (``diffdrr.detector``).
- *X-ray frame*: the LPS space in which the radiograph (a one-slice volume) lies; the result transform maps
  CT LPS into it.

A pose is DiffDRR's camera-to-world transform, ``convert(rotation, translation, parameterization=...)``;
the start pose ("isocentre") is rotation 0 and translation ``(0, sid, 0)`` (source in front of the patient,
AP view; ``view="PA"`` turns it by 180 degrees about the patient's long axis).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

PARAMETERIZATIONS = ("se3_log_map", "euler_angles", "axis_angle", "quaternion", "rotation_6d", "rotation_9d",
                     "rotation_10d", "quaternion_adjugate", "matrix")
ROT_SIZE = {"se3_log_map": 3, "euler_angles": 3, "axis_angle": 3, "quaternion": 4, "rotation_6d": 6,
            "rotation_9d": 9, "rotation_10d": 10, "quaternion_adjugate": 10, "matrix": 9}
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS
SID_RATIO = 850.0 / 1020.0  # source-isocentre / source-detector when no distance is known (DiffDRR's examples)


@dataclass
class Carm:
    """Intrinsics of the imaging system: ``delx``/``dely`` pixel size (mm), ``x0``/``y0`` principal point
    offsets (mm), ``sid`` source-to-isocentre distance (mm), ``view`` AP or PA."""

    sdd: float
    height: int
    width: int
    delx: float
    dely: float
    x0: float = 0.0
    y0: float = 0.0
    sid: float = None
    view: str = "AP"

    def __post_init__(self):
        for name in ("sdd", "delx", "dely"):
            v = getattr(self, name)
            if v is None or not np.isfinite(float(v)) or float(v) <= 0:
                raise InputError(f"C-arm {_NAMES[name]} must be a positive number of mm, got {v}")
        if int(self.height) < 8 or int(self.width) < 8:
            raise InputError(f"the X-ray needs at least 8 x 8 pixels, got {self.width} x {self.height}")
        self.height, self.width = int(self.height), int(self.width)
        self.sid = float(self.sid) if self.sid else float(self.sdd) * SID_RATIO
        if not 0 < self.sid < self.sdd:
            raise InputError(f"the source-isocentre distance ({self.sid} mm) must be between 0 and the "
                             f"source-detector distance ({self.sdd} mm)")
        self.view = str(self.view or "AP").upper()
        if self.view not in ("AP", "PA"):
            raise InputError(f"view must be AP or PA, got {self.view}")

    def scaled(self, size: int) -> Carm:
        """The same detector (extent, principal point) sampled with ``size`` pixels along its longer side
        (never more pixels than it has)."""
        s = min(1.0, size / max(self.height, self.width))
        h, w = max(8, round(self.height * s)), max(8, round(self.width * s))
        return Carm(self.sdd, h, w, self.delx * self.width / w, self.dely * self.height / h, self.x0, self.y0,
                    self.sid, self.view)

    def to_dict(self) -> dict:
        return asdict(self)


_NAMES = {"sdd": "source-to-detector distance", "delx": "pixel spacing (x)", "dely": "pixel spacing (y)"}


# ------------------------------------------------------------------------------------------------ poses
def check_parameterization(name: str, convention=None) -> None:
    if name not in PARAMETERIZATIONS:
        raise InputError(f"unknown pose parameterisation '{name}'; known: {', '.join(PARAMETERIZATIONS)}")
    if name == "euler_angles":
        c = str(convention or "")
        if len(c) != 3 or set(c) - set("XYZ") or c[0] == c[1] or c[1] == c[2]:
            raise InputError(f"Euler angles need a convention of three axes such as 'ZXY', got '{convention}'")


def to_pose(rotation, translation, parameterization: str, convention=None):
    """(B, r) rotation and (B, 3) translation tensors -> a batched DiffDRR RigidTransform."""
    from diffdrr.pose import convert

    check_parameterization(parameterization, convention)
    if parameterization == "matrix":
        r = rotation.reshape(-1, 3, 3)
        m = torch.zeros(len(r), 4, 4, dtype=r.dtype)
        m[:, :3, :3] = r
        m[:, :3, 3] = torch.einsum("bij,bj->bi", r, translation)
        m[:, 3, 3] = 1
        return convert(m, parameterization="matrix")
    if parameterization in ("rotation_10d", "quaternion_adjugate"):  # DiffDRR builds these in float32
        rotation, translation = rotation.float(), translation.float()
    return convert(rotation, translation, parameterization=parameterization, convention=convention)


def from_pose(pose, parameterization: str, convention=None):
    """A RigidTransform -> (rotation, translation) in ``parameterization`` (inverse of :func:`to_pose`)."""
    check_parameterization(parameterization, convention)
    rot, trans = pose.convert(parameterization, convention)
    if parameterization == "matrix":
        rot = rot.reshape(len(rot), 9)
    return rot, trans


def start_pose(carm: Carm):
    """The isocentre pose: source at ``sid`` in front of (AP) or behind (PA) the CT centre."""
    angle = 0.0 if carm.view == "AP" else np.pi
    rot = torch.tensor([[angle, 0.0, 0.0]], dtype=torch.float64)
    return to_pose(rot, torch.tensor([[0.0, carm.sid, 0.0]], dtype=torch.float64), "euler_angles", "ZXY")


def pose_matrix(pose) -> np.ndarray:
    return pose.matrix[0].detach().double().cpu().numpy()


def read_pose_json(path_or_dict) -> np.ndarray:
    """A pose JSON (file or dict) -> 4x4 camera-to-world matrix."""
    if isinstance(path_or_dict, dict):
        d, where = path_or_dict, "pose"
    else:
        p = Path(path_or_dict)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise InputError(f"pose file {p} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"pose file {p} is not valid JSON ({e})") from e
        where = p.name
    if not isinstance(d, dict):
        raise InputError(f"{where}: a pose is a JSON object with parameterization, rotation and translation")
    name = d.get("parameterization")
    if name is None:
        raise InputError(f"{where} has no 'parameterization' (e.g. \"euler_angles\" with \"convention\": \"ZXY\")")
    check_parameterization(name, d.get("convention"))
    try:
        rot = torch.tensor(np.asarray(d["rotation"], float).reshape(1, -1), dtype=torch.float64)
        trans = torch.tensor(np.asarray(d["translation"], float).reshape(1, 3), dtype=torch.float64)
    except KeyError as e:
        raise InputError(f"{where} has no '{e.args[0]}'") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: rotation and translation must be lists of numbers ({e})") from None
    if rot.shape[1] != ROT_SIZE[name]:
        raise InputError(f"{where}: a {name} rotation has {ROT_SIZE[name]} numbers, got {rot.shape[1]}")
    if not (torch.isfinite(rot).all() and torch.isfinite(trans).all()):
        raise InputError(f"{where}: rotation and translation must be finite numbers")
    if d.get("degrees"):
        rot = rot * np.pi / 180
    m = pose_matrix(to_pose(rot, trans, name, d.get("convention")))
    if not np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-4):
        raise InputError(f"{where}: the rotation is not a proper rotation")
    return m


def pose_json(matrix: np.ndarray, parameterization: str = "euler_angles", convention="ZXY") -> dict:
    from diffdrr.pose import RigidTransform

    check_parameterization(parameterization, convention)
    pose = RigidTransform(torch.as_tensor(np.asarray(matrix, float))[None])
    rot, trans = from_pose(pose, parameterization, convention)
    out = {"parameterization": parameterization, "rotation": rot[0].tolist(), "translation": trans[0].tolist()}
    if parameterization == "euler_angles":
        out["convention"] = convention
    return out


# ------------------------------------------------------------------------------------------------ frames
REORIENT_AP = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)


def camera_pixels(carm: Carm) -> np.ndarray:
    """(height, width, 3) camera coordinates of the detector pixel centres, as DiffDRR lays them out."""
    from diffdrr.detector import Detector

    det = Detector(carm.sdd, carm.height, carm.width, carm.delx, carm.dely, carm.x0, carm.y0,
                   torch.tensor(REORIENT_AP, dtype=torch.float32), reverse_x_axis=True)
    det = det.double()
    pts = det.calibration(det.target)[0]
    return pts.detach().numpy().reshape(carm.height, carm.width, 3)


def detector_frame(carm: Carm):
    """(origin, direction) of the pixel grid in camera coordinates: origin = pixel (0, 0), direction columns =
    column (i), row (j) and their normal (k)."""
    p = camera_pixels(carm)
    di = p[0, 1] - p[0, 0]
    dj = p[1, 0] - p[0, 0]
    di, dj = di / np.linalg.norm(di), dj / np.linalg.norm(dj)
    return p[0, 0], np.stack([di, dj, np.cross(di, dj)], 1)


def default_xray_frame(carm: Carm, ct_centre_ras) -> np.ndarray:
    """Camera -> X-ray frame when the radiograph has no placement of its own (a DRR written by ``drr``):
    the camera at the start pose, expressed in the CT's LPS space."""
    t = np.eye(4)
    t[:3, 3] = ct_centre_ras
    return FLIP @ t @ pose_matrix(start_pose(carm)) @ REORIENT_AP


def xray_frame_from_image(carm: Carm, origin, direction) -> np.ndarray:
    """Camera -> X-ray frame that puts the detector pixels where the radiograph's grid has them."""
    o_cam, d_cam = detector_frame(carm)
    d = np.asarray(direction, float)
    d_img = np.stack([d[:, 0], d[:, 1], np.cross(d[:, 0], d[:, 1])], 1)
    g = np.eye(4)
    g[:3, :3] = d_img @ d_cam.T
    g[:3, 3] = np.asarray(origin, float) - g[:3, :3] @ o_cam
    return g


def ct_to_xray_matrix(pose_m: np.ndarray, frame: np.ndarray, ct_centre_ras) -> np.ndarray:
    """4x4 LPS matrix mapping CT points into the X-ray frame for camera-to-world pose ``pose_m``."""
    t = np.eye(4)
    t[:3, 3] = -np.asarray(ct_centre_ras, float)
    cam_from_world = np.linalg.inv(pose_m @ REORIENT_AP)
    return frame @ cam_from_world @ t @ FLIP


def image_grid(carm: Carm, frame: np.ndarray):
    """(origin, direction) in the X-ray frame of the pixel grid of ``carm``."""
    o_cam, d_cam = detector_frame(carm)
    return frame[:3, :3] @ o_cam + frame[:3, 3], frame[:3, :3] @ d_cam


def read_pose_file(path) -> dict:
    """A pose JSON file, checked (:func:`read_pose_json`), as its dict."""
    import json
    from pathlib import Path

    read_pose_json(path)  # checks
    return json.loads(Path(path).read_text())
