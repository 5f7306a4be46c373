"""Slice-wise organ segmentation in a batch: one CT per case, a .seg.nrrd (or DICOM SEG) out."""

from __future__ import annotations

from ..batch import Adapter, volumes_ml


class SlicesAdapter(Adapter):
    task = "slices"

    def summary(self, result) -> str:
        return "; ".join(f"{n} {v:.1f} mL" for n, v in volumes_ml(result).items()) or "no organ"
