"""Read and write Slicer segmentation files (``.seg.nrrd``) without Slicer.

``write_seg_nrrd`` writes the header that Slicer's segmentation storage node writes (segment ID, name,
colour, label value, layer, extent, tags with the terminology entry, the segmentation's representations
and conversion parameters, including the reference image geometry) so that Slicer loads the file as a
segmentation with the label values, names, colours and terminology kept, and ``slicerio`` reads it back
identically. Geometry is exact: the NRRD ``space directions`` carry spacing and an oblique direction.

``read_seg_nrrd`` reads a ``.seg.nrrd`` (through ``slicerio``) or a plain labelmap image (NRRD, NIfTI,
MHA; its segments are then named ``label_<value>``) into a :class:`SegmentationResult`.

Array order: an :class:`Image` array is (k, j, i); NRRD files and ``slicerio`` voxels are (i, j, k).
"""

from __future__ import annotations

import colorsys
import re
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import atomic_file
from .image import Image
from .results import SegmentationResult, SegmentInfo

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"

# The conversion parameters Slicer 5.x writes for a segmentation (name, default value, description).
_CONVERSION_PARAMETERS = (
    ("Decimation factor", "0.0", "Desired reduction in the total number of polygons. Range: 0.0 (no decimation) to "
     "1.0 (as much simplification as possible). Value of 0.8 typically reduces data set size by 80% without losing "
     "too much details."),
    ("Smoothing factor", "0.5", "Smoothing factor. Range: 0.0 (no smoothing) to 1.0 (strong smoothing)."),
    ("Compute surface normals", "1", "Compute surface normals. 1 (default) = surface normals are computed. "
     "0 = surface normals are not computed (slightly faster but produces less smooth surface display, not used if "
     "vtkSurfaceNets3D is used)."),
    ("Conversion method", "0", "Conversion method. 0 (default) = vtkDiscreteFlyingEdges3D is used to generate closed "
     "surface.1 = vtkSurfaceNets3D (more performant than flying edges)."),
    ("SurfaceNets smoothing", "0", "SurfaceNets smoothing. 0 (default) = Smoothing done by "
     "vtkWindowedSincPolyDataFilter1 = Smoothing done in surface nets filter."),
    ("Joint smoothing", "0", "Perform joint smoothing."),
    ("Reference image geometry", "", "Image geometry description string determining the geometry of the labelmap "
     "that is created in course of conversion. Can be copied from a volume, using the button."),
    ("Oversampling factor", "1", "Determines the oversampling of the reference image geometry. If it's a number, then "
     "all segments are oversampled with the same value (value of 1 means no oversampling). If it has the value \"A\", "
     "then automatic oversampling is calculated."),
    ("Crop to reference image geometry", "0", "Crop the model to the extent of reference geometry. 0 (default) = "
     "created labelmap will contain the entire model. 1 = created labelmap extent will be within reference image "
     "extent."),
    ("Collapse labelmaps", "1", "Merge the labelmaps into as few shared labelmaps as possible 1 = created labelmaps "
     "will be shared if possible without overwriting each other."),
)

# Slicer's default terminology entry for a segment that has none.
DEFAULT_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue"
                       "~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^")

_SEGMENT_KEY = re.compile(r"^Segment[0-9]+_")


# ----------------------------------------------------------------------------------------------------------
# helpers shared with the scene adapter


def default_color(index: int) -> tuple:
    """A distinct, deterministic RGB colour (0..1) for the ``index``-th segment of unknown colour."""
    h = (0.13 + index * 0.618033988749895) % 1.0
    return tuple(round(c, 6) for c in colorsys.hsv_to_rgb(h, 0.65, 0.9))


def label_array(array: np.ndarray) -> np.ndarray:
    """The labelmap as an integer array of a type Slicer and NRRD handle (8, 16 or 32 bit).

    Integer types up to 32 bit are kept as they are; bool, 64-bit and integral float arrays get the smallest
    type that holds their values. Non-integral values are refused.
    """
    a = np.asarray(array)
    if a.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise InputError("a labelmap must hold integer label values; this one has fractional or NaN values")
    elif a.dtype.kind not in "iu":
        raise InputError(f"a labelmap must be an integer array, got {a.dtype}")
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return a.astype(t)
    raise InputError(f"label values {lo}..{hi} do not fit in 32 bits")


def as_3d(image: Image) -> Image:
    """A 2-D image as a single-slice 3-D image (k axis = the cross product of the i and j axes)."""
    if image.ndim == 3:
        return image
    d2 = image.direction
    d = np.eye(3)
    d[:2, :2] = d2
    return Image(image.array[np.newaxis], tuple(image.spacing) + (1.0,), tuple(image.origin) + (0.0,), d,
                 dict(image.meta))


def image_from_ijk_to_lps(array_kji: np.ndarray, ijk_to_lps: np.ndarray, **meta) -> Image:
    m = np.asarray(ijk_to_lps, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError("the image geometry has a zero-length axis")
    return Image(array_kji, tuple(spacing), tuple(m[:3, 3]), m[:3, :3] / spacing, dict(meta))


def _num(v: float) -> str:
    s = repr(float(v))
    return s[:-2] if s.endswith(".0") else s


def reference_geometry_string(image: Image) -> str:
    """Slicer's serialised image geometry: the IJK-to-RAS matrix (row by row) then the extent, ';'-separated."""
    m = as_3d(image).ijk_to_ras()
    size = as_3d(image).size
    vals = [_num(x) for x in m.ravel()] + [str(v) for n in size for v in (0, n - 1)]
    return ";".join(vals) + ";"


def conversion_parameters(image: Image, smoothing: float = 0.5) -> list:
    out = []
    for name, value, desc in _CONVERSION_PARAMETERS:
        if name == "Reference image geometry":
            value = reference_geometry_string(image)
        elif name == "Smoothing factor":
            value = _num(smoothing)
        out.append({"name": name, "value": value, "description": desc})
    return out


def _check_segments(segments: list) -> None:
    names = [s.name for s in segments]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"segment names must be unique (they are the segment IDs); repeated: {dup}")
    labels = [int(s.label) for s in segments]
    dup = sorted({v for v in labels if labels.count(v) > 1})
    if dup:
        raise InputError(f"segment label values must be unique; repeated: {dup}")
    if any(v == 0 for v in labels):
        raise InputError("label value 0 is the background and cannot be a segment")


# ----------------------------------------------------------------------------------------------------------
# writing


def write_seg_nrrd(result: SegmentationResult, path, smoothing: float = 0.5, compression_level: int = 6) -> Path:
    """Write ``result`` as a Slicer ``.seg.nrrd`` (atomically: temporary file, then rename).

    One layer: the labelmap's voxels keep their values and each segment's ``LabelValue`` is its label, so
    label values (e.g. FDI tooth numbers) survive. Voxels whose value belongs to no segment are written as 0.
    """
    import slicerio.segmentation as slicerio

    path = Path(path)
    if not isinstance(result, SegmentationResult):
        raise InputError("write_seg_nrrd needs a SegmentationResult")
    _check_segments(result.segments)
    image = as_3d(result.labelmap)
    labels = label_array(image.array)
    known = np.array(sorted(int(s.label) for s in result.segments), dtype=np.int64)
    labels = np.where(np.isin(labels, known), labels, 0).astype(labels.dtype)
    voxels = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (k, j, i) -> (i, j, k)
    full_extent = [v for n in voxels.shape for v in (0, n - 1)]
    segments = []
    for s in result.segments:
        seg = {
            "id": s.name,
            "name": s.name,
            "nameAutoGenerated": False,
            "color": [float(c) for c in s.color],
            "colorAutoGenerated": False,
            "labelValue": int(s.label),
            "layer": 0,
            # Slicer writes the extent of the shared labelmap for every segment of a layer
            "extent": full_extent,
        }
        if s.terminology:
            seg["terminology"] = slicerio.terminology_entry_from_string(s.terminology)
        segments.append(seg)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": image.ijk_to_lps(),
        "encoding": "gzip",
        "containedRepresentationNames": [BINARY_LABELMAP],
        "conversionParameters": conversion_parameters(image, smoothing),
        "masterRepresentation": BINARY_LABELMAP,
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    with atomic_file(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=compression_level)
    return path


# ----------------------------------------------------------------------------------------------------------
# reading


def is_seg_nrrd(path) -> bool:
    """True for a NRRD file whose header holds Slicer segment fields."""
    import nrrd

    path = Path(path)
    if path.suffix.lower() not in (".nrrd", ".nhdr"):
        return False
    try:
        header = nrrd.read_header(str(path))
    except Exception:  # noqa: BLE001 - not a readable NRRD: let the image reader say why
        return False
    return any(_SEGMENT_KEY.match(k) for k in header)


def read_seg_nrrd(path) -> SegmentationResult:
    """Read a ``.seg.nrrd`` or a plain labelmap (NRRD/NIfTI/MHA) into a :class:`SegmentationResult`.

    A segmentation with overlapping segments (several layers) is merged into one labelmap: a segment whose
    label value is already taken gets the next free value, and where segments overlap the later one wins
    (``report["overlapping_voxels"]`` counts those voxels).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"segmentation {path} does not exist")
    if is_seg_nrrd(path):
        return _read_slicer_segmentation(path)
    return _read_plain_labelmap(path)


def _read_slicer_segmentation(path: Path) -> SegmentationResult:
    import slicerio.segmentation as slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read segmentation {path}: {e}") from e
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 3:
        layers = voxels[np.newaxis]
    elif voxels.ndim == 4:
        layers = voxels
    else:
        raise InputError(f"{path}: a segmentation must be 3-D (or 4-D with layers), got shape {voxels.shape}")
    infos = seg.get("segments", [])
    used: set = set()
    plan = []
    for s in infos:
        label = int(s.get("labelValue", 1))
        layer = int(s.get("layer", 0))
        if layer >= layers.shape[0]:
            raise InputError(f"{path}: segment '{s.get('name')}' is in layer {layer}; the file has {layers.shape[0]}")
        out_label = label
        if out_label in used or out_label <= 0:
            out_label = max(used | {0, int(layers.max()) if layers.size else 0}) + 1
        used.add(out_label)
        plan.append((s, layer, label, out_label))
    if layers.shape[0] == 1 and all(a == b for _, _, a, b in plan):
        out = layers[0].copy()
        known = np.array([p[2] for p in plan], dtype=np.int64)
        out[~np.isin(out, known)] = 0
        overlap = 0
    else:
        out_dtype = label_array(np.array([0] + [p[3] for p in plan])).dtype
        out = np.zeros(layers.shape[1:], dtype=np.promote_types(out_dtype, np.uint8))
        taken = np.zeros(layers.shape[1:], dtype=bool)
        overlap = 0
        for _, layer, label, out_label in plan:
            mask = layers[layer] == label
            overlap += int(np.count_nonzero(mask & taken))
            taken |= mask
            out[mask] = out_label
    segments = []
    for n, (s, _, _, out_label) in enumerate(plan):
        terminology = s.get("terminology")
        segments.append(SegmentInfo(
            name=str(s.get("name", s.get("id", f"label_{out_label}"))),
            label=int(out_label),
            color=tuple(float(c) for c in s.get("color", default_color(n))),
            terminology=slicerio.terminology_entry_to_string(terminology) if terminology else "",
        ))
    image = image_from_ijk_to_lps(np.ascontiguousarray(label_array(out).transpose(2, 1, 0)), seg["ijkToLPS"],
                                  source=str(path))
    report = {"source": str(path), "segment_ids": [str(s.get("id", "")) for s in infos]}
    if layers.shape[0] > 1:
        report["layers"] = int(layers.shape[0])
        report["overlapping_voxels"] = overlap
    return SegmentationResult(image, segments, report=report)


def _read_plain_labelmap(path: Path) -> SegmentationResult:
    from .io import read_image

    img = read_image(path)
    arr = label_array(img.array)
    values = [int(v) for v in np.unique(arr) if v != 0]
    segments = [SegmentInfo(f"label_{v}", v, default_color(n), "") for n, v in enumerate(values)]
    return SegmentationResult(img.with_array(arr), segments, report={"source": str(path)})
