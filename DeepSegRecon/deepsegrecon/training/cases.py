"""Training cases: folders of image file(s) plus one label file, read lazily.

A case is a folder. Two layouts are understood:

* **A folder users already have** (BraTS, exports from other tools): image files matched to modality names by
  glob patterns (``{"flair": "*FLAIR*.nii.gz", "t1c": "*t1c*"}``; case-insensitive; the default
  ``{"image": "*"}`` wants exactly one image file besides the label), and one label file found by
  ``label_pattern`` (default: ``*.seg.nrrd``, then ``*label*``, then ``*seg*``).
* **A case written by** :func:`write_case` (the "Add to training set" action): ``case.json`` lists the inputs,
  the label file, the label names and values, and an optional ROI mask meaning "only these voxels were
  reviewed" (voxels outside it are left out of the training loss).

Labels may be a Slicer ``.seg.nrrd`` (segment names and label values are read from it; Slicer may save the
segmentation cropped to its content, which is put back on the image grid), or a NIfTI / NRRD / MHA labelmap.
A ``label_map`` (``{"tooth_11": 11, ...}``, or a JSON / CSV / Slicer colour-table file mapping values to names)
fixes the label values training uses:

* labels that carry names (``.seg.nrrd`` segments, ``case.json`` label names) are matched **by name** and
  re-valued to the map's values, so cases whose files number segments differently still agree;
* plain labelmaps are read **by value**: every non-zero value must be one of the map's values.

Anything not in the map is refused (a clear :class:`InputError` naming the case), never silently dropped.

:func:`load_case` / :func:`find_cases` only look at file names (and ``case.json``); :meth:`Case.load` reads the
voxels and checks them, so a data set never holds every case in memory. :func:`check_cases` reads each case
once, one at a time, to refuse bad cases before any training starts. Nothing here writes anything, except
:func:`write_case`, which writes a whole case or nothing.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import Image
from .labels import _normalise_map, read_label_map

CASE_MANIFEST = "case.json"
CASE_FORMAT = "deepsegrecon.case"
DEFAULT_MODALITIES = {"image": "*"}
DEFAULT_LABEL_PATTERNS = ("*.seg.nrrd", "*label*", "*seg*")
IMAGE_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
_RESERVED = {"label", "roi", "case"}


# ----------------------------------------------------------------------------------------------------------
# cases


@dataclass
class CaseData:
    """A case read into memory: images in modality order, the label on their grid, an optional ROI mask."""

    name: str
    images: dict  # modality -> Image, in modality order
    label: Image  # integer labels (values of the label map when one was given)
    label_names: dict  # name -> value, for the labels this case's file declares
    roi: Image | None = None  # uint8 mask: 1 = reviewed voxel, 0 = leave out of the loss
    folder: Path | None = None


@dataclass
class Case:
    """A case folder: paths only. :meth:`load` reads and checks the voxels."""

    folder: Path
    inputs: dict  # modality -> Path, in modality (channel) order
    label_file: Path
    label_map: dict | None = None  # {name: value} expected by the task, or None
    label_names: dict | None = None  # {name: value} of the label file, from case.json
    roi_file: Path | None = None
    manifest: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def modalities(self) -> list:
        return list(self.inputs)

    def __repr__(self) -> str:
        return f"Case({self.name!r}, inputs={list(self.inputs)}, label={self.label_file.name!r})"

    def _err(self, message: str) -> InputError:
        return InputError(f"case '{self.name}': {message}")

    def load(self) -> CaseData:
        """Read the images, label and ROI, and check them; raise :class:`InputError` naming the case."""
        images = {}
        ref_name = None
        for modality, path in self.inputs.items():
            img = self._read(path, f"modality '{modality}'")
            if img.ndim != 3:
                raise self._err(f"modality '{modality}' ({path.name}) is {img.ndim}-D; a 3-D image is needed")
            if ref_name is None:
                ref_name = modality
            elif not img.same_grid(images[ref_name]):
                raise self._err(f"modality '{modality}' ({path.name}) is not on the grid of '{ref_name}': "
                                f"{_grid_difference(img, images[ref_name])}")
            if img.array.dtype.kind == "f" and not np.all(np.isfinite(img.array)):
                raise self._err(f"modality '{modality}' ({path.name}) has NaN or infinite voxels")
            images[modality] = img
        ref = images[ref_name]
        label, names = self._read_label(ref)
        if not np.any(label.array):
            raise self._err(f"the label {self.label_file.name} is empty: no voxel has a non-zero label")
        roi = None
        if self.roi_file is not None:
            r = self._read(self.roi_file, "ROI mask")
            if not r.same_grid(ref):
                raise self._err(f"the ROI mask {self.roi_file.name} is not on the image grid: "
                                f"{_grid_difference(r, ref)}")
            roi = r.with_array((r.array > 0).astype(np.uint8))
            if not roi.array.any():
                raise self._err(f"the ROI mask {self.roi_file.name} is empty: no voxel was marked as reviewed")
        return CaseData(self.name, images, label, names, roi, self.folder)

    def check(self) -> None:
        """Read the case once and discard it (raises :class:`InputError` if it cannot be used)."""
        self.load()

    def _read(self, path: Path, what: str) -> Image:
        from ..io import read_image

        try:
            return read_image(path)
        except InputError as e:
            raise self._err(f"{what}: {e}") from e
        except Exception as e:  # noqa: BLE001 - any reader failure on a user file is bad input
            raise self._err(f"{what}: cannot read {path.name} ({type(e).__name__}: {e})") from e

    def _read_label(self, ref: Image):
        from .. import segio

        path = self.label_file
        try:
            is_seg = segio.is_seg_nrrd(path)
            if is_seg:
                lab = segio.read_seg_nrrd(path)
        except InputError as e:
            raise self._err(f"label: {e}") from e
        except Exception as e:  # noqa: BLE001 - a damaged label file is bad input
            raise self._err(f"label: cannot read {path.name} ({type(e).__name__}: {e})") from e
        if is_seg:
            img = _embed(lab.labelmap, ref)
            if img is None:
                raise self._err(f"the label {path.name} does not match the image grid: "
                                f"{_grid_difference(lab.labelmap, ref)}")
            return self._apply_names(img, {s.name: int(s.label) for s in lab.segments})
        lab = self._read(path, "label")
        if lab.ndim != 3 or not lab.same_grid(ref):
            raise self._err(f"the label {path.name} does not match the image grid: {_grid_difference(lab, ref)}")
        try:
            lab = lab.with_array(segio.label_array(lab.array))
        except InputError as e:
            raise self._err(f"label {path.name}: {e}") from e
        if self.label_names:
            return self._apply_names(lab, dict(self.label_names))
        values = [int(v) for v in np.unique(lab.array) if v != 0]
        if any(v < 0 for v in values):
            raise self._err(f"the label {path.name} has negative values {[v for v in values if v < 0]}")
        if self.label_map is None:
            return lab, {f"label_{v}": v for v in values}
        known = set(self.label_map.values())
        unknown = [v for v in values if v not in known]
        if unknown:
            raise self._err(f"label values {unknown} in {path.name} are not in the label map "
                            f"(it knows {_short(sorted(known))})")
        return lab, {n: v for n, v in self.label_map.items() if v in values}

    def _apply_names(self, lab: Image, named: dict):
        """Re-value a label whose values carry names (``named``: name -> value in the file) to the label map."""
        src = lab.array
        present = set(int(v) for v in np.unique(src) if v != 0)
        stray = sorted(present - set(named.values()))
        if stray:
            raise self._err(f"label values {stray} in {self.label_file.name} have no name")
        if self.label_map is None:
            return lab, named
        unknown = [n for n in named if n not in self.label_map]
        if unknown:
            raise self._err(f"segments {unknown} of {self.label_file.name} are not in the label map "
                            f"(it knows {_short(sorted(self.label_map))})")
        out_dtype = np.uint8 if max(self.label_map.values()) < 256 else np.int32
        out = np.zeros(src.shape, dtype=out_dtype)
        for name, value in named.items():
            if value in present:
                out[src == value] = self.label_map[name]
        return lab.with_array(out), {n: self.label_map[n] for n in named}


def _short(items, n: int = 12) -> str:
    items = list(items)
    s = ", ".join(str(i) for i in items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _grid_difference(a: Image, b: Image) -> str:
    parts = []
    if a.array.shape != b.array.shape:
        parts.append(f"shape {a.array.shape} vs {b.array.shape}")
    if not np.allclose(a.spacing, b.spacing, atol=1e-4):
        parts.append(f"spacing {tuple(round(s, 4) for s in a.spacing)} vs {tuple(round(s, 4) for s in b.spacing)}")
    if not np.allclose(a.origin, b.origin, atol=1e-3):
        parts.append(f"origin {tuple(round(s, 3) for s in a.origin)} vs {tuple(round(s, 3) for s in b.origin)}")
    if a.direction.shape != b.direction.shape or not np.allclose(a.direction, b.direction, atol=1e-4):
        parts.append("direction differs")
    return ", ".join(parts) or "geometry differs"


def _embed(lab: Image, ref: Image) -> Image | None:
    """``lab`` on the grid of ``ref``: equal grids, or a sub-/super-box of it (Slicer crops a saved
    segmentation to its content) with the same spacing and axes and a whole-voxel offset. ``None`` if it
    cannot be placed without resampling, or if labelled voxels would fall outside ``ref``."""
    if lab.ndim != 3:
        return None
    if lab.same_grid(ref):
        return lab
    if not (np.allclose(lab.spacing, ref.spacing, atol=1e-4) and np.allclose(lab.direction, ref.direction, atol=1e-4)):
        return None
    off_ijk = np.linalg.solve(ref.direction @ np.diag(ref.spacing), np.subtract(lab.origin, ref.origin))
    if not np.allclose(off_ijk, np.round(off_ijk), atol=1e-3):
        return None
    off = np.round(off_ijk).astype(int)[::-1]  # (k, j, i)
    src = lab.array
    out = np.zeros(ref.array.shape, dtype=src.dtype)
    lo_dst = np.maximum(off, 0)
    hi_dst = np.minimum(off + src.shape, out.shape)
    if np.any(hi_dst <= lo_dst):
        return None
    lo_src, hi_src = lo_dst - off, hi_dst - off
    inner = src[tuple(slice(a, b) for a, b in zip(lo_src, hi_src))]
    if np.count_nonzero(inner) != np.count_nonzero(src):
        return None  # labelled voxels outside the image
    out[tuple(slice(a, b) for a, b in zip(lo_dst, hi_dst))] = inner
    return ref.with_array(out)


# ----------------------------------------------------------------------------------------------------------
# finding cases


def _suffix(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s):
            return s
    return ""


def _match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatch(name.lower(), pattern.lower())


def _image_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.is_file() and _suffix(p.name))


def load_case(folder, modalities: dict | None = None, label_map=None, label_pattern: str | None = None,
              roi_pattern: str | None = None) -> Case:
    """The case in ``folder`` (paths only; nothing is read but ``case.json``).

    ``modalities``: ``{name: glob pattern}`` in channel order (default ``{"image": "*"}``, or the inputs listed
    in ``case.json``); ``label_map``: ``{name: value}``, ``{value: name}`` or a label-map file (see
    :func:`read_label_map`); ``label_pattern``: the label file's pattern (default: ``*.seg.nrrd``, ``*label*``,
    ``*seg*``, first that matches); ``roi_pattern``: an optional ROI mask file's pattern.
    """
    folder = Path(folder)
    name = folder.name
    if not folder.is_dir():
        raise InputError(f"case folder {folder} does not exist")
    lmap = read_label_map(label_map)
    manifest_path = folder / CASE_MANIFEST
    if manifest_path.is_file():
        return _load_manifest_case(folder, manifest_path, modalities, lmap)

    files = _image_files(folder)
    label_file = _find_label(folder, files, label_pattern)
    roi_file = None
    if roi_pattern:
        roi_file = _find_one(folder, [f for f in files if f != label_file], roi_pattern, "ROI mask")
    candidates = [f for f in files if f not in (label_file, roi_file) and _suffix(f.name) != ".seg.nrrd"]
    inputs = {}
    for modality, pattern in (modalities or DEFAULT_MODALITIES).items():
        matches = [f for f in candidates if _match(f.name, pattern)]
        if not matches:
            raise InputError(f"case '{name}' has no file for modality '{modality}' (pattern '{pattern}'; "
                             f"image files there: {_short(f.name for f in candidates) or 'none'})")
        if len(matches) > 1:
            raise InputError(f"case '{name}': the pattern '{pattern}' of modality '{modality}' matches several "
                             f"files ({_short(f.name for f in matches)}); give a more specific pattern")
        inputs[modality] = matches[0]
    used = list(inputs.values())
    dup = sorted({p.name for p in used if used.count(p) > 1})
    if dup:
        raise InputError(f"case '{name}': {dup} matched more than one modality; give more specific patterns")
    return Case(folder, inputs, label_file, lmap, None, roi_file, {})


def _find_one(folder: Path, files: list, pattern: str, what: str) -> Path:
    matches = [f for f in files if _match(f.name, pattern)]
    if not matches:
        raise InputError(f"case '{folder.name}' has no {what} file (pattern '{pattern}')")
    if len(matches) > 1:
        raise InputError(f"case '{folder.name}': several files match the {what} pattern '{pattern}': "
                         f"{_short(f.name for f in matches)}")
    return matches[0]


def _find_label(folder: Path, files: list, pattern: str | None) -> Path:
    if pattern:
        return _find_one(folder, files, pattern, "label")
    for p in DEFAULT_LABEL_PATTERNS:
        matches = [f for f in files if _match(f.name, p)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InputError(f"case '{folder.name}': several files look like the label ({_short(f.name for f in matches)}); "
                             "give the label file pattern")
    raise InputError(f"case '{folder.name}' has no label file (looked for {', '.join(DEFAULT_LABEL_PATTERNS)}; "
                     "give the label file pattern)")


def _load_manifest_case(folder: Path, manifest_path: Path, modalities: dict | None, lmap) -> Case:
    name = folder.name
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"case '{name}': {CASE_MANIFEST} is damaged ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("inputs"), dict) or not manifest.get("label"):
        raise InputError(f"case '{name}': {CASE_MANIFEST} must list 'inputs' and 'label'")

    def path_of(rel, what) -> Path:
        p = folder / str(rel)
        if Path(str(rel)).is_absolute() or ".." in Path(str(rel)).parts:
            raise InputError(f"case '{name}': {CASE_MANIFEST} names {what} '{rel}' outside the case folder")
        if not p.is_file():
            raise InputError(f"case '{name}': {CASE_MANIFEST} names {what} '{rel}', which does not exist")
        return p

    listed = manifest["inputs"]
    inputs = {}
    if modalities is None:
        inputs = {m: path_of(f, f"input '{m}'") for m, f in listed.items()}
    else:
        files = _image_files(folder)
        for modality, pattern in modalities.items():
            if modality in listed:
                inputs[modality] = path_of(listed[modality], f"input '{modality}'")
                continue
            matches = [f for f in files if _match(f.name, pattern) and f.name not in (manifest["label"], manifest.get("roi"))]
            if len(matches) != 1:
                raise InputError(f"case '{name}' has no file for modality '{modality}' (pattern '{pattern}'; "
                                 f"{CASE_MANIFEST} lists {_short(listed) or 'no inputs'})")
            inputs[modality] = matches[0]
    label_file = path_of(manifest["label"], "label file")
    roi_file = path_of(manifest["roi"], "ROI mask") if manifest.get("roi") else None
    names = manifest.get("label_names")
    if names is not None:
        names = _normalise_map(names, f"case '{name}': label_names in {CASE_MANIFEST}")
    return Case(folder, inputs, label_file, lmap, names, roi_file, manifest)


def _skip_folder(name: str) -> bool:
    low = name.lower()
    return name.startswith((".", "_")) or low.startswith("staging") or name.endswith("~")


def find_cases(root, modalities: dict | None = None, label_map=None, label_pattern: str | None = None,
               roi_pattern: str | None = None) -> list:
    """Every case under ``root``: its sub-folders (sorted, hidden ``.*`` / ``_*`` and staging folders skipped,
    folders with no image file skipped), or ``root`` itself when it is a case. Arguments as :func:`load_case`."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"cases folder {root} does not exist or is not a folder")
    lmap = read_label_map(label_map)
    kw = dict(modalities=modalities, label_map=lmap, label_pattern=label_pattern, roi_pattern=roi_pattern)
    if (root / CASE_MANIFEST).is_file():
        return [load_case(root, **kw)]
    cases = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not _skip_folder(p.name)):
        if (sub / CASE_MANIFEST).is_file() or _image_files(sub):
            cases.append(load_case(sub, **kw))
    if not cases and _image_files(root):
        return [load_case(root, **kw)]
    if not cases:
        raise InputError(f"no cases in {root}: expected one folder per case holding the image file(s) and a label "
                         "file (or a case.json)")
    return cases


def check_cases(cases, cancel=None, progress=None) -> None:
    """Read every case once, one at a time (nothing is kept), so a bad case is refused before training."""
    for n, case in enumerate(cases):
        if cancel is not None:
            cancel.raise_if_cancelled()
        case.check()
        if progress is not None:
            progress((n + 1) / len(cases))


# ----------------------------------------------------------------------------------------------------------
# writing a case


def write_case(folder, images: dict, label: Image, label_names: dict, roi: Image | None = None,
               meta: dict | None = None, overwrite: bool = False) -> Case:
    """Write a training case atomically: all of it appears at ``folder`` or nothing does.

    ``images``: ``{modality: Image}`` (one grid); ``label``: integer labels on that grid, every non-zero value
    named in ``label_names`` (``{name: value}``); ``roi``: optional mask of the reviewed voxels; ``meta``: extra
    provenance (``source``, ...) kept in ``case.json``. Files: ``<modality>.nrrd``, ``label.seg.nrrd`` (opens in
    Slicer as a segmentation with the names), ``roi.nrrd``, ``case.json``. Bad input raises
    :class:`InputError` before anything is written; an existing case is replaced only with ``overwrite``.
    """
    from .. import segio
    from ..files import check_writable_dir
    from ..io import write_image
    from ..results import SegmentationResult, SegmentInfo

    folder = Path(folder)
    name = folder.name
    if not isinstance(images, dict) or not images:
        raise InputError(f"case '{name}': at least one input image is needed")
    ref = None
    for modality, img in images.items():
        if not isinstance(modality, str) or not _SAFE_NAME.match(modality) or modality.lower() in _RESERVED:
            raise InputError(f"case '{name}': '{modality}' cannot be a modality name (use letters, digits, '_', "
                             f"'-', '.', not {sorted(_RESERVED)})")
        if not isinstance(img, Image) or img.ndim != 3:
            raise InputError(f"case '{name}': modality '{modality}' must be a 3-D image")
        if ref is not None and not img.same_grid(ref):
            raise InputError(f"case '{name}': modality '{modality}' is not on the grid of the first input: "
                             f"{_grid_difference(img, ref)}")
        ref = ref or img
    if not isinstance(label, Image) or not label.same_grid(ref):
        what = _grid_difference(label, ref) if isinstance(label, Image) else "not an image"
        raise InputError(f"case '{name}': the label does not match the image grid: {what}")
    lab = segio.label_array(label.array)
    names = _normalise_map(dict(label_names or {}), f"case '{name}': label names")
    values = set(int(v) for v in np.unique(lab) if v != 0)
    if not values:
        raise InputError(f"case '{name}': the label is empty: no voxel has a non-zero label")
    unnamed = sorted(values - set(names.values()))
    if unnamed:
        raise InputError(f"case '{name}': label values {unnamed} have no name in label_names")
    if roi is not None:
        if not isinstance(roi, Image) or not roi.same_grid(ref):
            what = _grid_difference(roi, ref) if isinstance(roi, Image) else "not an image"
            raise InputError(f"case '{name}': the ROI mask does not match the image grid: {what}")
        if not np.any(roi.array):
            raise InputError(f"case '{name}': the ROI mask is empty: no voxel was marked as reviewed")
    if folder.exists() and not overwrite:
        raise InputError(f"case folder {folder} already exists (choose another name, or overwrite it)")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a case folder")
    parent = folder.parent
    check_writable_dir(parent)
    parent.mkdir(parents=True, exist_ok=True)

    stage = Path(tempfile.mkdtemp(prefix=".staging-case-", dir=parent))
    trash = None
    try:
        inputs = {}
        for modality, img in images.items():
            write_image(img, stage / f"{modality}.nrrd")
            inputs[modality] = f"{modality}.nrrd"
        present = {n: v for n, v in names.items()}
        segments = [SegmentInfo(n, v, segio.default_color(i)) for i, (n, v) in enumerate(sorted(present.items(), key=lambda kv: kv[1]))]
        segio.write_seg_nrrd(SegmentationResult(label.with_array(lab), segments), stage / "label.seg.nrrd")
        if roi is not None:
            write_image(roi.with_array((np.asarray(roi.array) > 0).astype(np.uint8)), stage / "roi.nrrd")
        meta = dict(meta or {})
        manifest = {
            "format": CASE_FORMAT,
            "format_version": 1,
            "name": name,
            "inputs": inputs,
            "label": "label.seg.nrrd",
            "label_names": names,
            "roi": "roi.nrrd" if roi is not None else None,
            "source": meta.pop("source", None),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "shape": list(ref.array.shape),
            "spacing": list(ref.spacing),
            "meta": meta,
        }
        (stage / CASE_MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default), encoding="utf-8")
        if folder.exists():
            trash = Path(tempfile.mkdtemp(prefix=".replaced-case-", dir=parent))
            os.replace(folder, trash / "old")
        os.replace(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if trash is not None and (trash / "old").exists() and not folder.exists():
            os.replace(trash / "old", folder)  # put the previous case back
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return load_case(folder)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
