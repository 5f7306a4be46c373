"""Read and write images: NRRD, NIfTI, MHA/MHD and DICOM series (SimpleITK)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError, ResourceError
from .files import atomic_file
from .image import Image

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".seg.nrrd", ".nii.gz"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _check_fits(n_voxels: int, bytes_per_voxel: int, what: str, factor: float = 4.0) -> None:
    """Refuse, before allocating, an image whose processing would not fit in memory."""
    need = n_voxels * bytes_per_voxel * factor
    have = available_memory()
    if need > have:
        raise ResourceError(
            f"{what} is too large: {n_voxels:,} voxels need about {need / 2**30:.1f} GiB to process, "
            f"only {have / 2**30:.1f} GiB of memory is available"
        )


def dicom_series_files(folder: Path) -> list:
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"{folder} holds no DICOM series")
    # take the series with the most slices
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i) for i in ids), key=len)
    return list(files)


def check_nifti_complete(path: Path) -> None:
    """ITK reads a truncated ``.nii.gz`` without complaint (the missing voxels come back as 0): check that the
    file holds all the bytes its header announces. Cheap: the gzip trailer's size field, and a streamed
    decompression only when that disagrees (a multi-member gzip file)."""
    import gzip
    import struct
    import zlib

    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
    for end in "<>":
        size = struct.unpack(end + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(end + "8h", head[40:56])
            bitpix = struct.unpack(end + "h", head[72:74])[0]
            offset = int(struct.unpack(end + "f", head[108:112])[0])
            break
        if size == 540:
            bitpix = struct.unpack(end + "h", head[14:16])[0]
            dims = struct.unpack(end + "8q", head[16:80])
            offset = int(struct.unpack(end + "q", head[168:176])[0])
            break
    else:
        return  # not a NIfTI header we know: the reader has judged it
    n = int(np.prod([max(int(d), 1) for d in dims[1:1 + max(1, min(int(dims[0]), 7))]]))
    need = max(offset, 348) + n * max(int(bitpix), 8) // 8
    truncated = InputError(f"cannot read {path.name}: the file is truncated (it holds fewer voxels than its "
                           "header announces)")
    if not name.endswith(".gz"):
        if path.stat().st_size < need:
            raise truncated
        return
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", f.read(4))[0]
    if isize == need % 2**32:
        return
    total = 0
    try:  # confirm by decompressing (handles multi-member files); a cut stream raises EOFError
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        raise truncated from e
    if total < need:
        raise truncated


def read_image(path, memory_factor: float = 4.0) -> Image:
    """Read an image file or a DICOM series folder into an :class:`Image`.

    Raises :class:`InputError` with the reason when the path is missing, not an image, or
    truncated, and :class:`ResourceError` when it would not fit in memory (checked from the header).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    reader = sitk.ImageSeriesReader() if path.is_dir() else sitk.ImageFileReader()
    if path.is_dir():
        files = dicom_series_files(path)
        reader.SetFileNames(files)
        info = sitk.ImageFileReader()
        info.SetFileName(files[0])
    else:
        reader.SetFileName(str(path))
        info = reader
    try:
        info.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"cannot read {path}: not an image file or its header is damaged") from e
    n = int(np.prod(info.GetSize())) * (len(files) if path.is_dir() else 1)
    bpv = np.dtype(sitk.GetArrayViewFromImage(sitk.Image(1, 1, info.GetPixelID())).dtype).itemsize
    _check_fits(n * info.GetNumberOfComponents(), max(bpv, 4), f"image {path.name}", memory_factor)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"cannot read {path}: the file is truncated or corrupt ({str(e).strip().splitlines()[-1]})") from e
    if not path.is_dir():
        check_nifti_complete(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar image is needed")
    dim = img.GetDimension()
    if dim == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
        dim = 2
    out = Image.from_sitk(img, source=str(path))
    if path.is_dir():
        out.meta["dicom_files"] = len(files)
    return out


def write_image(image: Image, path, compress: bool = True) -> Path:
    """Write atomically (temporary file then rename); the suffix chooses the format."""
    import SimpleITK as sitk

    path = Path(path)
    suffix = _suffix(path)
    if suffix not in (".nrrd", ".nii", ".nii.gz", ".mha"):
        raise InputError(f"cannot write {path.name}: use .nrrd, .nii, .nii.gz or .mha")
    with atomic_file(path) as tmp:
        sitk.WriteImage(image.to_sitk(), str(tmp), compress)
    return path
