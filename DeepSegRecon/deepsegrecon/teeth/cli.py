"""``deepsegrecon teeth``, ``phantom teeth`` and ``train-teeth-phantoms`` (nothing heavy imported here).

    deepsegrecon teeth INPUT -o OUT [--device auto|cpu|cuda|mps] [--model VERSION] [--mrb]
                      [--smoothing S] [--format stl|obj ...] [--series UID]
    deepsegrecon phantom teeth --seed N [--shape X Y Z] [--family F] -o DIR
    deepsegrecon train-teeth-phantoms --out DIR [--minutes M] [--device D] [--seed S]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..cli.common import ProgressPrinter, add_series_option
from ..errors import DeepSegReconError, InputError
from ..files import output_stem

COMMANDS = ["teeth", "phantom", "train-teeth-phantoms"]


def cmd_phantom_teeth(args) -> int:
    from ..files import check_writable_dir
    from .phantom import write_phantom

    out = check_writable_dir(Path(args.output))
    try:
        info = write_phantom(args.seed, out, shape=tuple(args.shape) if args.shape else None, family=args.family)
    except ValueError as e:
        if isinstance(e, DeepSegReconError):
            raise
        raise InputError(str(e)) from e
    info = info or {}
    print(f"phantom seed {args.seed} family {args.family}:")
    for key in ("cbct", "labels"):
        print(f"  {info.get(key, out / ('cbct.nrrd' if key == 'cbct' else 'labels.seg.nrrd'))}")
    if info.get("missing") is not None:
        print(f"  missing teeth: {' '.join(str(m) for m in info['missing']) or 'none'}")
    return 0


def cmd_teeth(args) -> int:
    from ..files import check_writable_dir, staged_outputs
    from ..io import check_series_used, read_image
    from ..runner import check_model, run_inline
    from ..validate import check_image

    t0 = time.monotonic()
    inp, out = Path(args.input).expanduser(), Path(args.output).expanduser().absolute()  # MRML wants full paths
    check_writable_dir(out)  # before any heavy work
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; -o needs a folder")
    formats = list(dict.fromkeys(args.format or ()))
    if args.smoothing is not None and not (0.0 <= args.smoothing <= 1.0):
        raise InputError(f"--smoothing must be between 0 and 1, got {args.smoothing}")
    stem = output_stem(inp)
    print(f"reading {inp}", file=sys.stderr, flush=True)
    image = read_image(inp, series=args.series)
    check_series_used(args.series, [image])
    check_image(image, f"input {inp.name}", ndim=3)
    if args.device != "cpu":
        from ..device import resolve_device

        resolve_device(args.device)  # a missing GPU is an input error, found before loading weights
    model = check_model("teeth", args.model)
    print(f"model teeth {model.version}{' (built-in)' if model.builtin else ''}, device {args.device}",
          file=sys.stderr, flush=True)

    from ..task import get_task

    task = get_task("teeth")
    name = task.inputs[0].name if task.inputs else "image"
    params = {"device": args.device, "model": model.version}
    result = run_inline("teeth", {name: image}, params, progress=ProgressPrinter(), model=model)

    from ..preview import write_preview
    from ..scene.export import export_segmentation_result
    from ..segio import write_seg_nrrd

    smoothing = 0.5 if args.smoothing is None else args.smoothing
    print("writing results", file=sys.stderr, flush=True)
    with staged_outputs(out) as stage:
        write_seg_nrrd(result, stage / f"{stem}.seg.nrrd", smoothing=smoothing)
        exported = export_segmentation_result(result, image, stage, stem, formats=formats, mrb=args.mrb,
                                              smoothing=smoothing) or {}
        write_preview(image, result, stage / f"{stem}_preview.png", surfaces=exported.get("surfaces"))
        written = sorted(p.name for p in stage.iterdir())

    teeth = sorted(s.label for s in result.segments if s.name.startswith("tooth_"))
    absent = sorted(a for a in result.absent if str(a).startswith("tooth_"))
    other = [s.name for s in result.segments if not s.name.startswith("tooth_")]
    print(f"{inp.name}: {len(teeth)} {'tooth' if len(teeth) == 1 else 'teeth'} found (FDI): "
          f"{' '.join(str(t) for t in teeth) or 'none'}")
    print(f"absent teeth: {' '.join(str(a).removeprefix('tooth_') for a in absent) or 'none'}")
    implausible = result.report.get("dropped_implausible") or []
    if implausible:
        print(f"dropped {len(implausible)} implausible piece{'s' if len(implausible) != 1 else ''} "
              "(not counted as teeth):")
        for d in implausible:
            print(f"  numbered {d['numbered_as']} at LPS ({', '.join(f'{c:.0f}' for c in d['centroid_lps'])}) mm, "
                  f"{d['volume_mm3']:.0f} mm3: {d['reason']}")
    if other:
        print(f"other segments: {', '.join(other)}")
    for entry in written:
        print(f"  {out / entry}")
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_train_teeth(args) -> int:
    from .train import train_from_phantoms

    kwargs = {k: v for k, v in (("minutes", args.minutes), ("device", args.device), ("seed", args.seed)) if v is not None}
    out = train_from_phantoms(Path(args.out), **kwargs)
    if out is not None:
        print(f"trained: {getattr(out, 'dir', out)}")
    return 0


def add_parsers(sub) -> None:
    ph = sub.add_parser("phantom", help="write a synthetic phantom with ground truth")
    phs = ph.add_subparsers(dest="kind", metavar="{teeth}")
    phs.required = True
    pt = phs.add_parser("teeth", help="dental CBCT phantom: DIR/cbct.nrrd and DIR/labels.seg.nrrd")
    pt.add_argument("--seed", type=int, required=True, help="random seed (the same seed gives the same phantom)")
    pt.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="voxels along i, j, k")
    pt.add_argument("--family", default="A", help="phantom family (A or B: scanner and anatomy variants)")
    pt.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    pt.set_defaults(func=cmd_phantom_teeth)

    t = sub.add_parser("teeth", help="segment teeth (FDI), maxilla and mandible in a dental CBCT")
    t.add_argument("input", metavar="INPUT", help="CBCT volume (.nrrd, .nii.gz, .mha) or a DICOM folder")
    t.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    t.add_argument("--model", metavar="VERSION", help="model version (default: the store's default / newest)")
    t.add_argument("--mrb", action="store_true", help="also write OUT/<name>.mrb (volume + segmentation scene)")
    t.add_argument("--smoothing", type=float, default=None, metavar="S", help="surface smoothing 0..1 (default 0.5)")
    t.add_argument("--format", nargs="+", choices=("stl", "obj"), default=["stl"], metavar="{stl,obj}",
                   help="surface file formats (default stl)")
    add_series_option(t)
    t.set_defaults(func=cmd_teeth)

    tr = sub.add_parser("train-teeth-phantoms", help="train the teeth networks on synthetic phantoms")
    tr.add_argument("--out", required=True, metavar="DIR")
    tr.add_argument("--minutes", type=float)
    tr.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    tr.add_argument("--seed", type=int)
    tr.set_defaults(func=cmd_train_teeth)
