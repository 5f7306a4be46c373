"""DICOM SEG out (highdicom): a segmentation on the grid of a DICOM series, referencing that series.

Segment labels are the result's segment names, codes come from each segment's Slicer terminology string
(category~type~type modifier~...), colours from its RGB; the FDI number of a tooth is its tracking ID.
Slicer's DICOM module (QuantitativeReporting) reads such files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._version import __version__
from .errors import InputError
from .files import atomic_file

# a segment without terminology: "Tissue" of the DICOM master list
_DEFAULT_CATEGORY = ("85756007", "SCT", "Tissue")
_DEFAULT_TYPE = ("85756007", "SCT", "Tissue")


def _code(text: str):
    """``SCT^38199008^Tooth`` -> pydicom Code (None for ``^^`` or an empty part)."""
    from pydicom.sr.coding import Code

    parts = (text or "").split("^")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        return None
    scheme, value, meaning = parts[0], parts[1], "^".join(parts[2:]) or parts[1]
    return Code(value, scheme, meaning)


def terminology_codes(terminology: str) -> tuple:
    """(category, type, type modifier or None) from a Slicer terminology entry string; default "Tissue"."""
    from pydicom.sr.coding import Code

    parts = (terminology or "").split("~")
    codes = [_code(p) for p in parts[1:4]] if len(parts) >= 3 else [None, None, None]
    codes += [None] * (3 - len(codes))
    cat = codes[0] or Code(*_DEFAULT_CATEGORY)
    typ = codes[1] or Code(*_DEFAULT_TYPE)
    return cat, typ, codes[2]


def _lab(rgb):
    import highdicom as hd

    r, g, b = (min(max(float(c), 0.0), 1.0) for c in rgb[:3])
    return hd.color.CIELabColor.from_rgb(int(round(255 * r)), int(round(255 * g)), int(round(255 * b)))


def read_series_datasets(files, slice_spacing=None) -> tuple:
    """(pydicom headers of a series' files in the given order, repairs made). Some anonymisers blank the SOP class
    and instance UIDs (the file meta keeps them) and the series, study and frame of reference UIDs: those are filled
    in memory (series from the SOP instance UIDs, study and frame of reference from the series, the same on every
    run) and listed, as are a missing slice thickness and a SpacingBetweenSlices that disagrees with the slice
    positions (``slice_spacing``: their spacing); the files are not changed."""
    import pydicom
    from pydicom.uid import generate_uid

    sources, repairs = [], set()
    for f in files:
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None)
        for attr, meta_attr in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(getattr(ds, attr, "") or "") and meta is not None and getattr(meta, meta_attr, None):
                setattr(ds, attr, getattr(meta, meta_attr))
                repairs.add(f"{attr} from the file meta")
        if not str(getattr(ds, "SOPInstanceUID", "") or ""):
            raise InputError(f"{Path(f).name} has no SOPInstanceUID: a DICOM SEG cannot reference it")
        if slice_spacing and not getattr(ds, "SliceThickness", None):  # type 2: may be absent or empty
            ds.SliceThickness = round(float(slice_spacing), 6)
            repairs.add("SliceThickness set to the slice spacing (absent in the source)")
        given = getattr(ds, "SpacingBetweenSlices", None)
        if slice_spacing and given and abs(float(given) - float(slice_spacing)) > 0.01 * float(slice_spacing):
            ds.SpacingBetweenSlices = round(float(slice_spacing), 6)  # highdicom would copy a wrong one
            repairs.add(f"SpacingBetweenSlices {given} replaced by the spacing of the slice positions")
        sources.append(ds)
    series = {str(getattr(ds, "SeriesInstanceUID", "") or "") for ds in sources}
    if series == {""}:
        uid = generate_uid(entropy_srcs=sorted(str(ds.SOPInstanceUID) for ds in sources))
        for ds in sources:
            ds.SeriesInstanceUID = uid
        repairs.add("SeriesInstanceUID derived from the SOP instance UIDs (blank in the source)")
    elif len(series) > 1:
        raise InputError(f"the files given as one series belong to {len(series)} series")
    for attr in ("StudyInstanceUID", "FrameOfReferenceUID"):
        for ds in sources:
            if not str(getattr(ds, attr, "") or ""):
                setattr(ds, attr, generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), attr]))
                repairs.add(f"{attr} derived from the SeriesInstanceUID (blank in the source)")
    return sources, sorted(repairs)


def write_dicom_seg(result, source_files, path, series_description: str = "DeepSegRecon",
                    algorithm: str = "DeepSegRecon", algorithm_version: str = "") -> Path:
    """Write ``result`` (a SegmentationResult on the grid of the series ``source_files``, in the order its image
    was read) as one DICOM SEG file (BINARY, one frame per non-empty slice and segment)."""
    try:
        import highdicom as hd
    except ImportError as e:
        raise InputError("DICOM SEG output needs the highdicom package (pip install highdicom; in Slicer: "
                         "Dependencies.ensureInstalled('SegmentSlices')); or write .seg.nrrd with --format "
                         "seg.nrrd") from e
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian

    sources, repairs = read_series_datasets(source_files, result.labelmap.spacing[2])
    lab = np.asarray(result.labelmap.array)
    if lab.ndim != 3 or lab.shape[0] != len(sources) or lab.shape[1:] != (int(sources[0].Rows),
                                                                         int(sources[0].Columns)):
        raise InputError(f"the segmentation ({' x '.join(map(str, lab.shape))}) is not on the grid of its DICOM "
                         f"series ({len(sources)} slices of {sources[0].Rows} x {sources[0].Columns})")
    segments = [s for s in result.segments if np.any(lab == int(s.label))]
    if not segments:
        raise InputError("the segmentation is empty: no DICOM SEG is written for it")
    numbered = np.zeros(lab.shape, np.uint16)  # DICOM segment numbers 1..N
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=algorithm_version or __version__,
                                              family=codes.cid7162.ArtificialIntelligence)
    descriptions, modifiers = [], []
    for n, s in enumerate(segments, start=1):
        numbered[lab == int(s.label)] = n
        cat, typ, mod = terminology_codes(s.terminology)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=s.name, segmented_property_category=cat, segmented_property_type=typ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
            tracking_id=_tracking_id(s), tracking_uid=hd.UID(), display_color=_lab(s.color)))
        modifiers.append(mod)
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=numbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="DeepSegRecon", manufacturer_model_name=algorithm,
        software_versions=f"deepsegrecon {__version__}", device_serial_number="0",
        content_label="SEGMENTATION", content_description=series_description[:64],
        series_description=series_description[:64], transfer_syntax_uid=ExplicitVRLittleEndian)
    for item, mod in zip(seg.SegmentSequence, modifiers):
        if mod is not None:  # e.g. left / right of a tooth or a kidney
            item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(mod.value, mod.scheme_designator, mod.meaning)]
    if repairs:  # said in the result's report (report.json of a batch case)
        result.report["dicom_seg_repairs"] = repairs
    path = Path(path)
    with atomic_file(path) as tmp:
        seg.save_as(str(tmp))
    return path


def _tracking_id(segment) -> str:
    if segment.name.startswith("tooth_"):
        return f"FDI {segment.label}"
    return segment.name
