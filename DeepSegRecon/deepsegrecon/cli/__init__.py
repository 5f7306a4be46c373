"""The ``deepsegrecon`` command. Every subcommand is a thin shell over tasks, the store and the writers.

    deepsegrecon models list [--task T]
    deepsegrecon models import (PATH | --url URL --sha256 H [--timeout S]) [--task T] [--version V] [--default]
    deepsegrecon models verify [TASK [VERSION]] [--deep]
    deepsegrecon models remove TASK VERSION
    deepsegrecon train TASK --cases DIR [--name V] [--epochs E | --minutes M] [--device D]
                      [--image NAME=PATTERN ...] [--label-map FILE] [--val-fraction F] [--seed S]
    deepsegrecon finetune TASK --cases DIR --base VERSION --name NEW [--minutes M | --epochs E] [--device D]
                      [--image NAME=PATTERN ...] [--label-map FILE] [--val-fraction F] [--seed S]
    deepsegrecon add-case TASK --image NAME=PATH [...] --label LABEL -o CASEDIR [--roi MASK] [--label-map FILE]
    deepsegrecon batch TASK INPUT... -o OUT [--shard K/N] [--jobs N] [--format F] [--set K=V ...]  (batch_cli.py)

Each capability owns its subcommands in ``<capability>/cli.py`` (``teeth``, ``phantom teeth``, ``slices``,
``cbct-recon``, ``xray-register``, ``brain-tumor`` ...); :mod:`.common` holds what they share.

``train`` / ``finetune`` run the engine's training tasks (:mod:`deepsegrecon.training.jobs`) in this process:
per-epoch progress (loss, validation Dice, ETA) on stderr; Ctrl-C cancels and writes nothing. The new
version appears in the user model store only when training has finished.

Errors the engine raises on purpose print ``error: <message>`` on stderr and exit with their code
(2 input, 3 model, 4 cancelled, 5 resources; 1 for anything unexpected). Ctrl-C and SIGTERM cancel (4); a full disk
and running out of memory, torch's too, are 5 (:func:`errors.resource_error`, the worker's map as well). Progress
goes to stderr, results and summaries to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .. import errors
from .._version import __version__
from ..errors import DeepSegReconError, InputError
from .common import add_series_option

VISIBLE_COMMANDS = ["models", "train", "finetune", "add-case"]


def _store():
    from ..store import ModelStore

    return ModelStore()


def cmd_models_list(args) -> int:
    store = _store()
    entries = store.list(args.task)
    if not entries:
        print(f"no models installed{f' for task {args.task}' if args.task else ''} "
              f"(user store {store.root}, built-in {store.builtin_root})")
        return 0
    defaults = {}
    for task in sorted({e.task for e in entries}):
        with contextlib.suppress(DeepSegReconError):
            defaults[task] = store.get(task).version
    rows = [("TASK", "VERSION", "DEFAULT", "SOURCE", "CREATED", "DESCRIPTION")]
    for e in entries:
        rows.append((e.task, e.version, "*" if defaults.get(e.task) == e.version else "",
                     "built-in" if e.builtin else "user", str(e.manifest.get("created") or "")[:19],
                     str(e.manifest.get("error") or e.manifest.get("description") or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def cmd_models_import(args) -> int:
    store = _store()
    if (args.path is None) == (args.url is None):
        raise InputError("give either a PATH or --url URL (with --sha256)")
    fields = {"description": args.description} if args.description else {}
    if args.url:
        if not args.sha256:
            raise InputError("--url needs --sha256 (the expected checksum of the download)")
        entry = store.import_url(args.url, args.sha256, args.task, args.version, default=args.default,
                                 deadline=args.timeout, **fields)
    else:
        if args.timeout is not None:
            raise InputError("--timeout applies to downloads (--url) only")
        entry = store.import_file(args.path, task=args.task, version=args.version, sha256=args.sha256,
                                  default=args.default, **fields)
    store.verify(entry)
    print(f"imported {entry.task} {entry.version} into {entry.dir}")
    chosen = store.get(entry.task).version
    print(f"default version of {entry.task}: {chosen}"
          + ("" if chosen == entry.version else " (to make it this one, import it with --default)"))
    return 0


def cmd_models_verify(args) -> int:
    from ..store import check_task, load_state_dict

    store = _store()
    entries = [store.get(args.task, args.version)] if args.version else store.list(args.task)
    if args.task and not entries:
        store.get(args.task)  # raises: no model for this task
    bad = 0
    for e in entries:
        try:
            check_task(e, e.task)
            store.verify(e)
            if args.deep:  # load every weight file, as a run would
                for name in e.files:
                    load_state_dict(e, name, e.task)
            print(f"ok      {e}")
        except DeepSegReconError as err:
            bad += 1
            print(f"FAILED  {e}: {err}")
    if bad:
        raise errors.ModelError(f"{bad} of {len(entries)} model versions failed verification"
                                + ("" if args.deep else " (checksums)"))
    if not entries:
        print("no models installed")
    return 0


def cmd_models_remove(args) -> int:
    _store().remove(args.task, args.version)
    print(f"removed {args.task} {args.version}")
    return 0


def cmd_models_average(args) -> int:
    entry = _store().average(args.task, args.versions, args.name, args.weights, description=args.description)
    print(f"averaged {', '.join(args.versions)} into {entry.task} {entry.version} ({entry.dir})")
    return 0


class TrainingProgressPrinter:
    """Training progress on stderr: every epoch (loss, validation Dice, ETA), every case checked, a batch line
    at most every ``every_s`` seconds, and each new stage."""

    def __init__(self, stream=None, every_s: float = 10.0):
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.last_stage, self.last_t = None, 0.0

    def __call__(self, event: dict) -> None:
        from ..progress import format_duration

        kind, stage, t = event.get("event"), event.get("stage"), time.monotonic()
        pct = f"{100 * (event.get('fraction') or 0):3.0f}%"
        eta = "" if event.get("eta_s") is None else f"  ETA {format_duration(event['eta_s'])}"
        if kind == "epoch":
            part = f"[{event['part']}] " if event.get("part") and event.get("part") != "model" else ""
            epochs = f"/{event['epochs']}" if event.get("epochs") else ""
            dice = event.get("val_dice")
            line = (f"{pct} {part}epoch {event.get('epoch')}{epochs}  loss {event.get('loss', float('nan')):.4f}"
                    f"  val Dice {'-' if dice is None else f'{dice:.3f}'}{eta}")
        elif kind == "iteration":
            if t - self.last_t < self.every_s and stage == self.last_stage:
                return
            line = f"{pct} {stage}  {event.get('message') or ''}{eta}"
        elif stage != self.last_stage or stage == "check cases" or kind == "done" or t - self.last_t >= self.every_s:
            line = f"{pct} {stage}  {event.get('message') or ''}{eta}".rstrip()
        else:
            return
        print(line, file=self.stream, flush=True)
        self.last_stage, self.last_t = stage, t


def _name_values(items, option: str) -> dict:
    out = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        if not sep or not name or not value:
            raise InputError(f"{option} takes NAME=VALUE, got '{item}'")
        if name in out:
            raise InputError(f"{option} {name} is given twice")
        out[name] = value
    return out


def _run_training(kind: str, args) -> int:
    from ..runner import run_inline
    from ..training import jobs  # noqa: F401  (registers the train and finetune tasks)
    from ..training.labels import read_label_map

    t0 = time.monotonic()
    name = args.name or time.strftime(f"{args.task}-%Y%m%d-%H%M%S")
    params = {"task": args.task, "cases": str(Path(args.cases).expanduser().absolute()), "name": name,
              "device": args.device}
    if kind == "finetune":
        params["base"] = args.base
    for key in ("epochs", "minutes", "val_fraction", "seed", "recipe"):
        if getattr(args, key, None) is not None:
            params[key] = getattr(args, key)
    if args.image:
        params["modalities"] = _name_values(args.image, "--image")
    if args.label_map:
        params["label_map"] = read_label_map(Path(args.label_map).expanduser())
    if args.stages:
        params["stages"] = list(args.stages)
    if args.settings:
        params["settings"] = _settings(args.settings)
    if args.evaluate:
        params["evaluate"] = True
    if getattr(args, "no_base_check", False):
        params["keep_better_base"] = False
    what = f"fine-tuning {args.task} {args.base} -> {name}" if kind == "finetune" else f"training {args.task} {name}"
    budget = (f"{args.minutes:g} min" if args.minutes is not None
              else f"{args.epochs} epochs" if args.epochs is not None else "the recipe's default epochs")
    print(f"{what} on {params['cases']} ({budget}, device {args.device})", file=sys.stderr, flush=True)
    result = run_inline(kind, {}, params, progress=TrainingProgressPrinter())
    m = result.manifest.get("metrics") or {}
    print(f"wrote model {result.task} {result.version}: {result.report.get('dir')}")
    for part, info in (m.get("parts") or {}).items():
        dice = info.get("best_val_dice")
        print(f"  {part}: {info.get('epochs')} epochs ({info.get('stopped')}), best validation Dice "
              f"{'-' if dice is None else f'{dice:.3f}'} (epoch {info.get('best_epoch')}), final loss "
              f"{info.get('final_loss')}")
    for note in result.report.get("notes") or ():
        print(f"  note: {note}")
    val = m.get("validation") or {}
    for which in ("base", "new"):
        if val.get(which):
            print(f"  {which} version on the validation cases: mean tooth Dice {val[which].get('mean_tooth_dice')}")
    print(f"run it with: --model {result.version}")
    print(f"done in {_fmt_s(time.monotonic() - t0)}", file=sys.stderr)
    return 0


def _settings(items) -> dict:
    """``KEY=VALUE`` (VALUE as JSON, else text; ``PART.KEY`` for one part) -> the jobs' ``settings`` dict."""
    import json

    out: dict = {}
    for key, text in _name_values(items, "--set").items():
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        part, dot, name = key.rpartition(".")
        (out.setdefault(part, {}) if dot else out)[name if dot else key] = value
    return out


def _fmt_s(s: float) -> str:
    from ..progress import format_duration

    return format_duration(s)


def cmd_train(args) -> int:
    return _run_training("train", args)


def cmd_finetune(args) -> int:
    return _run_training("finetune", args)


def cmd_add_case(args) -> int:
    """Write a training case (images + label [+ ROI]) with ``training.cases.write_case``."""
    import numpy as np

    from .. import segio
    from ..io import check_series_used, read_image
    from ..training.cases import _embed, write_case
    from ..training.labels import read_label_map

    task_map = _task_label_map(args.task)
    if task_map is None and not args.label_map:  # a typo, or a new structure: its labels must be named
        from ..capability import trainable_tasks

        raise InputError(f"task '{args.task}' has no labels of its own to check the case against (tasks with "
                         f"labels: {', '.join(trainable_tasks())}); for a new structure, give its label names and "
                         "values with --label-map FILE")
    images = {}
    for modality, path in _name_values(args.image, "--image").items():
        images[modality] = read_image(Path(path).expanduser(), series=args.series)
    if not images:
        raise InputError("give at least one --image NAME=PATH")
    check_series_used(args.series, images.values())
    ref = next(iter(images.values()))
    label_path = Path(args.label).expanduser()
    given = read_label_map(Path(args.label_map).expanduser()) if args.label_map else None
    seg = segio.read_seg_nrrd(label_path)
    if segio.is_seg_nrrd(label_path):  # named segments (Slicer): names from the file
        lab = _embed(seg.labelmap, ref)
        if lab is None:
            raise InputError(f"the label {label_path.name} does not match the grid of the image "
                             f"'{next(iter(images))}' (shape, spacing, origin or direction differ)")
        names = {s.name: int(s.label) for s in seg.segments}
    else:  # a plain labelmap: names by value from --label-map, else the task's
        lab = seg.labelmap
        by_value = {v: n for n, v in (given or task_map or {}).items()}
        values = sorted(int(v) for v in np.unique(lab.array) if v != 0)
        unnamed = [v for v in values if v not in by_value]
        if unnamed and (given or task_map):
            raise InputError(f"label values {unnamed} in {label_path.name} are not in the "
                             f"{'label map' if given else args.task + ' labels'}")
        names = {by_value.get(v, f"label_{v}"): v for v in values}
    known = given or task_map
    if known:
        unknown = sorted(n for n, v in names.items() if n not in known and np.any(lab.array == v))
        if unknown:
            raise InputError(f"segments {unknown} of {label_path.name} are not {args.task} labels "
                             f"(known: {', '.join(list(known)[:8])}{' ...' if len(known) > 8 else ''})")
    roi = read_image(Path(args.roi).expanduser()) if args.roi else None
    out = Path(args.output).expanduser().absolute()
    case = write_case(out, images, lab, names, roi=roi, overwrite=args.overwrite,
                      meta={"source": str(label_path), "task": args.task,
                            "images": {m: str(Path(p).expanduser().absolute())
                                       for m, p in _name_values(args.image, "--image").items()}})
    present = sorted(v for v in np.unique(lab.array) if v != 0)
    print(f"wrote case {case.name}: {out} ({len(images)} image{'s' if len(images) > 1 else ''}, "
          f"{len(present)} labels{', ROI' if roi is not None else ''})")
    return 0


def _task_label_map(task: str):
    """The label map ({name: value}) of a task that can be trained, or None for a new structure."""
    from ..store import _check_name
    from ..training.recipe import get_recipe

    _check_name(task, "task")
    try:
        return dict(get_recipe(task).label_map)
    except InputError:
        return None


def cmd_worker(args) -> int:
    from ..worker import main as worker_main

    return worker_main(args.job_dir)


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepsegrecon", description="DeepSegRecon: deep-learning segmentation and "
                                "reconstruction, headless (the same engine as the 3D Slicer modules).")
    p.add_argument("--version", action="version", version=f"deepsegrecon {__version__}")
    from .. import batch_cli
    from ..capability import cli_modules

    plugins = [*cli_modules(), batch_cli]
    visible = [c for mod in plugins for c in mod.COMMANDS] + VISIBLE_COMMANDS
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(visible) + "}")
    sub.required = True
    for mod in plugins:
        mod.add_parsers(sub)

    m = sub.add_parser("models", help="list, import, verify and remove model weights")
    ms = m.add_subparsers(dest="action", metavar="{list,import,verify,remove,average}")
    ms.required = True
    ml = ms.add_parser("list", help="installed model versions")
    ml.add_argument("--task")
    ml.set_defaults(func=cmd_models_list)
    mi = ms.add_parser("import", help="import a version folder, an archive or a weights file, or download one")
    mi.add_argument("path", nargs="?", metavar="PATH")
    mi.add_argument("--url")
    mi.add_argument("--sha256", metavar="H", help="expected sha256 (required with --url)")
    mi.add_argument("--task")
    mi.add_argument("--version")
    mi.add_argument("--description")
    mi.add_argument("--default", action="store_true",
                    help="make the imported version the one runs use when no --model is given")
    mi.add_argument("--timeout", type=float, metavar="S", help="give up a download (--url) after S seconds "
                    "(default: $DEEPSEGRECON_DOWNLOAD_TIMEOUT, else 600)")
    mi.set_defaults(func=cmd_models_import)
    mv = ms.add_parser("verify", help="check the sha256 of installed weights")
    mv.add_argument("task", nargs="?", metavar="TASK")
    mv.add_argument("version", nargs="?", metavar="VERSION")
    mv.add_argument("--deep", action="store_true", help="also load every weight file (slower)")
    mv.set_defaults(func=cmd_models_verify)
    mr = ms.add_parser("remove", help="remove a version from the user store")
    mr.add_argument("task", metavar="TASK")
    mr.add_argument("version", metavar="VERSION")
    mr.set_defaults(func=cmd_models_remove)
    ma = ms.add_parser("average", help="a new version whose weights average those of versions of one network")
    ma.add_argument("task", metavar="TASK")
    ma.add_argument("versions", nargs="+", metavar="VERSION")
    ma.add_argument("--name", required=True, help="the new version's name")
    ma.add_argument("--weights", type=float, nargs="+", metavar="W", help="one share per version (default equal)")
    ma.add_argument("--description")
    ma.set_defaults(func=cmd_models_average)

    for kind in ("train", "finetune"):
        tp = sub.add_parser(kind, help="train a new model version from scratch on annotated cases" if kind == "train"
                            else "fine-tune a model version on annotated cases (writes a new version)")
        tp.add_argument("task", metavar="TASK", help="the task whose network is trained (e.g. teeth)")
        tp.add_argument("--cases", required=True, metavar="DIR", help="folder of case folders (see add-case)")
        if kind == "finetune":
            tp.add_argument("--base", required=True, metavar="VERSION", help="model version to start from")
        tp.add_argument("--name", required=kind == "finetune", metavar="NEW",
                        help="name of the new version" + ("" if kind == "finetune" else " (default: TASK-<date>)"))
        budget = tp.add_mutually_exclusive_group()
        budget.add_argument("--epochs", type=int, metavar="E", help="train for E epochs")
        budget.add_argument("--minutes", type=float, metavar="M", help="train for M minutes (wall clock)")
        tp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
        tp.add_argument("--image", action="append", metavar="NAME=PATTERN",
                        help="input channel NAME and the file pattern of its image in each case (repeat per "
                             "modality; default: the task's)")
        tp.add_argument("--label-map", metavar="FILE", help="label names and values (JSON, CSV or Slicer colour "
                        "table); default: the task's")
        tp.add_argument("--val-fraction", type=float, metavar="F", help="share of cases kept for validation")
        tp.add_argument("--seed", type=int, metavar="S")
        tp.add_argument("--stages", nargs="+", metavar="PART", help="train only these parts (teeth: stage1 stage2)")
        tp.add_argument("--evaluate", action="store_true", help="also run the whole method on the validation cases")
        if kind == "finetune":
            tp.add_argument("--no-base-check", action="store_true",
                            help="keep the fine-tuned weights even where the base validates better")
        tp.add_argument("--recipe", metavar="MODULE:ATTR", help="a training recipe other than the task's own")
        tp.add_argument("--set", action="append", metavar="KEY=VALUE", dest="settings",
                        help="a training setting (e.g. learning_rate=1e-4, iterations_per_epoch=20, "
                             "stage2.patch_size=[48,64,64] for one part); repeatable")
        tp.set_defaults(func=cmd_train if kind == "train" else cmd_finetune)

    ac = sub.add_parser("add-case", help="write a training case: image(s) + corrected label (+ reviewed-voxel ROI)")
    ac.add_argument("task", metavar="TASK", help="the task the case is for (its labels are checked)")
    ac.add_argument("--image", action="append", required=True, metavar="NAME=PATH",
                    help="input image NAME (e.g. image=cbct.nrrd); repeat per modality")
    ac.add_argument("--label", required=True, metavar="LABEL", help=".seg.nrrd (segment names) or a labelmap image")
    ac.add_argument("-o", "--output", required=True, metavar="CASEDIR", help="the case folder to write")
    ac.add_argument("--roi", metavar="MASK", help="mask of the voxels that were reviewed (others are not trained on)")
    ac.add_argument("--label-map", metavar="FILE", help="names of the label values of a plain labelmap")
    ac.add_argument("--overwrite", action="store_true", help="replace an existing case folder")
    add_series_option(ac)
    ac.set_defaults(func=cmd_add_case)

    w = sub.add_parser("worker")  # hidden: python -m deepsegrecon.worker JOB_DIR
    w.add_argument("job_dir", metavar="JOB_DIR")
    w.set_defaults(func=cmd_worker)
    return p


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):  # never die on a non-ASCII path under a C locale
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (exit 2, as an input error)
        return e.code if isinstance(e.code, int) else errors.EXIT_INPUT
    previous = _on_sigterm_cancel()
    try:
        return int(args.func(args) or 0)
    except DeepSegReconError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"error: cancelled{' (' + str(e) + ')' if str(e) else ''}", file=sys.stderr)
        return errors.EXIT_CANCELLED
    except Exception as e:
        mapped = errors.resource_error(e)  # disk full, out of memory (torch too): exit 5
        if mapped is not None:
            print(f"error: {mapped}", file=sys.stderr)
            return errors.EXIT_RESOURCES
        import traceback  # a bug: show where

        traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return errors.EXIT_INTERNAL
    finally:
        if previous:
            import signal

            signal.signal(signal.SIGTERM, previous[0] if previous[0] is not None else signal.SIG_DFL)


def _on_sigterm_cancel():
    """SIGTERM cancels like Ctrl-C (KeyboardInterrupt, once; a second one is ignored); returns (old handler,)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt("terminated by SIGTERM")

    return (signal.signal(signal.SIGTERM, handler),)


if __name__ == "__main__":
    sys.exit(main())
