"""``deepsegrecon xray-register`` and ``deepsegrecon drr`` (imports nothing heavy at module level).

    deepsegrecon drr --ct CT --pose JSON -o OUT [--sdd MM] [--size H W] [--pixel-spacing X [Y]] [--sid MM]
    deepsegrecon xray-register --ct CT --xray XRAY -o OUT [--train-minutes M] [--init-pose JSON]
                      [--truth-pose JSON] [--landmarks JSON] [--sdd MM] [--pixel-spacing X [Y]] ...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

COMMANDS = ["xray-register", "drr"]


def _carm_args(p, defaults: bool) -> None:
    p.add_argument("--sdd", type=float, default=1020.0 if defaults else None, metavar="MM",
                   help="source-to-detector distance" + (" (default 1020)" if defaults else
                                                          " (default: the file's DistanceSourceToDetector)"))
    p.add_argument("--pixel-spacing", type=float, nargs="+", metavar="MM",
                   help="detector pixel size x [y]" + (" (default 400 mm / size)" if defaults else
                                                       " (default: the file's ImagerPixelSpacing/PixelSpacing)"))
    p.add_argument("--sid", type=float, metavar="MM", help="source-to-isocentre distance (default 0.833 x SDD)")
    p.add_argument("--view", choices=("AP", "PA"), help="start view (default: the file's ViewPosition, else AP)")
    p.add_argument("--x0", type=float, default=None, metavar="MM", help="principal point offset x")
    p.add_argument("--y0", type=float, default=None, metavar="MM", help="principal point offset y")


def add_parsers(sub) -> None:
    from ..cli.common import add_series_option

    d = sub.add_parser("drr", help="render a synthetic X-ray (DRR) of a CT at a known pose")
    d.add_argument("--ct", required=True, help="CT volume (HU)")
    d.add_argument("--pose", required=True, metavar="JSON", help="pose file: parameterization, rotation, translation")
    d.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (OUT/drr.nrrd)")
    d.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"), help="detector pixels")
    d.add_argument("--bone-attenuation", type=float, default=1.0, help="bone contrast multiplier (default 1)")
    d.add_argument("--ct-spacing", type=float, default=0.0, metavar="MM", help="downsample the CT first (0: no)")
    _carm_args(d, True)
    add_series_option(d)
    d.set_defaults(func=cmd_drr)

    r = sub.add_parser("xray-register", help="register an X-ray to a CT (DiffPose: regressor + NCC refinement)")
    r.add_argument("--ct", required=True, help="CT volume (HU)")
    r.add_argument("--xray", required=True, help="X-ray: DICOM file, or an image written by 'deepsegrecon drr'")
    r.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    r.add_argument("--train-minutes", type=float, default=10.0, metavar="M",
                   help="train the patient's pose regressor this long when the store has none (0: do not)")
    r.add_argument("--train-steps", type=int, default=None, help=__import__("argparse").SUPPRESS)
    r.add_argument("--levels", type=int, nargs="+", metavar="N", help="refinement levels as SIZE ITERATIONS pairs "
                   "(default 32 60 64 40 128 12)")
    r.add_argument("--init-pose", metavar="JSON", help="start the refinement from this pose")
    r.add_argument("--truth-pose", metavar="JSON", help="known pose: adds mTRE and geodesic distances to the report")
    r.add_argument("--landmarks", metavar="JSON", help="CT landmark points (LPS mm, a list of [x, y, z]) for mTRE")
    r.add_argument("--values", choices=("auto", "intensity", "attenuation"), default="auto",
                   help="X-ray pixel values: detector intensity (log-inverted) or attenuation (auto: from DICOM)")
    r.add_argument("--size", type=int, default=128, help="registration resolution (longer side, default 128)")
    r.add_argument("--ct-spacing", type=float, default=3.0, metavar="MM", help="CT voxel size for rendering")
    r.add_argument("--bone-attenuation", type=float, default=1.0, help="bone contrast of the DRRs (default 1)")
    r.add_argument("--parameterization", default="se3_log_map", help="regressor pose parameterisation")
    r.add_argument("--convention", default=None, help="Euler convention (with euler_angles)")
    _carm_args(r, False)
    add_series_option(r)
    r.set_defaults(func=cmd_register)


def _carm_params(args) -> dict:
    out = {}
    for key in ("sdd", "sid", "view", "x0", "y0"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    if args.pixel_spacing is not None:
        ps = list(args.pixel_spacing)
        if len(ps) not in (1, 2):
            from ..errors import InputError

            raise InputError("--pixel-spacing takes one or two numbers (x [y])")
        out["pixel_spacing"] = ps * 2 if len(ps) == 1 else ps
    return out


def cmd_drr(args) -> int:
    from ..cli.common import ProgressPrinter
    from ..files import check_writable_dir, json_text, staged_outputs
    from ..io import check_series_used, read_image
    from ..runner import run_inline
    from .geometry import read_pose_file
    from .outputs import write_drr

    out = Path(args.output).expanduser().absolute()
    check_writable_dir(out)
    pose = read_pose_file(args.pose)
    ct = read_image(Path(args.ct).expanduser(), series=args.series)
    check_series_used(args.series, [ct])
    h, w = args.size
    params = {"pose": pose, "height": h, "width": w, "bone_attenuation": args.bone_attenuation,
              "ct_spacing_mm": args.ct_spacing, **_carm_params(args)}
    if "pixel_spacing" not in params:
        params["pixel_spacing"] = [400.0 / max(h, w)] * 2
    result = run_inline("drr", {"ct": ct}, params, progress=ProgressPrinter())
    carm = result.report["carm"]
    with staged_outputs(out) as stage:
        write_drr(result.volumes["drr"], carm, stage / "drr.nrrd")
        (stage / "pose.json").write_text(json_text(result.report["pose"]))
    print(f"DRR {w} x {h} px at {carm['delx']:.3f} x {carm['dely']:.3f} mm, SDD {carm['sdd']} mm: {out / 'drr.nrrd'}")
    return 0


def cmd_register(args) -> int:
    import numpy as np

    from ..cli.common import ProgressPrinter
    from ..errors import InputError
    from ..files import check_writable_dir, json_text, staged_outputs
    from ..io import check_series_used, read_image
    from ..runner import run_inline
    from .geometry import read_pose_file
    from .outputs import write_drr, write_preview, write_transform
    from .xrayio import read_xray

    t0 = time.monotonic()
    out = Path(args.output).expanduser().absolute()
    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; -o needs a folder")
    params = {"train_minutes": args.train_minutes, "values": args.values, "size": args.size,
              "ct_spacing_mm": args.ct_spacing, "parameterization": args.parameterization,
              "convention": args.convention, "bone_attenuation": args.bone_attenuation}
    if args.train_steps:
        params["train_steps"] = args.train_steps
    if args.levels:
        if len(args.levels) % 2:
            raise InputError("--levels takes SIZE ITERATIONS pairs")
        params["levels"] = [args.levels[i:i + 2] for i in range(0, len(args.levels), 2)]
    for key, value in (("init_pose", args.init_pose), ("truth_pose", args.truth_pose)):
        if value:
            params[key] = read_pose_file(value)
    if args.landmarks:
        try:
            pts = np.asarray(json.loads(Path(args.landmarks).read_text()), float).reshape(-1, 3)
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"--landmarks {args.landmarks}: a JSON list of [x, y, z] points is needed ({e})") from e
        params["landmarks"] = pts.tolist()
    print(f"reading {args.xray}", file=sys.stderr, flush=True)
    xray, info = read_xray(Path(args.xray).expanduser())
    for key in ("sdd", "sid", "view", "x0", "y0", "photometric"):
        if info.get(key) is not None:
            params[key] = info[key]
    if info.get("values") and args.values == "auto":
        params["values"] = info["values"]
    if info.get("pixel_spacing") is not None:
        params["pixel_spacing"] = list(info["pixel_spacing"])
    params.update(_carm_params(args))
    if params.get("pixel_spacing") is None:
        raise InputError(f"the pixel spacing of {Path(args.xray).name} is 0 or missing: give --pixel-spacing MM")
    ct = read_image(Path(args.ct).expanduser(), series=args.series)
    check_series_used(args.series, [ct])
    result = run_inline("xray-register", {"ct": ct, "xray": xray}, params, progress=ProgressPrinter())
    with staged_outputs(out) as stage:
        write_transform(result.matrix_lps, stage / "pose.h5")
        write_drr(result.images["drr"], {**result.report["carm"], "delx": result.images["drr"].spacing[0],
                                         "dely": result.images["drr"].spacing[1]}, stage / "drr.nrrd")
        (stage / "report.json").write_text(json_text(result.report))
        write_preview(xray, result, stage / "preview.png")
    rep = result.report
    print(f"registered: NCC {rep['ncc']:.4f} after {rep['iterations']} iterations ({rep['refine_seconds']} s), "
          f"started from {rep['started_from']}")
    if "mtre_mm" in rep:
        print(f"mTRE {rep['mtre_mm']:.2f} mm (start {rep['start_mtre_mm']:.2f} mm), double geodesic "
              f"{rep['double_geodesic_mm']:.2f} mm")
    for name in ("pose.h5", "drr.nrrd", "report.json", "preview.png"):
        print(f"  {out / name}")
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0
