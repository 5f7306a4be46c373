"""``deepsegrecon cbct-recon (--projections DIR | --simulate-from CT --views N) -o OUT [--reference CT]``

Writes OUT/recon.nrrd (DIF-Gaussian, HU), OUT/fdk.nrrd (FDK, HU), OUT/metrics.json (PSNR, SSIM against the
reference when there is one, timings, geometry), OUT/preview.png, and with --simulate-from OUT/projections/
(projections.nrrd + geometry.json, readable again with --projections). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

COMMANDS = ["cbct-recon"]


def add_parsers(sub) -> None:
    from ..cli import add_series_option

    p = sub.add_parser("cbct-recon", help="sparse-view CBCT reconstruction (DIF-Gaussian) with an FDK baseline")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--projections", metavar="DIR", help="folder with geometry.json and projections.nrrd "
                     "(or one 2-D image per view)")
    src.add_argument("--simulate-from", metavar="CT", help="CT volume (HU) to simulate the projections from")
    p.add_argument("--views", type=int, metavar="N", help="number of simulated views (with --simulate-from)")
    p.add_argument("--detector", type=int, default=128, metavar="PX", help="simulated detector size (default 128)")
    p.add_argument("--arc", type=float, default=360.0, metavar="DEG", help="simulated arc: 360 or e.g. 180")
    p.add_argument("--no-noise", action="store_true", help="simulate without Poisson and electronic noise")
    p.add_argument("--photons", type=float, default=1e5, help="unattenuated photons per pixel (noise level)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--reference", metavar="CT", help="reference CT on the reconstruction grid (PSNR, SSIM)")
    p.add_argument("--filter", choices=("ram-lak", "shepp-logan"), default="ram-lak", help="FDK ramp filter")
    p.add_argument("--refine-iters", type=int, metavar="N", help="data-consistency steps after the network "
                   "(default 4; 0: the network alone)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--model", metavar="VERSION", help="model version (default: the store's default)")
    add_series_option(p)
    p.set_defaults(func=cmd_cbct_recon)


def cmd_cbct_recon(args) -> int:
    from ..cli import ProgressPrinter
    from ..errors import InputError
    from ..files import check_writable_dir, json_text, staged_outputs
    from ..io import check_series_used, read_image, write_image
    from ..worker import model_for_job, run_inline
    from .preview import write_preview
    from .projio import read_projections, write_projections

    t0 = time.monotonic()
    out = Path(args.output).expanduser().absolute()
    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; -o needs a folder")
    params = {"device": args.device, "filter": args.filter}
    if args.refine_iters is not None:
        params["refine_iters"] = args.refine_iters
    images = {}
    if args.projections:
        if args.views is not None:
            raise InputError("--views is for --simulate-from; the projection folder has its own geometry")
        stack, geo = read_projections(Path(args.projections).expanduser())
        images["projections"] = stack
        params["geometry"] = geo.to_dict()
    else:
        if args.views is None:
            raise InputError("--simulate-from needs --views N")
        images["ct"] = read_image(Path(args.simulate_from).expanduser(), series=args.series)
        params.update(views=args.views, detector=args.detector, arc_deg=args.arc, noise=not args.no_noise,
                      photons=args.photons, seed=args.seed, keep_projections=True)
    if args.reference:
        images["reference"] = read_image(Path(args.reference).expanduser(), series=args.series)
    check_series_used(args.series, images.values())
    task_validate(images, params)  # every input problem before loading weights or writing anything
    model = model_for_job("cbct-recon", images, {**params, "model": args.model})
    params["model"] = model.version
    result = run_inline("cbct-recon", images, params, progress=ProgressPrinter(), model=model)
    report = result.report
    with staged_outputs(out) as stage:
        write_image(result.volumes["recon"], stage / "recon.nrrd")
        write_image(result.volumes["fdk"], stage / "fdk.nrrd")
        if "projections" in result.volumes:
            from .geometry import ConeGeometry

            write_projections(stage / "projections", result.volumes["projections"],
                              ConeGeometry.from_dict(report["geometry"]))
        (stage / "metrics.json").write_text(json_text(report))
        rows = {}
        ref = images.get("reference", images.get("ct"))
        sp = result.volumes["recon"].spacing
        if ref is not None:
            rows["reference"] = (ref.array, sp)
        m = report.get("metrics") or {}
        steps = report.get("refine_iters") or 0
        for key, label in (("fdk", "FDK"), ("recon", "DIF-Gaussian" + (f" + {steps} data-consistency steps"
                                                                       if steps else ""))):
            mm = m.get("fdk" if key == "fdk" else "dif_gaussian")
            rows[label + (f"  {mm['psnr_db']:.1f} dB, SSIM {mm['ssim']:.3f}" if mm else "")] = \
                (result.volumes[key].array, sp)
        write_preview(rows, stage / "preview.png", title=f"{report['views']} views")
        written = sorted(p.name for p in stage.iterdir())
    for key in ("dif_gaussian", "dif_gaussian_network_only", "fdk"):
        if m.get(key):
            print(f"{key}: PSNR {m[key]['psnr_db']:.2f} dB, SSIM {m[key]['ssim']:.4f}")
    for name in written:
        print(f"  {out / name}")
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def task_validate(images: dict, params: dict) -> None:
    from ..task import get_task

    task = get_task("cbct-recon")
    task.validate(images, {**task.default_params(), **params})
