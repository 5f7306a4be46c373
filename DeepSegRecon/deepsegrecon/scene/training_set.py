"""The training set of a task, scene side: a corrected segmentation and its input volume(s) -> one case folder
(:func:`deepsegrecon.training.cases.write_case`: all of it or nothing), with the reviewed region as its ROI mask.
:class:`~deepsegrecon.scene.training.TrainingLogic` takes these methods (``training_root``, ``modalities``,
``task_name``, ``scene`` and ``_label_map`` are its)."""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import Image
from ._mrml import np_matrix, slicer_module, vtk_matrix, world_matrix_of
from .segmentations import BINARY_LABELMAP, segmentation_node_to_labelmap
from .volumes import volume_node_to_image

OUTSIDE_TOLERANCE = 0.005  # fraction of labelled voxels that may lie outside the volume (edge rounding)
_SAFE = re.compile(r"[^A-Za-z0-9_.+\-]+")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")  # task and case names


class TrainingSet:
    """The training-set half of :class:`~deepsegrecon.scene.training.TrainingLogic`."""

    @property
    def training_folder(self) -> Path:
        return self.training_root

    def case_names(self) -> list:
        """Names of the cases in the training-set folder (sub-folders with a ``case.json``), sorted."""
        from ..training.cases import CASE_MANIFEST

        root = self.training_root
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "_")) and (p / CASE_MANIFEST).is_file())

    def case_count(self) -> int:
        return len(self.case_names())

    def required_modalities(self) -> list | None:
        """The input names a case must have: ``modalities`` if given, else those of the first existing case."""
        if self.modalities:
            return list(self.modalities)
        from ..training.cases import CASE_MANIFEST

        for name in self.case_names():
            try:
                inputs = json.loads((self.training_root / name / CASE_MANIFEST).read_text(encoding="utf-8"))["inputs"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(inputs, dict) and inputs:
                return list(inputs)
        return None

    def add_to_training_set(self, inputs: dict, segmentation_node, roi=None, case_name: str = None,
                            overwrite: bool = False) -> Path:
        """Write ``inputs`` ({modality: volume node}) and ``segmentation_node`` as a new training case; its folder.

        ``roi``: the reviewed region: a segment ID of ``segmentation_node`` (that segment is the region, not a
        label), a labelmap volume node (non-zero voxels), another segmentation node (all its segments), or a
        markups ROI node (the box); None: the whole volume was reviewed. ``case_name``: the folder name (default
        ``<volume name>-<date-time>``). Raises :class:`InputError` with nothing written and no node added for an
        empty segmentation, a segmentation not on the volume, a missing modality, an empty or outside ROI, or
        segments the model does not know.
        """
        from ..training.cases import write_case

        slicer = slicer_module()
        images, ref_node, ref = self._case_images(inputs)

        # ---- the label, on the grid of the first input
        if segmentation_node is None or not isinstance(segmentation_node, slicer.vtkMRMLSegmentationNode):
            raise InputError("choose the corrected segmentation to add (a segmentation node)")
        if segmentation_node.GetScene() is not self.scene:
            raise InputError(f"segmentation '{segmentation_node.GetName()}' is not in this scene")
        seg_name = segmentation_node.GetName()
        segmentation = segmentation_node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if not ids:
            raise InputError(f"segmentation '{seg_name}' is empty: it has no segments")
        roi_segment = None
        if isinstance(roi, str):
            if roi not in ids:
                raise InputError(f"segmentation '{seg_name}' has no segment '{roi}' to use as the reviewed region; "
                                 f"its segments: {', '.join(ids)}")
            roi_segment = roi
        label_ids = [i for i in ids if i != roi_segment]
        if not label_ids:
            raise InputError(f"segmentation '{seg_name}' has no segment besides the reviewed-region segment "
                             f"'{roi_segment}'")
        own, _ = segmentation_node_to_labelmap(segmentation_node)  # the segmentation's own grid, in world space
        if not np.any(own.array):
            raise InputError(f"segmentation '{seg_name}' is empty: none of its segments has a voxel; correct the "
                             "segmentation in the Segment Editor first")
        labelled, outside = _voxels_outside(own, ref)
        vol_name = ref_node.GetName()
        if outside >= labelled:
            raise InputError(f"segmentation '{seg_name}' does not overlap the volume '{vol_name}': it was drawn on "
                             "another image; choose the volume it was drawn on")
        if outside > OUTSIDE_TOLERANCE * labelled:
            raise InputError(f"{100.0 * outside / labelled:.1f}% of the labelled voxels of segmentation '{seg_name}' "
                             f"lie outside the volume '{vol_name}': it is not on this volume's geometry (drawn on "
                             "another image, or moved by a transform); choose the volume it was drawn on")
        resampled = not _same_lattice(own, ref)
        regions = self._region_label(segmentation_node, label_ids, ref_node, ref)
        if regions is not None:  # overlapping region segments (e.g. ET/TC/WT): the model's labels from them
            label, label_names = regions
        else:
            source = segmentation_node if roi_segment is None else _segments_copy(segmentation_node, label_ids)
            label, infos = segmentation_node_to_labelmap(source, ref_node)
            if not np.any(label.array):
                raise InputError(f"segmentation '{seg_name}' has no labelled voxel on the grid of the volume "
                                 f"'{vol_name}'")
            label_names = self._label_names(seg_name, label, infos)
            label = label_names.pop("__image__")

        # ---- the reviewed region
        roi_image, roi_kind = self._roi_mask(roi, segmentation_node, roi_segment, ref_node, ref)

        # ---- the case folder
        folder = self._case_folder(case_name, vol_name, overwrite)
        meta = {
            "source": {"volumes": {m: n.GetName() for m, n in inputs.items()}, "segmentation": seg_name},
            "task": self.task_name,
            "model_version": self.active_version(),
            "roi": roi_kind,
            "label_resampled": bool(resampled),
            "segments": sorted(label_names, key=label_names.get),
            "added_by": "DeepSegRecon TrainingLogic.add_to_training_set",
        }
        if resampled:
            meta["segmentation_grid"] = {"shape": list(own.array.shape), "spacing": list(own.spacing)}
        write_case(folder, images, label, label_names, roi=roi_image, meta=meta, overwrite=overwrite)
        self.last_case = {"folder": folder, "label_resampled": bool(resampled), "roi": roi_kind,
                          "label_names": dict(label_names)}
        return folder

    def _case_images(self, inputs):
        slicer = slicer_module()
        if not isinstance(inputs, dict) or not inputs:
            raise InputError("choose the input volume(s) of the case")
        required = self.required_modalities()
        if required:
            missing = [m for m in required if inputs.get(m) is None]
            if missing:
                raise InputError(f"the case lacks the input volume for modality {', '.join(repr(m) for m in missing)}"
                                 f" (the {self.task_name} training set uses {', '.join(required)})")
            extra = [m for m in inputs if m not in required]
            if extra:
                raise InputError(f"modality {', '.join(repr(m) for m in extra)} is not used by the {self.task_name} "
                                 f"training set (it uses {', '.join(required)})")
            inputs = {m: inputs[m] for m in required}
        images = {}
        for modality, node in inputs.items():
            if node is None:
                raise InputError(f"no volume selected for the modality '{modality}'")
            if not isinstance(node, slicer.vtkMRMLScalarVolumeNode) or isinstance(node, slicer.vtkMRMLLabelMapVolumeNode):
                raise InputError(f"the input '{modality}' must be a scalar volume node (an image, not a labelmap)")
            if node.GetScene() is not self.scene:
                raise InputError(f"volume '{node.GetName()}' is not in this scene")
            img = volume_node_to_image(node)
            if img.ndim != 3 or min(img.array.shape) < 1:
                raise InputError(f"volume '{node.GetName()}' is not a 3-D image")
            images[modality] = img
        first = next(iter(inputs))
        ref = images[first]
        for modality, img in images.items():
            if not img.same_grid(ref):
                raise InputError(f"volume '{inputs[modality].GetName()}' ({modality}) is not on the grid of "
                                 f"'{inputs[first].GetName()}' ({first}): resample it onto that volume first")
        return images, inputs[first], ref

    def _label_names(self, seg_name: str, label: Image, infos: list) -> dict:
        """{segment name: value}; with the model's label map known, values are the model's and unknown names are
        refused. The relabelled image is returned under the key ``"__image__"``."""
        names = [s.name for s in infos]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"segmentation '{seg_name}' has several segments named {dup}; rename them so each "
                             "structure has one segment")
        known = self._label_map()
        if not known:
            out = {s.name: int(s.label) for s in infos}
            out["__image__"] = label
            return out
        unknown = [n for n in names if n not in known]
        if unknown:
            shown = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
            raise InputError(f"segments {unknown} of '{seg_name}' are not labels of the {self.task_name} model "
                             f"(it knows {shown}); remove or rename them in the Segment Editor")
        arr = label.array
        hi = int(arr.max())
        lut = np.zeros(hi + 1, dtype=np.int64)
        for s in infos:
            if 0 < int(s.label) <= hi:
                lut[int(s.label)] = known[s.name]
        values = lut[arr]
        dtype = np.uint8 if values.max() < 256 else (np.uint16 if values.max() < 65536 else np.int32)
        out = {s.name: int(known[s.name]) for s in infos}
        out["__image__"] = label.with_array(values.astype(dtype))
        return out

    def _region_label(self, seg_node, ids: list, ref_node, ref: Image):
        """(label Image on the reference grid, {name: value}) from the task's region hook
        (``capability.region_label_hook``) when the segments are its overlapping regions, each read on its own;
        else None."""
        from ..capability import region_label_hook

        hook = region_label_hook(self.task_name)
        if hook is None:
            return None
        segmentation = seg_node.GetSegmentation()
        names = {segmentation.GetSegment(i).GetName(): i for i in ids}

        def read_mask(name):
            region, _ = segmentation_node_to_labelmap(_segments_copy(seg_node, [names[name]]), ref_node)
            return np.asarray(region.array) > 0

        out = hook(seg_node.GetName(), list(names), self._label_map() or {}, read_mask)
        if out is None:
            return None
        array, label_names = out
        return ref.with_array(array), label_names

    def _roi_mask(self, roi, seg_node, roi_segment, ref_node, ref: Image):
        """(uint8 mask Image on the reference grid or None, a word for case.json)."""
        slicer = slicer_module()
        if roi is None:
            return None, None
        if roi_segment is not None:
            only, _ = segmentation_node_to_labelmap(_segments_copy(seg_node, [roi_segment]), ref_node)
            mask, kind, what = only.array > 0, f"segment {roi_segment}", f"the segment '{roi_segment}'"
        elif isinstance(roi, slicer.vtkMRMLMarkupsROINode):
            mask, kind, what = _box_mask(roi, ref), "markups ROI", f"the ROI '{roi.GetName()}'"
        elif isinstance(roi, slicer.vtkMRMLSegmentationNode):
            if roi is seg_node:
                raise InputError("the reviewed region cannot be the corrected segmentation itself; choose a segment "
                                 "of it, another segmentation, a labelmap or an ROI box")
            if roi.GetScene() is not self.scene:
                raise InputError(f"segmentation '{roi.GetName()}' is not in this scene")
            region, _ = segmentation_node_to_labelmap(roi, ref_node)
            mask, kind, what = region.array > 0, "segmentation", f"the segmentation '{roi.GetName()}'"
        elif isinstance(roi, slicer.vtkMRMLVolumeNode):
            if roi.GetScene() is not self.scene:
                raise InputError(f"volume '{roi.GetName()}' is not in this scene")
            img = volume_node_to_image(roi)
            mask = img.array > 0 if img.same_grid(ref) else _sample_nearest(img, ref) > 0
            kind, what = "labelmap", f"the labelmap '{roi.GetName()}'"
        else:
            raise InputError("the reviewed region must be a segment ID, a labelmap volume, a segmentation or a "
                             f"markups ROI node, not {type(roi).__name__}")
        if not np.any(mask):
            raise InputError(f"{what} marks no voxel of the volume '{ref_node.GetName()}' as reviewed: it is empty or "
                             "outside the volume")
        return ref.with_array(mask.astype(np.uint8)), kind

    def _case_folder(self, case_name, volume_name: str, overwrite: bool) -> Path:
        if case_name is not None:
            case_name = str(case_name)
            if not SAFE_NAME.match(case_name) or case_name.lower().startswith("staging"):
                raise InputError(f"'{case_name}' cannot be a case name: use letters, digits, '.', '_', '+' or '-' "
                                 "(starting with a letter or digit)")
            folder = self.training_root / case_name
            if folder.exists() and not overwrite:
                raise InputError(f"the training set already has a case '{case_name}' ({folder}); choose another name")
            return folder
        base = _SAFE.sub("_", volume_name).strip("._-+") or "case"
        base = f"{base[:60]}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        folder, n = self.training_root / base, 2
        while folder.exists():
            folder, n = self.training_root / f"{base}-{n}", n + 1
        return folder


# ------------------------------------------------------------------------------------------ geometry helpers
def _segments_copy(seg_node, keep_ids: list):
    """A segmentation node outside any scene holding only ``keep_ids``, with the node's world transform applied
    to its labelmaps (so the copy lies where the original is displayed)."""
    slicer = slicer_module()
    world = world_matrix_of(seg_node, "segmentation")
    copy = slicer.vtkMRMLSegmentationNode()
    segmentation = copy.GetSegmentation()
    segmentation.DeepCopy(seg_node.GetSegmentation())
    for i in reversed(range(segmentation.GetNumberOfSegments())):
        sid = segmentation.GetNthSegmentID(i)
        if sid not in keep_ids:
            segmentation.RemoveSegment(sid)
    if not np.allclose(world, np.eye(4)):
        done = set()
        for i in range(segmentation.GetNumberOfSegments()):
            layer = segmentation.GetNthSegment(i).GetRepresentation(BINARY_LABELMAP)
            if layer is None:
                continue
            key = layer.GetAddressAsString("vtkOrientedImageData")
            if key in done:
                continue
            done.add(key)
            import vtk

            m = vtk.vtkMatrix4x4()
            layer.GetImageToWorldMatrix(m)
            layer.SetImageToWorldMatrix(vtk_matrix(world @ np_matrix(m)))
    return copy


def _same_lattice(a: Image, b: Image, tol: float = 1e-4) -> bool:
    """Same spacing and axes, and an origin a whole number of voxels away: the grids share their voxels."""
    if not (np.allclose(a.spacing, b.spacing, atol=tol) and np.allclose(a.direction, b.direction, atol=tol)):
        return False
    offset = np.linalg.solve(b.direction @ np.diag(b.spacing), np.subtract(a.origin, b.origin))
    return bool(np.allclose(offset, np.round(offset), atol=1e-3))


def _voxels_outside(labels: Image, ref: Image) -> tuple:
    """(labelled voxels of ``labels``, how many of their centres lie outside the voxel box of ``ref``)."""
    to_ref = np.linalg.inv(ref.ijk_to_ras()) @ labels.ijk_to_ras()
    size = np.array(ref.size, dtype=float)  # (i, j, k)
    total = outside = 0
    arr = labels.array
    for k in range(arr.shape[0]):
        jj, ii = np.nonzero(arr[k])
        if not len(ii):
            continue
        pts = np.c_[ii, jj, np.full(len(ii), k), np.ones(len(ii))] @ to_ref.T
        out = np.any((pts[:, :3] < -0.5 - 1e-3) | (pts[:, :3] > size - 0.5 + 1e-3), axis=1)
        total += len(ii)
        outside += int(out.sum())
    return total, outside


def _ref_points(ref: Image, k: int) -> np.ndarray:
    """RAS positions (j*i, 3) of the voxel centres of slice ``k`` of ``ref``."""
    nk, nj, ni = ref.array.shape
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    ijk = np.c_[ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)]
    return (ijk @ ref.ijk_to_ras().T)[:, :3]


def _sample_nearest(src: Image, ref: Image) -> np.ndarray:
    """``src`` sampled at the voxel centres of ``ref`` (nearest neighbour, 0 outside), as a (k, j, i) array."""
    out = np.zeros(ref.array.shape, dtype=src.array.dtype)
    to_src = np.linalg.inv(src.ijk_to_ras())
    size = np.array(src.size)
    for k in range(ref.array.shape[0]):
        pts = np.c_[_ref_points(ref, k), np.ones(ref.array.shape[1] * ref.array.shape[2])] @ to_src.T
        idx = np.floor(pts[:, :3] + 0.5).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < size), axis=1)
        values = np.zeros(len(idx), dtype=src.array.dtype)
        values[ok] = src.array[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
        out[k] = values.reshape(ref.array.shape[1:])
    return out


def _box_mask(roi_node, ref: Image) -> np.ndarray:
    """Voxels of ``ref`` whose centres lie inside a markups ROI box (its orientation and transforms applied)."""
    radius = [0.0, 0.0, 0.0]
    roi_node.GetRadiusXYZ(radius)
    if min(radius) <= 0 or roi_node.GetNumberOfControlPoints() == 0:
        raise InputError(f"the ROI '{roi_node.GetName()}' is not placed yet (it has no size); place it around the "
                         "reviewed region first")
    parent = roi_node.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        raise InputError(f"the ROI '{roi_node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                         "harden or remove the transform first")
    to_box = np.linalg.inv(np_matrix(roi_node.GetObjectToWorldMatrix()))
    r = np.asarray(radius) + 1e-6
    mask = np.zeros(ref.array.shape, dtype=bool)
    for k in range(ref.array.shape[0]):
        p = np.c_[_ref_points(ref, k), np.ones(ref.array.shape[1] * ref.array.shape[2])] @ to_box.T
        mask[k] = np.all(np.abs(p[:, :3]) <= r, axis=1).reshape(ref.array.shape[1:])
    return mask
