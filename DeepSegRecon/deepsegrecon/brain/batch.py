"""Brain tumour segmentation in a batch: the four MR inputs of a case found together."""

from __future__ import annotations

from pathlib import Path

from ..batch import Adapter, write_segmentation
from ..batch_cases import find_brain


class BrainAdapter(Adapter):
    task = "brain-tumor"
    modalities = ("MR",)

    def find(self, inputs, options):
        return find_brain(inputs)

    def load(self, case, params):
        from ..io import read_image
        from .task import MODALITIES, check_inputs

        images = {m: read_image(Path(case.inputs[m]), series=case.series.get(m)) for m in MODALITIES
                  if m in case.inputs}
        check_inputs(images)
        return images, dict(params)

    def write(self, result, images, case, folder, fmt):
        from ..results import SegmentationResult
        from . import labels as L
        from .outputs import write_region_seg_nrrd, write_volumes_csv

        first = next(iter(images))  # the result is on the first input's grid
        if fmt == "dicom-seg" or (fmt == "auto" and first in case.files):
            present = [v for v in (L.NCR, L.ED, L.ET) if (result.labelmap.array == v).any()]
            sub = SegmentationResult(result.labelmap, L.subregion_infos(present, "brats2023"), [], result.report)
            write_segmentation(sub, case, folder, "dicom-seg", first, self.task)
        else:
            write_region_seg_nrrd(result, folder / f"{case.id}.seg.nrrd")
        write_volumes_csv(result, folder / f"{case.id}_volumes.csv")

    def summary(self, result):
        v = result.report.get("volumes_ml") or {}
        return "; ".join(f"{k} {float(v[k]):.2f} mL" for k in ("enhancing_tumor", "tumor_core", "whole_tumor")
                         if k in v)
