"""Segment Teeth in a batch: the default reading and writing; the summary lists the teeth found."""

from __future__ import annotations

from ..batch import Adapter


class TeethAdapter(Adapter):
    task = "teeth"

    def summary(self, result) -> str:
        teeth = result.report.get("teeth_found") or []
        return f"{len(teeth)} teeth: {' '.join(str(t) for t in teeth)}".strip()
