"""Find the cases of a batch: image files, folders of files, DICOM trees (one case per series), CSV lists; split
them into shards. Series discovery is SimpleITK's (GDCM), headers are read with pydicom."""

from __future__ import annotations

import csv
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .io import IMAGE_SUFFIXES

# Files that are never cases: outputs and labels of other runs, side files.
SKIP_SUFFIXES = (".seg.nrrd", ".json", ".csv", ".txt", ".md", ".png", ".jpg", ".h5", ".stl", ".obj", ".mrb", ".log",
                 ".py", ".zip", ".npz", ".pt")
# Brain MRI inputs by file name or DICOM series description (first match wins: t1c before t1, flair before t2).
BRAIN_PATTERNS = (("t1c", r"t1c|t1ce|t1gd|t1[-_ ]?post|contrast|\+c\b|gad"), ("flair", r"flair|t2f\b|t2[-_ ]?flair"),
                  ("t2", r"t2"), ("t1", r"t1"))


@dataclass
class Case:
    id: str
    inputs: dict  # input name -> path (file, DICOM series folder, projection folder)
    files: dict = field(default_factory=dict)  # input name -> [files] of a DICOM series, in slice order
    series: dict = field(default_factory=dict)  # input name -> SeriesInstanceUID
    params: dict = field(default_factory=dict)  # per-case parameters (xray: poses, landmarks)


LABEL_NAME = re.compile(r"(^|[-_.])(labels?|seg|segmentation|mask)([-_.]|$)", re.IGNORECASE)


def _is_image_file(path: Path) -> bool:
    """An image file that can be a case: not a side file, not a label (``labels.nii.gz``, ``*_seg.nrrd``, mask)."""
    name = path.name.lower()
    return (not name.endswith(SKIP_SUFFIXES) and any(name.endswith(s) for s in IMAGE_SUFFIXES if s != ".dcm")
            and not LABEL_NAME.search(_stem(path)))


def _stem(path: Path) -> str:
    from .files import output_stem

    return output_stem(path)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def dicom_series_in(folder: Path) -> list:
    """[(uid, files, header)] of the DICOM series directly in ``folder`` (GDCM; files in slice order)."""
    import pydicom
    import SimpleITK as sitk

    out = []
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" for a folder of other files
    try:
        uids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    for uid in uids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        try:
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception:  # not DICOM after all (GDCM is lenient)
            continue
        out.append((uid, files, header))
    return out


def _walk(root: Path):
    """(folder, image files, has other files) for ``root`` and every folder below it, sorted; linked folders are
    followed, each real folder once."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        names = sorted(n for n in filenames if not n.startswith("."))
        images = [folder / n for n in names if _is_image_file(folder / n)]
        others = [n for n in names if not n.lower().endswith(SKIP_SUFFIXES + tuple(s for s in IMAGE_SUFFIXES
                                                                              if s != ".dcm"))]
        yield folder, images, bool(others)


def _rel_id(path: Path, root: Path, stem: bool) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    parts = list(rel.parts)
    if stem and parts:
        parts[-1] = _stem(Path(parts[-1]))
    return "_".join(parts) if parts else (root.resolve().name or "case")


def find_images(inputs, modalities=("CT",), pattern=None) -> list:
    """One :class:`Case` (input ``image``) per image file and per DICOM series of one of ``modalities`` (None:
    any) found in ``inputs`` (files or folders, walked recursively). ``pattern``: file-name glob for image files."""
    cases = []
    for item in inputs:
        root = Path(item).expanduser()
        if not root.exists():
            raise InputError(f"input {root} does not exist")
        if root.is_file():  # named on purpose: any image file (a label-like name too)
            name = root.name.lower()
            if name.endswith(SKIP_SUFFIXES) or not name.endswith(IMAGE_SUFFIXES):
                raise InputError(f"input {root.name} is not an image file (expected one of "
                                 f"{', '.join(IMAGE_SUFFIXES)})")
            cases.append(Case(_stem(root), {"image": str(root)}))
            continue
        for folder, images, others in _walk(root):
            for f in images:
                if pattern is None or fnmatch.fnmatch(f.name, pattern):
                    cases.append(Case(_rel_id(f, root, True), {"image": str(f)}))
            if not others:
                continue
            series = [s for s in dicom_series_in(folder)
                      if modalities is None or str(getattr(s[2], "Modality", "")).upper() in modalities]
            base = _rel_id(folder, root, False) if folder != root else (root.resolve().name or "dicom")
            for uid, files, header in series:
                cid = base if len(series) == 1 else f"{base}_S{getattr(header, 'SeriesNumber', '') or uid[-8:]}"
                cases.append(Case(cid, {"image": str(folder)}, {"image": files}, {"image": uid}))
    return unique_ids(cases)


def brain_modality(name: str):
    """t1 / t1c / t2 / flair from a file name or series description, else None."""
    text = name.lower()
    for modality, rx in BRAIN_PATTERNS:
        if re.search(rx, text):
            return modality
    return None


def find_brain(inputs) -> list:
    """Brain cases: rows of a CSV (case, t1, t1c, t2, flair), folders whose image files name their modality
    (``*_flair.nii.gz``, ``t1c.nrrd`` ...), or DICOM studies whose series descriptions do (MR series)."""
    cases = []
    for item in inputs:
        root = Path(item).expanduser()
        if root.is_file() and root.suffix.lower() == ".csv":
            cases += read_case_csv(root, ("t1", "t1c", "t2", "flair"), need=2)
            continue
        if not root.is_dir():
            raise InputError(f"brain input {root} is neither a folder nor a CSV file (case,t1,t1c,t2,flair)")
        studies: dict = {}
        for folder, images, others in _walk(root):
            found = {}
            for f in images:
                m = brain_modality(_stem(f))
                if m and m not in found:
                    found[m] = str(f)
            if len(found) >= 2:
                cases.append(Case(_rel_id(folder, root, False) if folder != root else _safe(root.name), found))
            if others:
                for uid, files, h in dicom_series_in(folder):
                    m = brain_modality(str(getattr(h, "SeriesDescription", "")))
                    if m and str(getattr(h, "Modality", "MR")).upper() == "MR":
                        key = str(getattr(h, "StudyInstanceUID", "") or folder)
                        when = str(getattr(h, "StudyDate", "") or "") or key[-8:]
                        study = studies.setdefault(key, Case(_safe(f"{getattr(h, 'PatientID', '')}_{when}"), {}))
                        if m not in study.inputs:
                            study.inputs[m], study.files[m], study.series[m] = str(folder), files, uid
        cases += [c for c in studies.values() if len(c.inputs) >= 2]
    return unique_ids(cases)


def read_case_csv(path: Path, columns, need: int = 1, required=()) -> list:
    """Cases from a CSV with a header row: ``case`` (optional id) and one column per input; paths relative to
    the CSV's folder. Extra columns become per-case parameters (e.g. truth_pose; a file name there is relative to
    the CSV's folder too)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the case list {path}: {e}") from e
    cases = []
    for n, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        missing = [c for c in required if not row.get(c)]
        if missing:
            raise InputError(f"{path.name} line {n}: no {', '.join(missing)} (columns: {', '.join(columns)})")
        inputs = {c: str((path.parent / row[c]).expanduser()) for c in columns if row.get(c)}
        if len(inputs) < need:
            raise InputError(f"{path.name} line {n}: needs at least {need} of the columns {', '.join(columns)}")
        first = Path(next(iter(inputs.values())))
        extra = {k: v for k, v in row.items() if k not in columns and k != "case" and v}
        extra = {k: str(path.parent / v) if (path.parent / v).is_file() else v for k, v in extra.items()}
        cases.append(Case(_safe(row.get("case") or _stem(first)), inputs, params=extra))
    return cases


def unique_ids(cases: list) -> list:
    """Sorted by id; a repeated id gets ``-2``, ``-3`` ... (in discovery order, so every shard agrees)."""
    seen: dict = {}
    for c in cases:
        c.id = _safe(c.id)
        n = seen.get(c.id, 0) + 1
        seen[c.id] = n
        if n > 1:
            c.id = f"{c.id}-{n}"
    return sorted(cases, key=lambda c: c.id)


def parse_shard(text) -> tuple:
    """``"K/N"`` -> (K, N) with 1 <= K <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text or ""))
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise InputError(f"--shard takes K/N with 1 <= K <= N (e.g. 3/10), got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard(cases: list, k: int, n: int) -> list:
    """Shard K of N: every N-th case of the list sorted by id, starting at the K-th (deterministic)."""
    ordered = sorted(cases, key=lambda c: c.id)
    return ordered[k - 1::n]
