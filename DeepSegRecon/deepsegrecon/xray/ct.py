"""The CT side: downsampling, the DiffDRR renderer, landmark points."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..image import Image
from .geometry import FLIP, Carm

BONE_HU = 350.0  # DiffDRR's bone threshold for the attenuation contrast


def downsample(ct: Image, spacing_mm: float) -> Image:
    """Average blocks of voxels so that each side is about ``spacing_mm`` (never upsamples)."""
    f = [max(1, int(round(spacing_mm / s))) for s in ct.spacing]  # (i, j, k)
    if f == [1, 1, 1]:
        return Image(ct.array.astype(np.float32), ct.spacing, ct.origin, ct.direction)
    x = torch.from_numpy(np.ascontiguousarray(ct.array, dtype=np.float32))[None, None]
    y = torch.nn.functional.avg_pool3d(x, kernel_size=f[::-1], stride=f[::-1], ceil_mode=True)[0, 0]
    shift = ct.direction @ (np.asarray(ct.spacing) * (np.asarray(f) - 1) / 2)
    return Image(y.numpy(), tuple(np.asarray(ct.spacing) * f), tuple(np.asarray(ct.origin) + shift), ct.direction)


def ras_affine(ct: Image) -> np.ndarray:
    return FLIP @ ct.ijk_to_lps()


def centre_ras(ct: Image) -> np.ndarray:
    """The CT centre that DiffDRR moves to the world origin (torchio's ``get_center``)."""
    mid = (np.asarray(ct.size, float) - 1) / 2
    return (ras_affine(ct) @ np.append(mid, 1))[:3]


def subject(ct: Image, bone_attenuation: float = 1.0, centre=None):
    """A DiffDRR subject (torchio) for a CT in HU, AP reorientation, with ``centre`` (RAS, default the CT's
    own centre) at the world origin: a downsampled copy keeps the world of the full CT."""
    from diffdrr.data import read
    from torchio import ScalarImage

    a = np.asarray(ct.array, dtype=np.float32)
    soft = (a > -800) & (a <= BONE_HU)
    if not soft.any():
        raise InputError("the CT has no voxel between -800 and 350 HU (soft tissue): is it a CT in Hounsfield units?")
    data = torch.from_numpy(np.ascontiguousarray(np.transpose(a, (2, 1, 0))))[None]
    subj = read(ScalarImage(tensor=data, affine=ras_affine(ct)), orientation="AP",
                bone_attenuation_multiplier=float(bone_attenuation), center_volume=False)
    shift = np.eye(4)
    shift[:3, 3] = -(centre_ras(ct) if centre is None else np.asarray(centre, float))
    for image in subj.get_images(intensity_only=False):
        image.affine = shift @ image.affine
    return subj


class Renderer:
    """DiffDRR renderer of one CT for one C-arm, with an adjustable bone-attenuation contrast."""

    def __init__(self, ct: Image, carm: Carm, bone_attenuation: float = 1.0, centre=None, renderer: str = "siddon"):
        from diffdrr.drr import DRR

        self.ct, self.carm = ct, carm
        self.centre = centre_ras(ct) if centre is None else np.asarray(centre, float)
        self.subject = subject(ct, bone_attenuation, self.centre)
        self.hu = self.subject.volume.data.squeeze().float()
        self.drr = DRR(self.subject, sdd=carm.sdd, height=carm.height, width=carm.width, delx=carm.delx,
                       dely=carm.dely, x0=carm.x0, y0=carm.y0, reverse_x_axis=True, renderer=renderer)
        self.contrast = float(bone_attenuation)

    def set_contrast(self, bone_attenuation: float) -> None:
        from diffdrr.data import transform_hu_to_density

        if bone_attenuation != self.contrast:
            self.drr.density = transform_hu_to_density(self.hu, float(bone_attenuation))
            self.contrast = float(bone_attenuation)

    def set_carm(self, carm: Carm) -> None:
        self.carm = carm
        self.drr.set_intrinsics_(sdd=carm.sdd, height=carm.height, width=carm.width, delx=carm.delx,
                                 dely=carm.dely, x0=carm.x0, y0=carm.y0)

    def __call__(self, pose) -> torch.Tensor:
        """(B, 1, height, width) line-integral images for a batched RigidTransform (camera-to-world)."""
        return self.drr(pose)


def vertebra_landmarks(mask: Image, names_to_labels: dict, first="vertebrae_C5", last="vertebrae_L3") -> dict:
    """Centroids (LPS mm) of the labelled vertebrae from ``first`` down to ``last`` that are in the mask."""
    order = [f"vertebrae_C{i}" for i in range(1, 8)] + [f"vertebrae_T{i}" for i in range(1, 13)] + \
        [f"vertebrae_L{i}" for i in range(1, 6)]
    if first not in order or last not in order:
        raise InputError(f"unknown vertebra {first} or {last}")
    out = {}
    for name in order[order.index(first): order.index(last) + 1]:
        label = names_to_labels.get(name)
        if label is None:
            continue
        idx = np.argwhere(mask.array == label)  # (k, j, i)
        if len(idx) < 20:
            continue
        out[name] = mask.physical_points(idx[:, ::-1].mean(0)[None])[0]
    return out
