"""Training and fine-tuning as tasks the worker runs in the background: ``"train"`` and ``"finetune"``.

Both take no input images; everything is in the parameters::

    {"task": "teeth",              # the task whose network is trained (its Recipe: training.recipe.get_recipe)
     "cases": "/path/to/cases",    # case folders (training.cases: write_case folders or folders users have)
     "name": "my-clinic-v1",       # the new model version (must not exist yet)
     "base": "phantom-v1",         # finetune only: the version to start from (never modified)
     "minutes": 5 | "epochs": 10,  # training budget (both: whichever ends first); > 0
     "val_fraction": 0.2, "seed": 0, "device": "auto",
     "modalities": {"image": "*cbct*"},     # optional: channel name -> file pattern (default: the recipe's)
     "label_map": {"tooth_11": 11, ...},    # optional: a dict or a label-map file (default: the recipe's)
     "settings": {"learning_rate": 1e-4, "stage2": {"patch_size": [48, 64, 64]}},  # optional TrainConfig
                                            # overrides, for every part or (under a part name) for one part
     "stages": ["stage2"],         # optional: train only these parts (multi-network recipes such as teeth)
     "keep_better_base": true,     # finetune: keep a part's base weights where they validate better
     "evaluate": false,            # optional: also end-to-end metrics of the base and new version on the
                                   # validation cases (if the recipe can; teeth: full inference + FDI scoring)
     "recipe": "pkg.module:attr",  # optional: a recipe reference instead of the task's own (told the task name)
     "recipe_options": {...}}      # optional: keyword arguments for the recipe (e.g. normalize=[-1000, 2000])

Progress (``ctx.progress`` -> the worker's ``progress.jsonl``): stages ``check cases`` (one event per case),
``train`` (per iteration and per epoch), ``evaluate``, ``save``. Training events carry extra fields:
``event`` (iteration | epoch | done), ``part`` (e.g. ``stage2``), ``epoch``, ``epochs``, ``loss``,
``val_dice``, ``best_val_dice``, ``iteration``, ``iterations``. The result is a
:class:`~deepsegrecon.results.ModelResult`: ``task``, ``version``, ``manifest`` (as written), ``history`` (one
dict per epoch: part, epoch, loss, val_dice, ...), ``report`` (folder, times, metrics).

Guarantees. Cheap checks (budget, names, base version, device) run in :meth:`validate`, before anything is
read; every case is then read and checked (and hashed) before training starts. The new version is written
with :meth:`ModelStore.write_version` (atomic: staging folder + rename) **only after training completes**;
until then everything lives in a private work folder under the system temp folder (removed at the end; one
left by a killed job is removed by the next job). So a cancel, a crash or a SIGKILL at any point leaves the
store with exactly the versions it had, and the base version is only ever read. A cancel that arrives
while the version is being written undoes the write.

Fine-tuning never ships a part that is worse than its base on the validation cases: after a part is trained,
the base weights are validated the same way, and if they score at least as well they are kept for that part
(``metrics.parts.<part>.kept_base``, and a note). With no validation cases (``val_fraction`` 0) this check
cannot run; ``"keep_better_base": false`` turns it off.

Multi-network recipes (teeth) list their networks as ``recipe.parts`` (:class:`TrainPart`: name, weight
file, the part's own Recipe, share of the time budget); a one-network recipe is one part writing
``model.pt``. Optional recipe hooks, all duck-typed: ``check_case(case_data) -> dict`` (task-specific checks
and facts used by ``select_parts``), ``select_parts(kind, parts, case_facts, requested) -> (parts, notes)``,
``finetune_defaults`` (dict of TrainConfig settings for fine-tuning, e.g. a lower learning rate),
``export_state(part, state) -> state`` (e.g. float16), ``version_manifest(...) -> dict`` and
``evaluate(states, network, cases, device, step) -> dict``.

Registration: importing this module registers both tasks. The worker imports it when the job lists it in
``plugins``; :func:`create_training_job` does that for you.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import Cancelled, DeepSegReconError, InputError, ModelError
from ..params import Params
from ..results import ModelResult
from ..task import Task, TaskContext, register

TRAIN_STAGES = {"check cases": 4, "train": 86, "evaluate": 5, "save": 5}
WORK_PREFIX = "deepsegrecon-train-"
PLUGIN = __name__  # what a job lists in "plugins" so the worker registers these tasks


@dataclass
class TrainPart:
    """One network of a recipe: trained with its own Recipe, saved as ``file`` in the version folder."""

    name: str
    file: str
    recipe: object  # training.recipe.Recipe
    share: float = 1.0  # share of a minutes budget
    description: str = ""


def recipe_parts(recipe) -> list:
    parts = getattr(recipe, "parts", None)
    return list(parts) if parts else [TrainPart("model", "model.pt", recipe, 1.0)]


def create_training_job(kind: str, params: dict, job_root=None) -> Path:
    """A worker job folder for ``kind`` ("train" | "finetune"); start it with ``worker.start_job``."""
    from ..worker import create_job

    if kind not in ("train", "finetune"):
        raise InputError(f"unknown training job '{kind}': use train or finetune")
    return create_job(kind, {}, dict(params), job_root=job_root, plugins=[PLUGIN])


def read_epochs(job_dir) -> list:
    """The per-epoch events written so far to a job's ``progress.jsonl`` (for a live loss / Dice curve)."""
    path = Path(job_dir) / "progress.jsonl"
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") == "epoch":
            out.append(e)
    return out


# --------------------------------------------------------------------------------------------------- params
def _budget(params) -> tuple:
    """(epochs, minutes) of typed parameters, each None or positive."""
    for key in ("epochs", "minutes"):
        v = params.get(key)
        if v is not None and not v > 0:
            raise InputError(f"the training budget must be positive: {key} = {v} (give --{key} above 0)")
    return params.get("epochs"), params.get("minutes")


def _check_params(kind: str, params) -> None:
    from ..store import ModelStore, _check_name

    params = TrainParams.parse(params, kind)  # unknown keys and wrong types (a dict given directly)
    task = params.get("task")
    if not task:
        raise InputError(f"{kind} needs the task whose network is trained (e.g. 'teeth')")
    _check_name(task, "task")
    cases = params.get("cases")
    if not cases:
        raise InputError(f"{kind} needs a cases folder (one sub-folder per annotated case)")
    if not Path(cases).expanduser().is_dir():
        raise InputError(f"cases folder {cases} does not exist or is not a folder")
    name = params.get("name")
    if not name:
        raise InputError(f"{kind} needs a name for the new model version")
    _check_name(name, "version")
    _budget(params)
    vf = params.get("val_fraction")
    if vf is not None and not 0 <= vf < 1:
        raise InputError(f"val_fraction must be at least 0 and below 1, got {vf!r}")
    if params.get("settings"):  # every setting through the typed settings, before any case is read
        from .engine import TrainConfig

        for key, value in params["settings"].items():
            if isinstance(value, dict):
                TrainConfig.check_settings(value, part=key)
            else:
                TrainConfig.check_settings({key: value})
    if params.get("stages") is not None and not params["stages"]:
        raise InputError("stages must be a non-empty list of part names")
    store = ModelStore()
    if kind == "finetune":
        base = params.get("base")
        if not base:
            raise InputError("finetune needs the base model version to start from")
        entry = store.get(task, str(base))  # ModelError naming the installed versions
        store.verify(entry)
    elif params.get("base"):
        raise InputError("train starts from fresh weights; to start from a version use finetune with base")
    _refuse_existing_version(store, task, str(name))


def _refuse_existing_version(store, task: str, name: str) -> None:
    for e in store.list(task):
        if e.version == name:
            raise ModelError(f"model {task} {name} already exists ({'built in' if e.builtin else e.dir}); "
                             "choose another name for the new version")


def _json_clean(o):
    if isinstance(o, dict):
        return {str(k): _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    try:
        return o.item()  # numpy scalars
    except AttributeError:
        return str(o)


# --------------------------------------------------------------------------------------------------- work dir
def _pid_alive(pid: int) -> bool:
    from ..processes import pid_alive  # psutil: os.kill(pid, 0) would send CTRL_C_EVENT on Windows

    return pid_alive(pid)


def clean_stale_work_dirs(root=None) -> list:
    """Remove work folders left by training jobs whose process is gone (e.g. killed); returns them."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.glob(WORK_PREFIX + "*"))
    except OSError:
        return removed
    for d in entries:
        try:
            pid = int(d.name[len(WORK_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# --------------------------------------------------------------------------------------------------- recipe
def _make_recipe(kind: str, params: dict, base_entry):
    from .recipe import get_recipe

    options = {}
    if params.get("modalities"):
        options["modalities"] = dict(params["modalities"])
    if params.get("label_map") is not None:
        options["label_map"] = params["label_map"]
    network = (base_entry.manifest.get("network") if base_entry is not None else None) or None
    options.update(params.get("recipe_options") or {})
    ref = params.get("recipe") or params["task"]
    first = dict(options)
    if params.get("recipe"):  # a generic recipe reference is told the task name
        first["task"] = params["task"]
    if network:
        first["network"] = network
    try:
        recipe = get_recipe(ref, **first)
    except TypeError:
        try:
            recipe = get_recipe(ref, **options)  # a recipe that takes no task name or network config
        except TypeError as e:
            raise InputError(f"the recipe of {ref} does not take the options {sorted(options)}: {e}") from e
    except InputError as e:
        base_labels = base_entry.manifest.get("labels") if base_entry is not None else None
        if params.get("recipe") or "cannot be trained" not in str(e) or (
                params.get("label_map") is None and not base_labels):
            raise
        # a new structure: the generic MONAI U-Net recipe for the task name and label map
        from .recipes_generic import generic_recipe

        if "label_map" not in options:
            options["label_map"] = base_labels
        if "modalities" not in options and base_entry is not None:
            mods = (base_entry.manifest.get("input_spec") or {}).get("modalities")
            if mods:
                options["modalities"] = {m: f"*{m}*" for m in mods} if len(mods) > 1 else {mods[0]: "*"}
        if network:
            options["network"] = network
            if network.get("patch_size"):
                options["patch_size"] = network["patch_size"]
            if network.get("normalize") is not None:
                options["normalize"] = network["normalize"]
        recipe = generic_recipe(task=params["task"], **options)
    if recipe.task != params["task"]:
        raise InputError(f"the recipe {ref} trains task '{recipe.task}', not '{params['task']}'")
    return recipe


# --------------------------------------------------------------------------------------------------- the job
def run_training(kind: str, params: dict, ctx: TaskContext) -> ModelResult:
    """The body of the ``train`` / ``finetune`` tasks (see the module docstring)."""
    import torch

    from ..store import ModelStore, load_state_dict
    from .engine import split_cases, train

    t_start = time.monotonic()
    store = ModelStore()
    task, name = str(params["task"]), str(params["name"])
    epochs, minutes = _budget(params)
    cases_dir = Path(params["cases"]).expanduser().resolve()
    clean_stale_work_dirs()
    ctx.step("check cases", 0.0, "finding the cases")

    base_entry = None
    if kind == "finetune":
        base_entry = store.get(task, str(params["base"]))
        store.verify(base_entry)
    recipe = _make_recipe(kind, params, base_entry)
    cases = recipe.find_cases(cases_dir)
    if not cases:
        raise InputError(f"no cases in {cases_dir}")

    # ---- read and check every case (one at a time), hash its files
    facts, hashes = {}, {}
    check = getattr(recipe, "check_case", None)
    for n, case in enumerate(cases):
        ctx.step("check cases", n / len(cases), f"checking case {case.name} ({n + 1}/{len(cases)})")
        data = case.load()
        facts[case.name] = (check(data) if check is not None else None) or {}
        del data
        hashes[case.name] = _case_hashes(case)
    ctx.step("check cases", 1.0, f"{len(cases)} cases checked")

    parts = recipe_parts(recipe)
    requested = params.get("stages")
    notes = []
    if requested:
        names = [p.name for p in parts]
        bad = [s for s in requested if s not in names]
        if bad:
            raise InputError(f"{task} has no part {bad}; its parts are {names}")
    select = getattr(recipe, "select_parts", None)
    if select is not None:
        parts, notes = select(kind, parts, facts, requested)
    elif requested:
        parts = [p for p in parts if p.name in requested]
    if not parts:
        raise InputError(f"nothing to train: no part of {task} can be trained on these cases ({'; '.join(notes)})")
    if kind == "train" and len(parts) < len(recipe_parts(recipe)):
        raise InputError(f"training {task} from scratch trains every part "
                         f"({', '.join(p.name for p in recipe_parts(recipe))}); {'; '.join(notes)}")

    val_fraction = params.get("val_fraction")
    seed = int(params.get("seed") or 0)
    first_cfg = parts[0].recipe.config()
    vf = first_cfg.val_fraction if val_fraction is None else float(val_fraction)
    train_cases, val_cases = split_cases(cases, vf, seed)

    # ---- train each part in turn, in a private work folder
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
    try:
        states, results, configs, history = {}, {}, {}, []
        total_share = sum(max(p.share, 0.0) for p in parts) or 1.0
        done_share = 0.0
        t_train = time.monotonic()
        settings = dict(params.get("settings") or {})
        part_names = {p.name for p in recipe_parts(recipe)}
        for i, part in enumerate(parts):
            overrides = {}
            if kind == "finetune":
                overrides.update(getattr(part.recipe, "finetune_defaults", None) or
                                 getattr(recipe, "finetune_defaults", None) or {})
            overrides.update({k: v for k, v in settings.items() if k not in part_names})
            overrides.update(settings.get(part.name) or {})
            overrides.update(seed=seed, val_fraction=vf)
            if epochs is not None or minutes is not None:
                overrides["epochs"] = epochs
                overrides["minutes"] = None
            if minutes is not None:
                left = minutes * 60.0 - (time.monotonic() - t_train)
                remaining_share = sum(max(p.share, 0.0) for p in parts[i:]) or 1.0
                overrides["minutes"] = max(left * max(part.share, 0.0) / remaining_share, 3.0) / 60.0
            overrides["check_cases"] = False  # read and checked above
            config = part.recipe.config(**overrides)
            config.check()
            configs[part.name] = config.to_dict()
            share = max(part.share, 0.0) / total_share
            base_state = None
            if base_entry is not None:
                base_state = load_state_dict(base_entry, part.file, task=task)
            net = part.recipe.build_net()
            sink = _progress_sink(ctx, part.name, done_share, share, len(parts) > 1)
            to_sample = part.recipe.sample_fn()
            num_classes = getattr(to_sample, "num_classes", None) or part.recipe.num_classes
            result = train(net, train_cases, config, work / part.name, base_state=base_state, progress=sink,
                           cancel=ctx.cancel, num_classes=num_classes, to_sample=to_sample,
                           inferer=part.recipe.inferer, val_cases=val_cases, device=ctx.device)
            del net
            results[part.name] = result
            states[part.name] = result.best_state
            if (base_state is not None and val_cases and result.metrics.get("best_val_dice") is not None
                    and params.get("keep_better_base", True)):
                # never ship a part that is worse than the base on the validation cases
                ctx.step("train", done_share + share, f"{part.name}: validating the base weights")
                base_val = _validate_state(part, base_state, val_cases, config, num_classes, to_sample, ctx)
                result.metrics["base_val_dice"] = base_val
                result.metrics["kept_base"] = bool(base_val is not None and base_val >= result.metrics["best_val_dice"])
                if result.metrics["kept_base"]:
                    states[part.name] = base_state
                    notes.append(f"{part.name} kept the base weights: validation Dice {base_val:.3f} (base) >= "
                                 f"{result.metrics['best_val_dice']:.3f} (fine-tuned)")
            del base_state
            history += [{"part": part.name, **{k: v for k, v in h.items() if k != "per_class_dice"}}
                        for h in result.history]
            done_share += share
        train_s = time.monotonic() - t_train

        # ---- optional end-to-end metrics on the validation cases (base and new weights)
        evaluation = None
        evaluate = getattr(recipe, "evaluate", None)
        if evaluate is not None and val_cases and params.get("evaluate", False):
            ctx.step("evaluate", 0.0, f"evaluating on {len(val_cases)} validation cases")
            all_states = _full_states(recipe_parts(recipe), states, base_entry, task)
            network = getattr(recipe, "network", None)
            evaluation = {"new": evaluate(all_states, network, val_cases, ctx.device,
                                          lambda f: ctx.step("evaluate", f * (0.5 if base_entry else 1.0)))}
            if base_entry is not None and len(all_states) == len(recipe_parts(recipe)):
                base_states = {p.name: load_state_dict(base_entry, p.file, task=task) for p in recipe_parts(recipe)}
                evaluation["base"] = evaluate(base_states, network, val_cases, ctx.device,
                                              lambda f: ctx.step("evaluate", 0.5 + 0.5 * f))
            ctx.step("evaluate", 1.0)

        # ---- write the version (only now), atomically
        ctx.step("save", 0.0, f"writing model {task} {name}")
        files = {}
        export = getattr(recipe, "export_state", None)
        for part in parts:
            state = export(part.name, states[part.name]) if export is not None else states[part.name]
            path = work / "export" / part.file
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
            files[part.file] = path
        if base_entry is not None:  # parts not trained here keep the base weights (verified copies)
            from ..store import verify_file

            for p in recipe_parts(recipe):
                if p.file not in files:
                    files[p.file] = verify_file(base_entry, p.file)
        training_id = uuid.uuid4().hex
        summary = {p: {k: r.metrics.get(k) for k in ("best_val_dice", "best_epoch", "final_loss", "epochs", "stopped",
                                                     "elapsed_s", "per_class_dice", "base_val_dice", "kept_base")
                       if k in r.metrics}
                   for p, r in results.items()}
        provenance = {
            "base_version": base_entry.version if base_entry is not None else None,
            "trained_on": {"cases_dir": str(cases_dir), "train": [c.name for c in train_cases],
                           "validation": [c.name for c in val_cases], "case_files_sha256": hashes},
            "training": {"kind": kind, "id": training_id, "parts_trained": [p.name for p in parts],
                         "notes": notes, "parameters": _json_clean({k: v for k, v in params.items()}),
                         "config": configs, "device": str(ctx.device), "minutes": round(train_s / 60.0, 2),
                         "history": _json_clean(history)},
            "metrics": {"val_dice": _mean([s["best_val_dice"] for s in summary.values()]), "parts": summary,
                        **({"validation": evaluation} if evaluation else {})},
        }
        manifest = _version_manifest(recipe, parts, results, base_entry, provenance, params)
        ctx.step("save", 0.3, f"writing model {task} {name}")
        entry = _install(store, ctx, task, name, files, manifest, training_id)
        ctx.report("save", 1.0, f"wrote model {task} {name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {"dir": str(entry.dir), "elapsed_s": round(time.monotonic() - t_start, 1),
              "train_minutes": round(train_s / 60.0, 2), "parts": summary, "notes": notes,
              "train_cases": [c.name for c in train_cases], "val_cases": [c.name for c in val_cases],
              **({"validation": evaluation} if evaluation else {})}
    return ModelResult(task, name, dict(entry.manifest), _json_clean(history), _json_clean(report))


def _validate_state(part, state, val_cases, config, num_classes, to_sample, ctx):
    """Mean validation Dice of ``state`` for ``part`` (the engine's own validation)."""
    import torch

    from .engine import _Dist, _validate, default_inferer

    device = torch.device(ctx.device)
    net = part.recipe.build_net()
    net.load_state_dict(state)
    net.to(device)
    inferer = part.recipe.inferer or default_inferer(config, device)
    dice, _ = _validate(net, val_cases, to_sample, inferer, num_classes, device, _Dist(False, device), ctx.cancel,
                        {}, 0)
    return dice


def _mean(values):
    v = [x for x in values if x is not None]
    return round(sum(v) / len(v), 4) if v else None


def _case_hashes(case) -> dict:
    from ..store import sha256_file

    files = list(case.inputs.values()) + [case.label_file] + ([case.roi_file] if case.roi_file else [])
    manifest = case.folder / "case.json"
    if manifest.is_file():
        files.append(manifest)
    return {str(p.relative_to(case.folder)) if p.is_relative_to(case.folder) else str(p): sha256_file(p)
            for p in files}


def _full_states(all_parts, states, base_entry, task) -> dict:
    """The trained parts' weights, with the base version's for parts not trained here."""
    from ..store import load_state_dict

    out = dict(states)
    if base_entry is not None:
        for p in all_parts:
            if p.name not in out and p.file in base_entry.files:
                out[p.name] = load_state_dict(base_entry, p.file, task=task)
    return out


def _version_manifest(recipe, parts, results, base_entry, provenance, params) -> dict:
    hook = getattr(recipe, "version_manifest", None)
    if hook is not None:
        manifest = hook(results, base_entry.manifest if base_entry is not None else None, provenance)
    else:
        part = parts[0]
        manifest = part.recipe.manifest(results[part.name], provenance["base_version"])
        manifest.pop("metrics", None)
        manifest.pop("trained_on", None)
    manifest.update(provenance)
    if params.get("description"):
        manifest["description"] = str(params["description"])
    manifest.pop("default", None)  # a new version is never silently the default
    manifest.pop("files", None)
    manifest.pop("created", None)
    manifest["name"] = f"{params['task']} {params['name']}"
    return _json_clean(manifest)


def _install(store, ctx, task, name, files, manifest, training_id):
    """write_version, undone if a cancel (flag or SIGTERM) arrives while it runs."""
    ctx.cancel.raise_if_cancelled()
    _refuse_existing_version(store, task, name)
    entry = None
    try:
        entry = store.write_version(task, name, files, manifest)
        ctx.cancel.raise_if_cancelled()
        return entry
    except BaseException:
        target = store.root / task / name
        try:
            written = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            written = {}
        if (written.get("training") or {}).get("id") == training_id:
            with contextlib.suppress(DeepSegReconError):
                store.remove(task, name)
        raise


def _progress_sink(ctx, part: str, done_share: float, share: float, several: bool):
    """Engine events -> ctx.step("train", overall fraction, message, extra) (checks cancel each time)."""
    keys = ("event", "epoch", "epochs", "loss", "val_dice", "best_val_dice", "best_epoch", "iteration",
            "iterations", "lr")

    def sink(event: dict) -> None:
        f = done_share + share * float(event.get("fraction") or 0.0)
        extra = {"part": part, **{k: event[k] for k in keys if k in event}}
        if event.get("eta_s") is not None:
            extra["part_eta_s"] = event["eta_s"]
        msg = event.get("message") or ""
        if several and msg:
            msg = f"{part}: {msg}"
        ctx.step("train", f, msg, extra)

    return sink


# --------------------------------------------------------------------------------------------------- tasks
@dataclass
class TrainParams(Params):
    """A training job (see the module text); ``None``: not given (the recipe's or the base's choice)."""

    task: str | None = None
    cases: str | None = None
    name: str | None = None
    base: str | None = None
    epochs: int | None = None
    minutes: float | None = None
    val_fraction: float | None = None
    seed: int | None = None
    modalities: dict | None = None
    label_map: dict | str | None = None
    settings: dict | None = None
    stages: list | None = None
    evaluate: bool = False
    recipe: str | None = None
    recipe_options: dict | None = None
    keep_better_base: bool = True
    description: str | None = None


class _TrainingTask(Task):
    kind = "train"
    inputs = ()
    result_kind = "model"
    stages = TRAIN_STAGES
    params_type = TrainParams

    def validate(self, images: dict, params: dict) -> None:
        if images:
            raise InputError(f"{self.name} takes no input images (the cases folder holds them)")
        _check_params(self.kind, params)

    def run(self, images: dict, params: dict, ctx: TaskContext) -> ModelResult:
        try:
            return run_training(self.kind, self.parse_params(params), ctx)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM in the CLI
            raise Cancelled(f"training cancelled ({e or 'interrupted'})") from None


@register
class TrainTask(_TrainingTask):
    """Train a task's network(s) from fresh weights on annotated cases; writes a new model version."""

    name = "train"
    title = "Train a model"
    kind = "train"


@register
class FinetuneTask(_TrainingTask):
    """Fine-tune a model version on annotated cases; writes a new version (the base is never modified)."""

    name = "finetune"
    title = "Fine-tune a model"
    kind = "finetune"
