"""Radiographs: reading (DICOM tags for the C-arm geometry), checks, and the seed's preprocessing
(collimator crop, Beer-Lambert inversion, MONOCHROME1, normalisation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..image import Image

META_PREFIX = "deepsegrecon_"
CARM_KEYS = ("sdd", "delx", "dely", "x0", "y0", "sid", "view")


def as_slice(image: Image, name: str = "X-ray") -> Image:
    """A radiograph as a one-slice 3-D image (its plane placed in LPS); refuses a real volume and NaN."""
    if not isinstance(image, Image):
        raise InputError(f"{name} is not an image")
    a = np.asarray(image.array)
    if a.ndim == 3 and a.shape[0] != 1:
        raise InputError(f"{name} is 3-D (shape {a.shape}); an X-ray is one 2-D image")
    if a.dtype.kind not in "fiub":
        raise InputError(f"{name} has voxel type {a.dtype}; a scalar image is needed")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InputError(f"{name} has {int((~np.isfinite(a)).sum())} NaN or infinite pixels")
    if a.ndim == 2:
        d = np.eye(3)
        d[:2, :2] = image.direction
        image = Image(a[None], (*image.spacing, 1.0), (*image.origin, 0.0), d, dict(image.meta))
    if min(image.array.shape[1:]) < 8:
        raise InputError(f"{name} is too small ({image.array.shape[1:]}); at least 8 x 8 pixels are needed")
    if image.array.min() == image.array.max():
        raise InputError(f"{name} is constant: there is nothing to register")
    return image


def read_xray(path) -> tuple:
    """(one-slice Image, info) from a DICOM file or an image file; ``info`` holds what the file says about the
    C-arm (``sdd``, ``pixel_spacing`` (x, y) or None, ``view``, ``values``) and, for a DRR written by
    ``deepsegrecon drr``, its whole geometry."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"X-ray {path} does not exist")
    if path.is_file() and _is_dicom(path):
        return _read_dicom(path)
    import SimpleITK as sitk

    from ..io import read_image

    img = read_image(path)  # checks (size, truncation, memory)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() == 3 and img.ndim == 2:  # a one-slice volume: keep its plane's 3-D placement
        img = Image.from_sitk(reader.Execute(), **img.meta)
    info = {"values": "attenuation", "pixel_spacing": tuple(img.spacing[:2])}
    for key in reader.GetMetaDataKeys():
        if key.startswith(META_PREFIX):
            value = reader.GetMetaData(key)
            k = key[len(META_PREFIX):]
            info[k] = value if k == "view" else float(value)
    if "delx" in info:
        info["pixel_spacing"] = (info.pop("delx"), info.pop("dely"))
    return as_slice(img, f"X-ray {path.name}"), info


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm"


def _read_dicom(path: Path) -> tuple:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds
        raise InputError(f"cannot read the DICOM X-ray {path.name}: {e}") from e
    if arr.ndim != 2:
        raise InputError(f"X-ray {path.name} is {arr.ndim}-D (shape {arr.shape}); an X-ray is one 2-D image")
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr.astype(np.float32) * slope + intercept
    spacing = None
    for tag in ("ImagerPixelSpacing", "PixelSpacing"):
        v = getattr(ds, tag, None)
        if v is not None and len(v) == 2 and all(float(s) > 0 for s in v):
            spacing = (float(v[1]), float(v[0]))  # DICOM gives (row, column) spacing
            break
    sdd = getattr(ds, "DistanceSourceToDetector", None)
    sid = getattr(ds, "DistanceSourceToPatient", None)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    info = {"pixel_spacing": spacing, "sdd": float(sdd) if sdd else None, "sid": float(sid) if sid else None,
            "view": str(getattr(ds, "ViewPosition", "") or "AP").upper(), "photometric": photometric,
            "values": "intensity" if photometric == "MONOCHROME1" else "attenuation"}
    if info["view"] not in ("AP", "PA"):
        info["view"] = "AP"
    img = Image(arr[None], (*(spacing or (1.0, 1.0)), 1.0), (0.0, 0.0, 0.0), np.eye(3), {"source": str(path)})
    return as_slice(img, f"X-ray {path.name}"), info


def collimator_margins(a: np.ndarray, max_fraction: float = 0.25) -> tuple:
    """(rows, columns) to cut from each side: flat bands along the border (collimator shadows), taken
    symmetrically so that the principal point stays at the centre."""
    tol = 0.02 * (np.percentile(a, 99) - np.percentile(a, 1) + 1e-12)

    def flat(profile_std, n):
        k = 0
        while k < int(n * max_fraction) and profile_std[k] < tol:
            k += 1
        return k

    rows, cols = a.std(1), a.std(0)
    r = max(flat(rows, len(rows)), flat(rows[::-1], len(rows)))
    c = max(flat(cols, len(cols)), flat(cols[::-1], len(cols)))
    return r, c


def crop(image: Image, rows: int, cols: int) -> Image:
    """The one-slice image without ``rows``/``cols`` on each side, its origin moved accordingly."""
    if rows == 0 and cols == 0:
        return image
    a = image.array[:, rows: image.array.shape[1] - rows, cols: image.array.shape[2] - cols]
    origin = np.asarray(image.origin) + image.direction @ (np.array([cols, rows, 0]) * np.asarray(image.spacing))
    return Image(a, image.spacing, tuple(origin), image.direction, dict(image.meta))


def line_integral(a: np.ndarray, values: str) -> np.ndarray:
    """Attenuation line integrals: ``log(I0 / I)`` for detector intensities (I0 from the image), as is for
    images that already show attenuation (DRRs, processed MONOCHROME2 radiographs)."""
    a = a.astype(np.float64)
    if values == "intensity":
        i = a if a.min() > 0 else a - a.min() + 1e-3 * (a.max() - a.min())  # intensities are positive
        i0 = np.percentile(i, 99.9)
        return np.log(i0) - np.log(np.clip(i, i0 * 1e-4, i0))
    if values == "attenuation":
        return a
    raise InputError(f"X-ray values must be 'intensity' or 'attenuation', got '{values}'")


def to_tensor(a: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(1, 1, height, width) area-resampled, scaled to [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    if t.shape[-2:] != (height, width):
        t = F.interpolate(t, size=(height, width), mode="area")
    return minmax(t)


def minmax(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    lo = t.flatten(1).min(1)[0].view(-1, 1, 1, 1)
    hi = t.flatten(1).max(1)[0].view(-1, 1, 1, 1)
    return (t - lo) / (hi - lo + eps)


def network_input(t: torch.Tensor, size: int) -> torch.Tensor:
    """The same transform for DRRs and X-rays before the network (the seed's): min-max, resize, normalise."""
    t = F.interpolate(minmax(t), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (t - 0.3080) / 0.1494
