"""``deepsegrecon brain-tumor``, ``brain-phantom`` and ``train-brain-phantoms`` (nothing heavy imported here).

    deepsegrecon brain-tumor [--t1 P] [--t1c P] [--t2 P] [--flair P] -o OUT [--model V] [--device D]
                             [--labels regions|brats|brats2023]
    deepsegrecon brain-phantom --seed N -o DIR [--labels brats2023|brats2021]
    deepsegrecon train-brain-phantoms --out DIR [--minutes M] [--seed S]
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

COMMANDS = ["brain-tumor", "brain-phantom", "train-brain-phantoms"]
MODALITY_SUFFIX = re.compile(r"[-_.](t1n|t1c|t1ce|t1gd|t1|t2w|t2f|t2|flair|t1c?_?w?)$", re.IGNORECASE)


def case_stem(path) -> str:
    """Output name for an input file: its stem without a trailing modality tag (``-t1n``, ``_flair`` ...);
    a file named just after its modality gives its folder's name."""
    from ..files import output_stem

    stem = output_stem(path)
    bare = MODALITY_SUFFIX.sub("", stem)
    if bare.lower() in ("t1", "t1c", "t1n", "t1ce", "t2", "t2w", "t2f", "flair", ""):
        return Path(path).expanduser().absolute().parent.name or "brain"
    return bare


def cmd_brain_tumor(args) -> int:
    from ..cli.common import ProgressPrinter
    from ..errors import InputError
    from ..files import check_writable_dir, staged_outputs
    from ..io import check_series_used, read_image
    from ..runner import check_model, run_inline
    from .task import MODALITIES, check_inputs

    t0 = time.monotonic()
    out = Path(args.output).expanduser().absolute()
    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; -o needs a folder")
    paths = {m: Path(getattr(args, m)).expanduser() for m in MODALITIES if getattr(args, m)}
    if len(paths) < 2:
        raise InputError("brain-tumor needs at least two MRI inputs: --flair and --t1c (and --t1, --t2 if you have "
                         "them)")
    images = {}
    for m, p in paths.items():
        print(f"reading {m}: {p}", file=sys.stderr, flush=True)
        images[m] = read_image(p, series=args.series)
    check_series_used(args.series, images.values())
    check_inputs(images)
    if args.device != "cpu":
        from ..device import resolve_device

        resolve_device(args.device)
    model = check_model("brain-tumor", args.model)
    print(f"model brain-tumor {model.version}{' (built-in)' if model.builtin else ''}, device {args.device}",
          file=sys.stderr, flush=True)
    result = run_inline("brain-tumor", images, {"device": args.device, "model": model.version},
                        progress=ProgressPrinter(), model=model)

    from ..preview import write_preview
    from .outputs import write_brats_seg_nrrd, write_region_seg_nrrd, write_volumes_csv

    stem = case_stem(next(iter(paths.values())))
    ref = images[next(m for m in MODALITIES if m in images)]
    with staged_outputs(out) as stage:
        if args.labels == "regions":
            write_region_seg_nrrd(result, stage / f"{stem}.seg.nrrd")
        else:
            write_brats_seg_nrrd(result, stage / f"{stem}.seg.nrrd",
                                 "brats2021" if args.labels == "brats" else "brats2023")
        write_volumes_csv(result, stage / f"{stem}_volumes.csv")
        write_preview(ref, result, stage / f"{stem}_preview.png", title=f"{stem}: brain tumour")
        written = sorted(p.name for p in stage.iterdir())
    vols = result.report["volumes_ml"]
    used = result.report.get("inputs_used", [])
    print(f"inputs used: {', '.join(used)}" + (f" (missing: {', '.join(result.report['inputs_missing'])})"
                                               if result.report.get("inputs_missing") else ""))
    for name in ("enhancing_tumor", "tumor_core", "whole_tumor"):
        print(f"{name}: {vols[name]:.2f} mL")
    for entry in written:
        print(f"  {out / entry}")
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_brain_phantom(args) -> int:
    from ..files import check_writable_dir
    from .phantom import write_phantom

    out = check_writable_dir(Path(args.output).expanduser().absolute())
    info = write_phantom(args.seed, out, convention=args.labels)
    print(f"brain phantom seed {args.seed}: tumour volumes (mL) {info['volumes_ml']}")
    for f in info["files"]:
        print(f"  {f}")
    return 0


def cmd_train_brain(args) -> int:
    import torch

    from .train import train_from_phantoms

    torch.set_num_threads(max(1, args.threads))
    entry = train_from_phantoms(Path(args.out).expanduser(), minutes=args.minutes, seed=args.seed,
                                log=lambda m: print(m, file=sys.stderr, flush=True), wall_minutes=args.wall_minutes)
    print(f"trained: {entry.dir}")
    for key, m in (entry.manifest.get("metrics") or {}).items():
        print(f"  held-out phantoms, inputs {key}: WT {m['WT']:.3f}  TC {m['TC']:.3f}  ET {m['ET']:.3f}")
    return 0


def add_parsers(sub) -> None:
    from ..cli.common import add_series_option

    b = sub.add_parser("brain-tumor", help="segment a brain tumour (enhancing, core, whole) in co-registered MRI")
    for m, what in (("t1", "T1"), ("t1c", "contrast-enhanced T1 (required)"), ("t2", "T2"),
                    ("flair", "T2-FLAIR (required)")):
        b.add_argument(f"--{m}", metavar="P", help=f"{what} volume (.nii.gz, .nrrd, .mha or a DICOM folder)")
    b.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    b.add_argument("--model", metavar="V", help="model version (default: the store's default / newest)")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    b.add_argument("--labels", default="regions", choices=("regions", "brats", "brats2023"),
                   help="regions: overlapping enhancing_tumor / tumor_core / whole_tumor segments (default); "
                        "brats: one labelmap 1 necrosis, 2 oedema, 4 enhancing; brats2023: 3 enhancing")
    add_series_option(b)
    b.set_defaults(func=cmd_brain_tumor)

    p = sub.add_parser("brain-phantom", help="brain MRI tumour phantom: DIR/{t1,t1c,t2,flair}.nrrd + labels.seg.nrrd")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--labels", default="brats2023", choices=("brats2023", "brats2021"))
    p.set_defaults(func=cmd_brain_phantom)

    t = sub.add_parser("train-brain-phantoms", help="train the brain-tumour network on phantoms (CPU minutes)")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--minutes", type=float, default=20.0, help="CPU minutes of training (default 20)")
    t.add_argument("--wall-minutes", type=float, default=None, help="wall-clock cap (a shared machine)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=cmd_train_brain)
