"""Multi-GPU and multi-node training: DistributedDataParallel, NCCL on GPUs, gloo on CPUs.

One machine, N GPUs (or N CPU processes)::

    torchrun --standalone --nproc_per_node N -m deepsegrecon.training.ddp \\
        --recipe teeth --cases DIR --out OUT [--config cfg.json] [--base base.pt] [--epochs E] [--minutes M]

Several machines: the same command on each, with ``--nnodes K --node_rank R --rdzv-backend c10d
--rdzv-endpoint HOST:PORT`` instead of ``--standalone``. From Python (the worker), :func:`launch` starts N
local processes itself (127.0.0.1, a free port), no ``torchrun`` needed.

Every rank reads its share of the cases (``DistributedSampler``) and of the validation cases; gradients
are averaged by DDP, so all ranks hold the same weights. Only rank 0 writes: ``OUT/checkpoint.pt``,
``OUT/model.pt``, ``OUT/metrics.json`` and ``OUT/progress.jsonl`` (one JSON event a line). Cancel by
creating ``OUT/cancel``: every rank sees it within ``cancel_every`` iterations and the run stops with
exit code 4, leaving no ``model.pt`` (delete the flag before resuming with ``--resume``; :func:`launch`
does). Several machines need ``OUT`` and the cases on a shared file system (every rank reads the
checkpoint on resume).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch

from .engine import local_rank

CANCEL_FLAG = "cancel"
PROGRESS_FILE = "progress.jsonl"


def setup(backend: str | None = None):
    """Join the process group described by the environment (``torchrun`` sets it): returns
    ``(rank, world_size, device)``. NCCL and this process' GPU when CUDA is available, else gloo and CPU."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank()) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def run(recipe, cases_dir, out_dir, config=None, base_state_file=None, val_dir=None, recipe_options=None,
        device=None, rank_states_dir=None):
    """One rank's training (the process group must be set up): returns the :class:`TrainResult`.

    ``recipe``: a :class:`Recipe` or a reference for :func:`get_recipe`; ``config``: a :class:`TrainConfig`,
    or a dict / JSON file of settings over the recipe's defaults; ``base_state_file``: weights to fine-tune from;
    ``rank_states_dir``: if given, every rank writes its final weights there as ``rank<N>.pt`` (to check
    that the ranks agree).
    """
    import torch.distributed as dist

    from ..task import CancelToken
    from .recipe import Recipe, fit, get_recipe

    out_dir = Path(out_dir)
    if not isinstance(recipe, Recipe):
        recipe = get_recipe(recipe, **(recipe_options or {}))
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    if isinstance(config, dict) or config is None:
        config = recipe.config(**(config or {}))
    base = _load_base(base_state_file) if base_state_file else None
    rank = dist.get_rank()
    sink = None
    if rank == 0:
        log = out_dir / PROGRESS_FILE

        def sink(event: dict) -> None:
            if event.get("event") == "check":
                return  # the log starts once every case passed (nothing is written before)
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")

    cancel = CancelToken(out_dir / CANCEL_FLAG)
    result = fit(recipe, cases_dir, out_dir, config, base_state=base, progress=sink, cancel=cancel,
                 val_dir=val_dir, distributed=True, device=device)
    if rank_states_dir is not None:
        Path(rank_states_dir).mkdir(parents=True, exist_ok=True)
        torch.save(result.last_state, Path(rank_states_dir) / f"rank{rank}.pt")
    dist.barrier()
    return result


def _load_base(path) -> dict:
    from ..errors import InputError

    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read the base weights {path}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("modules"), dict) and "model" in state["modules"]:
        state = state["modules"]["model"]  # a training checkpoint
    return state


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepsegrecon.training.ddp",
                                description="DistributedDataParallel training (start it with torchrun)")
    p.add_argument("--recipe", required=True, help="task name (e.g. teeth) or module:attribute of a Recipe")
    p.add_argument("--cases", required=True, help="folder of case folders")
    p.add_argument("--out", required=True, help="work folder: checkpoint.pt, model.pt, metrics.json, progress.jsonl")
    p.add_argument("--config", help="JSON file of training settings (TrainConfig fields)")
    p.add_argument("--base", help="weights to fine-tune from (a state_dict .pt file)")
    p.add_argument("--val-cases", help="folder of validation cases (default: a split of --cases)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--minutes", type=float)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--backend", choices=("nccl", "gloo"))
    p.add_argument("--rank-states", help="folder where every rank writes its final weights (consistency check)")
    return p


def main(argv=None) -> int:
    from ..errors import DeepSegReconError

    args = _parser().parse_args(argv)
    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    for key in ("epochs", "minutes"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.resume:
        settings["resume"] = True
    try:
        _, _, device = setup(args.backend)
        run(args.recipe, args.cases, args.out, settings, args.base, args.val_cases, device=device,
            rank_states_dir=args.rank_states)
        return 0
    except DeepSegReconError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        cleanup()


# ---------------------------------------------------------------------------------------------- local launch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(index: int, nprocs: int, port: int, threads: int, kwargs: dict) -> None:
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on the loopback interface
    torch.set_num_threads(threads)
    backend = kwargs.pop("backend", None)
    try:
        _, _, device = setup(backend)
        run(device=device, **kwargs)
    finally:
        cleanup()


def launch(nprocs: int, recipe: str, cases_dir, out_dir, config=None, base_state_file=None, val_dir=None,
           recipe_options=None, backend: str | None = None, rank_states_dir=None) -> dict:
    """Train with ``nprocs`` local processes (one per GPU, or CPU processes with gloo) and return the
    metrics (``out_dir/metrics.json``). ``recipe`` must be a reference (task name or ``module:attribute``),
    since each process imports it. Raises like :func:`run` when a process fails."""
    import torch.multiprocessing as mp

    from ..errors import DeepSegReconError, InputError

    if nprocs < 1:
        raise InputError("launch needs at least one process")
    if torch.cuda.is_available() and (backend or "nccl") == "nccl" and nprocs > torch.cuda.device_count():
        raise InputError(f"{nprocs} processes asked for but only {torch.cuda.device_count()} GPUs are visible")
    stale = Path(out_dir) / CANCEL_FLAG
    if stale.exists():
        stale.unlink()  # a flag left by an earlier, cancelled run must not stop this one
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    kwargs = dict(recipe=str(recipe), cases_dir=str(cases_dir), out_dir=str(out_dir), config=config,
                  base_state_file=base_state_file, val_dir=val_dir, recipe_options=recipe_options,
                  rank_states_dir=rank_states_dir, backend=backend)
    try:
        mp.spawn(_spawned, args=(nprocs, free_port(), threads, kwargs), nprocs=nprocs, join=True)
    except mp.ProcessRaisedException as e:
        text = str(e)
        for cls in DeepSegReconError.__subclasses__():
            if f"{cls.__module__}.{cls.__name__}: " in text or f"{cls.__name__}: " in text:
                raise cls(text.strip().splitlines()[-1].split(": ", 1)[-1]) from None
        raise
    return json.loads((Path(out_dir) / "metrics.json").read_text())["metrics"]


if __name__ == "__main__":
    sys.exit(main())
