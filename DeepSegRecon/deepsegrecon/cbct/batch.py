"""CBCT reconstruction in a batch: projection folders (geometry.json) or CT volumes to simulate from."""

from __future__ import annotations

from pathlib import Path

from ..batch import Adapter
from ..batch_cases import Case, find_images
from ..errors import InputError


class CbctAdapter(Adapter):
    task = "cbct-recon"

    def find(self, inputs, options):
        proj = []
        for item in inputs:
            root = Path(item).expanduser()
            if root.is_dir():
                proj += [p.parent for p in sorted(root.rglob("geometry.json"))]
        cases = [Case(f"{p.name}", {"projections": str(p)}) for p in proj]
        rest = [c for c in find_images(inputs, self.modalities, options.get("pattern"))
                if not any(Path(c.inputs["image"]).is_relative_to(p) for p in proj)]
        for c in rest:
            c.inputs = {"ct": c.inputs.pop("image")}
            c.files = {"ct": c.files["image"]} if c.files else {}
            c.series = {"ct": c.series["image"]} if c.series else {}
        from ..batch_cases import unique_ids

        return unique_ids(cases + rest)

    def load(self, case, params):
        params = dict(params)
        if "projections" in case.inputs:
            from .projio import read_projections

            stack, geo = read_projections(Path(case.inputs["projections"]))
            params["geometry"] = geo.to_dict()
            return {"projections": stack}, params
        if not params.get("views"):
            raise InputError("cbct-recon from CT volumes simulates projections: give the number of views "
                             "(--set views=N)")
        images, _ = super().load(case, params)
        return images, params

    def write(self, result, images, case, folder, fmt):
        from ..files import json_text
        from ..io import write_image

        write_image(result.volumes["recon"], folder / "recon.nrrd")
        write_image(result.volumes["fdk"], folder / "fdk.nrrd")
        (folder / "metrics.json").write_text(json_text(result.report))

    def summary(self, result):
        m = result.report.get("metrics") or {}
        parts = [f"{label} PSNR {m[k]['psnr_db']:.2f} dB" for k, label in (("dif_gaussian", "DIF-Gaussian"),
                                                                           ("fdk", "FDK")) if m.get(k)]
        return "; ".join(parts) or f"{result.report.get('views', '?')} views"
