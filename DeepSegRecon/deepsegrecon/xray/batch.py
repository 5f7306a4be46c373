"""X-ray to CT registration in a batch: CT / X-ray pairs from a CSV."""

from __future__ import annotations

import json
from pathlib import Path

from ..batch import Adapter
from ..batch_cases import read_case_csv
from ..errors import InputError


class XrayAdapter(Adapter):
    """CT / X-ray pairs from a CSV (columns ct, xray; optional case, truth_pose, init_pose, landmarks). The CT is
    read once for all its X-rays; the task keeps the CT's trained pose regressor in the model store, so only the
    first X-ray of a CT trains it."""

    task = "xray-register"

    def __init__(self):
        self._ct = (None, None)

    def find(self, inputs, options):
        cases = []
        for item in inputs:
            p = Path(item).expanduser()
            if p.suffix.lower() != ".csv" or not p.is_file():
                raise InputError(f"xray-register batch takes CSV files of CT/X-ray pairs (columns ct,xray), "
                                 f"not {p}")
            cases += read_case_csv(p, ("ct", "xray"), need=2, required=("ct", "xray"))
        from ..batch_cases import unique_ids

        return unique_ids(cases)

    def load(self, case, params):
        import numpy as np

        from ..io import read_image
        from .geometry import read_pose_file
        from .xrayio import read_xray

        params = dict(params)
        xray, info = read_xray(Path(case.inputs["xray"]))
        for key in ("sdd", "sid", "view", "x0", "y0", "photometric"):
            if info.get(key) is not None:
                params.setdefault(key, info[key])
        if info.get("values") and params.get("values", "auto") == "auto":
            params["values"] = info["values"]
        if info.get("pixel_spacing") is not None:
            params.setdefault("pixel_spacing", list(info["pixel_spacing"]))
        if params.get("pixel_spacing") is None:
            raise InputError(f"the pixel spacing of {Path(case.inputs['xray']).name} is 0 or missing: "
                             "give --set pixel_spacing=[X,Y]")
        for key in ("truth_pose", "init_pose"):
            if case.params.get(key):
                params[key] = read_pose_file(Path(case.params[key]))
        if case.params.get("landmarks"):
            try:
                pts = json.loads(Path(case.params["landmarks"]).read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"landmarks {case.params['landmarks']}: a JSON list of [x, y, z] points is "
                                 f"needed ({e})") from e
            params["landmarks"] = np.asarray(pts, float).reshape(-1, 3).tolist()
        ct_path = str(Path(case.inputs["ct"]).resolve())
        if self._ct[0] != ct_path:  # one CT read for all its X-rays (cases are sorted; a CSV groups them)
            self._ct = (ct_path, read_image(Path(ct_path)))
        return {"ct": self._ct[1], "xray": xray}, params

    def write(self, result, images, case, folder, fmt):
        from ..files import json_text
        from .outputs import write_drr, write_transform

        write_transform(result.matrix_lps, folder / "pose.h5")
        drr = result.images["drr"]
        write_drr(drr, {**result.report["carm"], "delx": drr.spacing[0], "dely": drr.spacing[1]}, folder / "drr.nrrd")
        (folder / "report.json").write_text(json_text(result.report))

    def summary(self, result):
        r = result.report
        return f"NCC {r['ncc']:.4f}" + (f", mTRE {r['mtre_mm']:.2f} mm" if "mtre_mm" in r else "")
