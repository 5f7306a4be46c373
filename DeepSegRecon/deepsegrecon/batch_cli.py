"""``deepsegrecon batch TASK INPUT... -o OUT [--shard K/N] [--jobs N] [--format F] [--set KEY=VALUE ...]``

Runs :func:`deepsegrecon.batch.run_batch`: progress on stderr, one line per case and the totals on stdout, exit 0
when no case failed, else the highest exit code of the failed cases (2 input, 3 model, 5 resources, 1 other),
4 when cancelled.
"""

from __future__ import annotations

import argparse
import json

COMMANDS = ["batch"]


def _settings(items) -> dict:
    from .errors import InputError

    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise InputError(f"--set takes KEY=VALUE, got '{item}'")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value  # a plain word
    return out


def cmd_batch(args) -> int:
    from .batch import find_cases, run_batch
    from .batch_cases import parse_shard, shard

    params = _settings(args.settings)
    for key in ("model", "device"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.list:
        from .worker import _import_plugin

        for plugin in args.plugin or ():
            _import_plugin(plugin)
        k, n = parse_shard(args.shard or "1/1")
        for case in shard(find_cases(args.task, args.inputs, args.pattern), k, n):
            print(f"{case.id}\t" + "\t".join(f"{m}={p}" for m, p in case.inputs.items()))
        return 0
    if not args.output:
        from .errors import InputError

        raise InputError("batch needs -o OUT (or --list)")
    job = {}
    if args.job_dir:  # a background batch (deepsegrecon.batch_job): cancel flag file and status file there
        from pathlib import Path

        from .task import CancelToken

        job = {"cancel": CancelToken(flag_file=Path(args.job_dir) / "cancel"),
               "status_file": Path(args.job_dir) / "status.json"}
    summary = run_batch(args.task, args.inputs, args.output, params, shard=args.shard or "1/1", jobs=args.jobs,
                        fmt=args.format, pattern=args.pattern, preview=args.preview, plugins=args.plugin or (),
                        **job)
    cancelled = ", cancelled" if summary.cancelled else ""
    print(f"{summary.total} case{'' if summary.total == 1 else 's'}: {summary.done} done, {summary.skipped} skipped "
          f"(finished before), {summary.failed} failed{cancelled} in {summary.seconds:.1f} s; "
          f"{summary.out / 'batch.csv'}")
    for r in summary.records:
        if r["status"] == "failed":
            print(f"  failed {r['case']}: {r['error']}")
    return summary.exit_code


def add_parsers(sub) -> None:
    from .capability import batch_tasks

    p = sub.add_parser("batch", help="run a task over many cases in one process (resumable, shardable, DICOM SEG)")
    p.add_argument("task", metavar="TASK", help=f"one of {', '.join(batch_tasks())}")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively: image "
                   "files and DICOM series), brain: case folders / DICOM studies / a CSV (case,t1,t1c,t2,flair); "
                   "xray-register: a CSV (case,ct,xray[,truth_pose,init_pose,landmarks])")
    p.add_argument("-o", "--output", metavar="OUT", help="output folder: OUT/<case>/ and OUT/batch.csv")
    p.add_argument("--shard", metavar="K/N", help="run only shard K of N (a job array: K = the task index)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes (default 1: this process)")
    p.add_argument("--format", default="auto", choices=("auto", "seg.nrrd", "dicom-seg"),
                   help="segmentations: auto = DICOM SEG for DICOM inputs, .seg.nrrd otherwise")
    p.add_argument("--model", metavar="VERSION", help="model version (default: the store's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="settings",
                   help="a task parameter (JSON value), e.g. views=10 for cbct-recon; repeatable")
    p.add_argument("--pattern", metavar="GLOB", help="take only image files whose name matches (e.g. 'cbct*.nrrd')")
    p.add_argument("--preview", action="store_true", help="also write a PNG preview per segmentation")
    p.add_argument("--list", action="store_true", help="list the cases (of the shard) and exit")
    p.add_argument("--plugin", action="append", metavar="MODULE|FILE.py", help="import a module that registers "
                   "more tasks (repeatable)")
    p.add_argument("--job-dir", help=argparse.SUPPRESS)  # background batch: DIR/cancel, DIR/status.json
    p.set_defaults(func=cmd_batch)
