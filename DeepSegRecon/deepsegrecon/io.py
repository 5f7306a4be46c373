"""Read and write images: NRRD, NIfTI, MHA/MHD and DICOM series (SimpleITK); InVesalius projects (``.inv3``,
read only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError, ResourceError
from .files import atomic_file
from .image import Image

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm", ".inv3")

# InVesalius keeps a volume as a raw (k, j, i) matrix with its spacing and no position or direction. Its rows run
# posterior -> anterior (the DICOM rows turned upside down, as VTK displays them), its columns as DICOM's (right ->
# left) and its slices from the feet up: in LPS the direction is diag(1, -1, 1). (``main.plist``'s ``orientation``
# key names the acquisition plane, not the axes' senses.) Checked on Debian's Cranium.inv3: the face comes out
# anterior and the teeth at the bottom. Left and right cannot be told from such a file.
INV3_DIRECTION = np.diag([1.0, -1.0, 1.0])


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


def dicom_series_files(folder: Path, series=None) -> list:
    return dicom_series(folder, series)[1]


def dicom_series(folder: Path, series=None) -> tuple:
    """(UID, files) of the DICOM series in ``folder``. A folder with several series is refused with their list
    unless ``series`` (a UID, or a list of UIDs given for several folders) names exactly one of them; a folder
    with one series gives it (:func:`check_series_used` refuses a UID no folder held)."""
    import SimpleITK as sitk

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise InputError(f"{folder} holds no DICOM series")
    wanted = [series] if isinstance(series, str) else list(series or ())
    hits = [u for u in ids if u in wanted]
    if len(hits) == 1:
        uid = hits[0]
    elif len(ids) == 1:
        uid = ids[0]
    else:
        rows = []
        for u in ids:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u)
            rows.append(f"  {u}  {_series_description(files[0]) or '(no description)'}  ({len(files)} files)")
        what = (f"holds no series {', '.join(wanted)}" if wanted and not hits else
                f"holds {len(ids)} DICOM series; choose one with --series UID")
        raise InputError(f"{folder} {what}:\n" + "\n".join(rows))
    return uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def check_series_used(series, images) -> None:
    """Refuse a ``--series UID`` that none of the input folders holds (it would be silently ignored)."""
    used = {getattr(img, "meta", {}).get("dicom_series") for img in images}
    unused = [u for u in (series or ()) if u not in used]
    if unused:
        raise InputError(f"--series {', '.join(unused)}: no input DICOM folder holds this series")


def _series_description(path) -> str:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
        return r.GetMetaData("0008|103e").strip() if r.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        return ""


def check_geometry(spacing, direction, name: str) -> None:
    """Refuse a zero, negative or non-finite spacing and a direction matrix that is not orthonormal."""
    sp = np.asarray(spacing, float)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"{name}: the voxel spacing is zero or invalid ({', '.join(f'{v:g}' for v in sp)} mm)")
    n = len(sp)
    d = np.asarray(direction, float).reshape(n, n)
    if not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(n), atol=1e-3):
        rows = "; ".join(" ".join(f"{v:.4g}" for v in row) for row in d)
        raise InputError(f"{name}: the direction matrix is not orthonormal (the voxel axes are sheared or scaled): "
                         f"[{rows}]; resample the image onto an orthogonal grid first")


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


def read_image(path, memory_factor: float = 4.0, series=None) -> Image:
    """Read an image file, a DICOM series folder or an InVesalius project (``.inv3``, :func:`read_inv3`) into an
    :class:`Image` (``series``: the UID(s) to take from a folder with several series).

    Raises :class:`InputError` with the reason when the path is missing, not an image, truncated, not 2-D or
    3-D, or has a zero spacing or a sheared direction, and :class:`ResourceError` when it would not fit in
    memory (checked from the header).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_file() and _suffix(path) == ".inv3":
        return read_inv3(path, memory_factor)
    reader = sitk.ImageSeriesReader() if path.is_dir() else sitk.ImageFileReader()
    if path.is_dir():
        uid, files = dicom_series(path, series)
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
    size = info.GetSize()
    if len(size) < 2 or (len(size) > 3 and any(s != 1 for s in size[3:])):
        raise InputError(f"{path.name} is {len(size)}-D (size {' x '.join(map(str, size))}): one 2-D or 3-D image "
                         "is needed, not a series of volumes")
    check_geometry(info.GetSpacing()[:3], np.asarray(info.GetDirection()).reshape(len(size), -1)[:3, :3]
                   if len(size) > 3 else info.GetDirection(), path.name)
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
    if dim > 3:  # trailing sizes of 1
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0] * (dim - 3), [0] * dim)
        dim = 3
    check_geometry(img.GetSpacing(), img.GetDirection(), path.name)
    if dim == 3 and img.GetSize()[2] == 1:
        img = img[:, :, 0]
        dim = 2
    out = Image.from_sitk(img, source=str(path))
    if path.is_dir():
        out.meta.update(dicom_files=len(files), dicom_series=uid)
    return out


def read_inv3(path, memory_factor: float = 4.0) -> Image:
    """The CT volume of an InVesalius project (``.inv3``: a gzipped tar with ``main.plist`` and a raw matrix), as
    float32 with the project's spacing and the direction :data:`INV3_DIRECTION` (origin: voxel (0, 0, 0) at 0).

    Raises :class:`InputError` when the file is not a readable project or its matrix does not match its header,
    and :class:`ResourceError` when the volume would not fit in memory (checked from the header)."""
    import plistlib
    import tarfile
    import zlib
    from xml.parsers.expat import ExpatError

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    bad = (OSError, EOFError, KeyError, TypeError, ValueError, zlib.error, ExpatError, tarfile.TarError,
           plistlib.InvalidFileException)
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            info = plistlib.loads(tar.extractfile(files["main.plist"]).read())
            m = info["matrix"]
            shape = tuple(int(n) for n in m["shape"])  # (k, j, i)
            dtype = np.dtype(m["dtype"]).newbyteorder("<")
            spacing = tuple(float(s) for s in info["spacing"])
            if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or dtype.kind not in "iuf":
                raise InputError(f"{path}: its matrix is not a 3-D scalar volume (shape {list(shape)}, "
                                 f"type {m['dtype']}, spacing {list(spacing)})")
            check_geometry(spacing, INV3_DIRECTION, path.name)
            _check_fits(int(np.prod(shape)), max(dtype.itemsize, 4), f"image {path.name}", memory_factor)
            raw = tar.extractfile(files[m["filename"]]).read()
    except InputError:
        raise
    except bad as e:
        raise InputError(f"{path} is not a readable InVesalius project: {type(e).__name__}: {e}") from e
    arr = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"{path}: matrix has {arr.size} voxels, its header says {' x '.join(map(str, shape))}")
    return Image(arr.reshape(shape).astype(np.float32), spacing, (0.0, 0.0, 0.0), INV3_DIRECTION.copy(),
                 {"source": str(path)})


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
