"""Batch: one task over many cases in one process, resumable, failure-isolated and shardable.

    OUT/<case>/            the case's outputs (segmentation .seg.nrrd or .seg.dcm, report.json ...) and
                           case.json (its key: input content hash + model version + parameters); the folder
                           appears whole, by rename, when the case has finished
    OUT/.batch/<case>.json one record per case: status (done, skipped, failed, cancelled), seconds, model, summary,
                           error; OUT/batch.csv is rebuilt from them after every case (all shards' cases)

A rerun skips every case whose OUT/<case>/case.json has the same key; a failed case is recorded and the batch goes
on; ``shard=(K, N)`` takes every N-th case of the sorted list from the K-th. The model is loaded once per process
(:func:`models_loaded_once`); ``jobs=N`` runs N worker processes, each loading it once.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .batch_cases import Case, find_images, parse_shard
from .batch_cases import shard as take_shard
from .errors import (
    EXIT_CANCELLED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_RESOURCES,
    Cancelled,
    DeepSegReconError,
    InputError,
    resource_error,
)

RECORDS = ".batch"
CSV_NAME = "batch.csv"
CASE_FILE = "case.json"
CSV_COLUMNS = ("case", "status", "seconds", "model", "summary", "error", "exit_code", "output", "inputs", "finished")
FORMATS = ("auto", "seg.nrrd", "dicom-seg")


# ---------------------------------------------------------------------------------------- task adapters
class Adapter:
    """How a task's cases are found, read and written in a batch."""

    task = ""
    modalities = ("CT",)  # DICOM series taken from a tree (None: any)

    def find(self, inputs, options: dict) -> list:
        return find_images(inputs, self.modalities, options.get("pattern"))

    def load(self, case: Case, params: dict) -> tuple:
        from .io import read_image

        images = {n: read_image(Path(p), series=case.series.get(n)) for n, p in case.inputs.items()}
        return images, dict(params)

    def write(self, result, images, case: Case, folder: Path, fmt: str) -> None:
        write_segmentation(result, case, folder, fmt, "image", self.task)

    def summary(self, result) -> str:
        return ""


def write_segmentation(result, case: Case, folder: Path, fmt: str, name: str, task: str) -> None:
    """DICOM SEG beside a DICOM input (``auto``) or when asked for, else Slicer's ``.seg.nrrd``."""
    from .segio import write_seg_nrrd

    if fmt == "dicom-seg" or (fmt == "auto" and name in case.files):
        if name not in case.files:
            raise InputError(f"case {case.id}: a DICOM SEG needs a DICOM series as input ({case.inputs[name]} "
                             "is not one); use --format seg.nrrd")
        from .dicomseg import write_dicom_seg

        write_dicom_seg(result, case.files[name], folder / f"{case.id}.seg.dcm",
                        series_description=f"DeepSegRecon {task}", algorithm=f"DeepSegRecon {task}",
                        algorithm_version=str(result.report.get("model") or ""))
    else:
        write_seg_nrrd(result, folder / f"{case.id}.seg.nrrd")


def volumes_ml(result) -> dict:
    import numpy as np

    lab = np.asarray(result.labelmap.array)
    vox_ml = float(np.prod(result.labelmap.spacing)) / 1000.0
    counts = np.bincount(lab.ravel().astype(np.int64), minlength=256)
    return {s.name: round(float(counts[int(s.label)]) * vox_ml, 2) for s in result.segments}


def get_adapter(task: str) -> Adapter:
    """The batch adapter of ``task``; a task without one (a plugin) gets the single-image default."""
    from .task import get_task

    get_task(task)  # unknown task: InputError with the list
    from .capability import batch_adapter

    cls = batch_adapter(task)
    if cls is None:
        a = Adapter()
        a.task, a.modalities = task, None
        return a
    return cls()


# ---------------------------------------------------------------------------------------- keys and records
def file_hash(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def input_hash(case: Case, name: str) -> str:
    """sha256 of an input's content: its file, its DICOM series' files, or every file of its folder."""
    p = Path(case.inputs[name])
    files = case.files.get(name) or ([p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()))
    h = hashlib.sha256()
    for f in files:
        file_hash(Path(f), h)
    return h.hexdigest()


def case_key(task: str, hashes: dict, model: str | None, params: dict, fmt: str) -> str:
    text = json.dumps({"task": task, "inputs": hashes, "model": model, "params": params, "format": fmt},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def finished_key(out: Path, case_id: str) -> str | None:
    try:
        return json.loads((out / case_id / CASE_FILE).read_text()).get("key")
    except (OSError, ValueError):
        return None


def write_record(out: Path, record: dict) -> None:
    from .files import atomic_file, json_text

    with atomic_file(out / RECORDS / f"{record['case']}.json") as tmp:
        tmp.write_text(json_text(record))


def write_csv(out: Path) -> Path:
    """OUT/batch.csv from every case record in OUT (those of other shards too), sorted by case."""
    from .files import atomic_file

    rows = []
    for f in sorted((out / RECORDS).glob("*.json")):
        try:
            rows.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=lambda r: r.get("case", "")):
        w.writerow({k: (json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k, "")) for k in CSV_COLUMNS})
    with atomic_file(out / CSV_NAME) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return out / CSV_NAME


def read_csv(out) -> list:
    with open(Path(out) / CSV_NAME, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------- one case
class CaseRunner:
    """Runs the cases of one batch in this process: models checked and loaded once, readers and writers reused."""

    def __init__(self, task: str, out: Path, params: dict, fmt: str = "auto", preview: bool = False):
        self.task, self.out, self.params, self.fmt, self.preview = task, Path(out), dict(params), fmt, preview
        self.adapter = get_adapter(task)
        self.models: dict = {}  # version -> checked ModelEntry

    def model(self, images: dict, params: dict):
        from .runner import check_model
        from .task import get_task

        task = get_task(self.task)
        if not (task.uses_model or params.get("model")):
            return None
        version = params.get("model") or task.model_version(images, {**task.default_params(), **params}, _store())
        key = version or ""
        if key not in self.models:
            self.models[key] = check_model(task.weights_task, version, _store())
        return self.models[key]

    def run(self, case: Case, cancel=None, progress: Callable[[dict], None] | None = None) -> dict:
        """Run (or skip) one case; returns its record. Errors of the case are caught and recorded."""
        from .files import json_text
        from .runner import run_inline

        t0 = time.monotonic()
        record = {"case": case.id, "status": "failed", "seconds": 0.0, "model": "", "summary": "", "error": "",
                  "exit_code": "", "output": "", "inputs": {n: str(p) for n, p in case.inputs.items()}}
        stage = None
        try:
            images, params = self.adapter.load(case, self.params)
            model = self.model(images, params)
            record["model"] = model.version if model is not None else ""
            hashes = {n: input_hash(case, n) for n in case.inputs}
            key = case_key(self.task, hashes, record["model"], params, self.fmt)
            if finished_key(self.out, case.id) == key:
                old = json.loads((self.out / case.id / CASE_FILE).read_text())
                record.update({k: old.get(k, record[k]) for k in ("seconds", "model", "summary")},
                              status="skipped", output=str(self.out / case.id))
                return record
            result = run_inline(self.task, images, params, progress=progress, cancel=cancel, model=model)
            if model is not None:
                result.report.setdefault("model", model.version)
            record["summary"] = self.adapter.summary(result)
            stage = self._stage(case.id)
            self.adapter.write(result, images, case, stage, self.fmt)
            if self.preview and hasattr(result, "labelmap"):
                from .preview import write_preview

                write_preview(next(iter(images.values())), result, stage / f"{case.id}_preview.png")
            if not (stage / "report.json").exists():
                (stage / "report.json").write_text(json_text(getattr(result, "report", {})))
            record.update(status="done", seconds=round(time.monotonic() - t0, 2), output=str(self.out / case.id))
            (stage / CASE_FILE).write_text(json_text({**record, "key": key, "task": self.task, "params": params,
                                                      "input_sha256": hashes}))
            _move_into_place(stage, self.out / case.id)
            stage = None
        except (Cancelled, KeyboardInterrupt) as e:
            record.update(status="cancelled", error=str(e) or "cancelled", exit_code=EXIT_CANCELLED)
        except DeepSegReconError as e:
            record.update(error=str(e), exit_code=e.exit_code)
        except Exception as e:  # a bug or a library error on this case: recorded, the batch goes on
            mapped = resource_error(e)
            record.update(error=str(mapped) if mapped else f"internal error: {type(e).__name__}: {e}",
                          exit_code=EXIT_RESOURCES if mapped else EXIT_INTERNAL)
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        record["seconds"] = record["seconds"] or round(time.monotonic() - t0, 2)
        return record

    def _stage(self, case_id: str) -> Path:
        """A hidden folder beside OUT/<case>; leftovers of a killed run of this case are removed first (a case
        belongs to one shard, so no other job writes it; other shards' staging is left alone)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for old in self.out.glob(f".partial-{case_id}~*"):
            shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".partial-{case_id}~", dir=self.out))


def _move_into_place(stage: Path, target: Path) -> None:
    """Rename the finished case folder into place (an older result of the case goes only then)."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(stage, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, target)


def _store():
    from .store import ModelStore

    return ModelStore()


# ---------------------------------------------------------------------------------------- the batch
@dataclass
class BatchSummary:
    out: Path
    total: int = 0  # cases of this shard
    done: int = 0
    skipped: int = 0
    failed: int = 0
    cancelled: bool = False
    records: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.cancelled:
            return EXIT_CANCELLED
        codes = [int(r["exit_code"]) for r in self.records if r["status"] == "failed" and r["exit_code"] != ""]
        return max(codes) if codes else EXIT_OK


class BatchProgress:
    """``[3/20] done 2 skipped 0 failed 1  ETA 2 min 10 s  case: 45% stage2`` on stderr (one line a case when
    stderr is not a terminal); also forwards each event dict to ``sink`` (Slicer panel, API)."""

    def __init__(self, total: int, stream=None, sink=None, status_file=None):
        self.total, self.stream, self.sink = total, stream if stream is not None else sys.stderr, sink
        self.status_file, self.status_t = (Path(status_file) if status_file else None), 0.0
        self.counts = {"done": 0, "skipped": 0, "failed": 0, "cancelled": 0}
        self.times: list = []
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_t = 0.0

    def eta(self) -> float | None:
        left = self.total - sum(self.counts.values())
        return sum(self.times) / len(self.times) * left if self.times else None

    def line(self, case_id: str = "", inner: str = "") -> str:
        from .progress import format_duration

        n = sum(self.counts.values())
        eta = self.eta()
        return (f"[{n}/{self.total}] done {self.counts['done']} skipped {self.counts['skipped']} failed "
                f"{self.counts['failed']}" + (f"  ETA {format_duration(eta)}" if eta is not None else "")
                + (f"  {case_id}: {inner}" if case_id else ""))

    def event(self, force: bool = False, **fields) -> None:
        event = {"total": self.total, **self.counts, "eta_s": self.eta(), **fields}
        if self.sink is not None:
            self.sink(event)
        if self.status_file is not None and (force or time.monotonic() - self.status_t > 0.5):
            from .files import atomic_file

            with atomic_file(self.status_file) as tmp:  # what a background batch's poller reads
                tmp.write_text(json.dumps(event))
            self.status_t = time.monotonic()

    def case_event(self, case_id: str, event: dict) -> None:
        if self.tty and time.monotonic() - self.last_t > 0.5:
            from .progress import format_progress

            print("\r\033[K" + self.line(case_id, format_progress(event).strip())[:150], end="",
                  file=self.stream, flush=True)
            self.last_t = time.monotonic()
        self.event(case=case_id, case_fraction=event.get("fraction"), stage=event.get("stage"))

    def finished(self, record: dict) -> None:
        self.counts[record["status"]] = self.counts.get(record["status"], 0) + 1
        if record["status"] == "done":
            self.times.append(float(record["seconds"]))
        what = record["status"] + (f": {record['error']}" if record["error"] else
                                   f" ({record['seconds']} s) {record['summary']}")
        print(("\r\033[K" if self.tty else "") + self.line() + f"  {record['case']} {what}", file=self.stream,
              flush=True)
        self.event(force=True, case=record["case"], status=record["status"])


def find_cases(task: str, inputs, pattern: str | None = None) -> list:
    """Every case of ``inputs`` for ``task``, sorted by id (the same list on every machine)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    cases = get_adapter(task).find(list(inputs), {"pattern": pattern})
    if not cases:
        raise InputError(f"no {task} case found in {', '.join(str(i) for i in inputs)}")
    return cases


def run_batch(task: str, inputs, output, params: dict | None = None, *, shard=None, jobs: int = 1,
              fmt: str = "auto", pattern: str | None = None, preview: bool = False,
              progress: Callable[[dict], None] | None = None, cancel=None, stream=None,
              plugins=(), status_file=None) -> BatchSummary:
    """Run ``task`` on every case in ``inputs`` (files, folders, DICOM trees, CSV lists) into ``output``.

    ``shard``: "K/N" or (K, N); ``jobs``: worker processes; ``fmt``: auto (DICOM SEG for DICOM inputs, else
    .seg.nrrd), seg.nrrd or dicom-seg; ``progress`` gets batch events; ``cancel`` a CancelToken (stops after the
    running case's next step); ``plugins``: modules or .py files that register extra tasks (imported by the
    worker processes too); ``status_file``: a JSON file kept up to date with the counts (a background batch's
    poller reads it, :mod:`deepsegrecon.batch_job`). Problems of the whole batch (no case, unknown task, bad shard, missing model) raise
    before any case runs; a case's own problem is recorded in OUT/batch.csv and the batch goes on."""
    from .files import check_writable_dir
    from .task import CancelToken, Task, get_task
    from .worker import _import_plugin

    t0 = time.monotonic()
    for plugin in plugins:
        _import_plugin(str(plugin))
    out = Path(output).expanduser().absolute()
    check_writable_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is a file; -o needs a folder")
    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if int(jobs) < 1:
        raise InputError(f"jobs must be 1 or more, got {jobs}")
    k, n = parse_shard(shard) if isinstance(shard, str) else (shard or (1, 1))
    parse_shard(f"{k}/{n}")
    params = dict(params or {})
    try:
        json.dumps(params)
    except (TypeError, ValueError) as e:
        raise InputError(f"batch parameters must be plain JSON values: {e}") from e
    cases = take_shard(find_cases(task, inputs, pattern), k, n)
    runner = CaseRunner(task, out, params, fmt, preview)
    if params.get("device") not in (None, "cpu"):
        from .device import resolve_device

        resolve_device(params["device"])  # a missing GPU stops the batch, not each case
    if cases and (params.get("model") or type(get_task(task)).model_version is Task.model_version):
        runner.model({}, params)  # a missing or corrupt model stops the batch before any case
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    cancel = cancel or CancelToken()
    bar = BatchProgress(len(cases), stream, progress, status_file)
    bar.event(force=True, state="running")
    summary = BatchSummary(out, total=len(cases))
    print(f"{task}: {len(cases)} case{'s' if len(cases) != 1 else ''}" + (f" (shard {k}/{n})" if n > 1 else "")
          + f" -> {out}", file=bar.stream, flush=True)
    if int(jobs) > 1 and len(cases) > 1:
        records = _run_pool(cases, (task, str(out), params, fmt, preview, tuple(map(str, plugins))), int(jobs),
                            cancel, bar)
    else:
        records = []
        with models_loaded_once(task):
            for case in cases:
                if cancel.cancelled:
                    break
                record = runner.run(case, cancel, lambda e, c=case.id: bar.case_event(c, e))
                _finish(out, record, bar, records)
                if record["status"] == "cancelled":
                    break
    summary.records = records
    for r in records:
        if r["status"] in ("done", "skipped", "failed"):
            setattr(summary, r["status"], getattr(summary, r["status"]) + 1)
    summary.cancelled = cancel.cancelled or any(r["status"] == "cancelled" for r in records)
    summary.seconds = round(time.monotonic() - t0, 2)
    if records:
        write_csv(out)
    bar.event(force=True, state="cancelled" if summary.cancelled else "finished", exit_code=summary.exit_code)
    return summary


def _finish(out: Path, record: dict, bar: BatchProgress, records: list) -> None:
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_record(out, record)
    write_csv(out)
    records.append(record)
    bar.finished(record)


# ---------------------------------------------------------------------------------------- worker processes
_POOL_RUNNER: dict = {}


def _pool_init(task, out, params, fmt, preview, plugins=()) -> None:
    import torch

    from .worker import _import_plugin

    for plugin in plugins:
        _import_plugin(plugin)
    torch.set_num_threads(max(1, int(os.environ.get("DEEPSEGRECON_BATCH_THREADS", "1"))))
    runner = CaseRunner(task, Path(out), params, fmt, preview)
    ctx = models_loaded_once(task)
    ctx.__enter__()  # for the life of this worker process
    _POOL_RUNNER["runner"] = runner


def _pool_case(case_dict: dict) -> dict:
    return _POOL_RUNNER["runner"].run(Case(**case_dict))


def _run_pool(cases, config: tuple, jobs, cancel, bar) -> list:
    """N spawned worker processes, each with its own model; records are written by this process."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    records = []
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(cases)), mp_context=mp.get_context("spawn"),
                               initializer=_pool_init, initargs=config)
    pending = {pool.submit(_pool_case, asdict(c)) for c in cases}
    try:
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    record = f.result()
                except Exception as e:  # a worker process died (killed, out of memory) or could not start
                    raise DeepSegReconError(f"a batch worker process failed: {type(e).__name__}: {e}") from e
                _finish(Path(config[1]), record, bar, records)
            if cancel.cancelled:
                for f in pending:
                    f.cancel()
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return records


@contextlib.contextmanager
def models_loaded_once(task_name: str):
    """While inside, the task module's ``load_model(entry)`` builds each model version once and returns the same
    networks to every later run in this process (the batch's "load once"). Yields the cache ({key: model})."""
    from .task import get_task

    module = sys.modules.get(type(get_task(task_name)).__module__)
    original = getattr(module, "load_model", None)
    cache: dict = {}
    if original is None or getattr(original, "_loaded_once", False):  # no model, or already cached
        yield cache
        return

    def load_model(entry):
        key = (str(entry.dir), entry.version, tuple(sorted(entry.files.items())))
        if key not in cache:
            cache[key] = original(entry)
        return cache[key]

    load_model._loaded_once = True
    module.load_model = load_model
    try:
        yield cache
    finally:
        module.load_model = original
