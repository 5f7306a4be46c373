"""``deepsegrecon cbct-recon (--projections DIR | --simulate-from CT --views N) -o OUT [--reference CT]``

Writes OUT/recon.nrrd (the chosen ``--method``, HU), OUT/fdk.nrrd (FDK, HU), one OUT/<method>.nrrd per compared
method, OUT/metrics.json (each method's PSNR, SSIM against the reference when there is one, its time, the backend,
the geometry), OUT/preview.png, and with --simulate-from OUT/projections/ (projections.nrrd + geometry.json,
readable again with --projections). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

COMMANDS = ["cbct-recon"]


def add_parsers(sub) -> None:
    from ..cli.common import add_series_option

    methods = ("dif-gaussian", "fdk", "sart", "cg", "admm-tv", "sart-unet")
    p = sub.add_parser("cbct-recon", help="sparse-view CBCT reconstruction (SART + U-Net refiner, DIF-Gaussian, "
                       "FDK, SART, conjugate gradient, ADMM-TV) side by side")
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
    p.add_argument("--method", choices=methods, help="the method written to recon.nrrd (default: the best "
                   "measured one, see the README)")
    p.add_argument("--compare", metavar="M,M", help="methods also run and reported (comma-separated, or 'none'; "
                   "default: all the backend runs)")
    p.add_argument("--backend", choices=("auto", "rtk", "torch"), default="auto", help="projector and classical "
                   "reconstructions: RTK (itk-rtk, CPU) or torch (auto: RTK when it imports, on the CPU)")
    p.add_argument("--filter", choices=("ram-lak", "shepp-logan", "hann"), default="hann", help="FDK ramp filter")
    p.add_argument("--refine-iters", type=int, metavar="N", help="data-consistency iterations after the network "
                   "(default: 8 SART iterations with RTK, 4 FDK-residual steps with torch; 0: the network alone)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--model", metavar="VERSION", help="model version (default: the store's default)")
    add_series_option(p)
    p.set_defaults(func=cmd_cbct_recon)


def cmd_cbct_recon(args) -> int:
    from ..cli.common import ProgressPrinter
    from ..errors import InputError
    from ..files import check_writable_dir, json_text, staged_outputs
    from ..io import check_series_used, read_image, write_image
    from ..runner import model_for_job, run_inline
    from .preview import write_preview
    from .projio import read_projections, write_projections

    t0 = time.monotonic()
    out = Path(args.output).expanduser().absolute()
    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; -o needs a folder")
    params = {"device": args.device, "filter": args.filter, "backend": args.backend, "method": args.method}
    if args.compare is not None:
        names = [] if args.compare.strip() == "none" else [m.strip() for m in args.compare.split(",") if m.strip()]
        params["compare"] = names
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
        for key, vol in result.volumes.items():
            if key != "projections":
                write_image(vol, stage / f"{key}.nrrd")
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
        tm = report.get("timings_s") or {}
        for name in report["methods"]:
            key = name.replace("-", "_")
            vol = result.volumes["recon" if name == report["method"] else key]
            label = ("DIF-Gaussian" + (" + data consistency" if report.get("refine_iters") else "")
                     if key == "dif_gaussian" else "SART + U-Net" if key == "sart_unet" else name.upper())
            label += (" (chosen)" if args.method else " (default)") if name == report["method"] else ""
            if m.get(key):
                label += f"  {m[key]['psnr_db']:.1f} dB, SSIM {m[key]['ssim']:.3f}"
            rows[label + f", {tm.get(key + '_s', 0):.1f} s"] = (vol.array, sp)
        write_preview(rows, stage / "preview.png", title=f"{report['views']} views, {report['backend']} backend")
        written = sorted(p.name for p in stage.iterdir())
    print(f"backend: {report['backend']}, method: {report['method']}")
    for why in report.get("skipped") or []:
        print(f"skipped: {why}")
    for key in sorted(m):
        print(f"{key}: PSNR {m[key]['psnr_db']:.2f} dB, SSIM {m[key]['ssim']:.4f}"
              + (f", {tm[key + '_s']:.1f} s" if key + "_s" in tm else ""))
    for name in written:
        print(f"  {out / name}")
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def task_validate(images: dict, params: dict) -> None:
    from ..task import get_task

    task = get_task("cbct-recon")
    task.validate(images, {**task.default_params(), **params})
