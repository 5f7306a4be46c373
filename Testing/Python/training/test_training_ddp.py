"""DistributedDataParallel: two CPU processes (gloo, 127.0.0.1) train a tiny net and end with identical weights."""

import json

import pytest
import torch

from deepsegrecon.training.ddp import launch
from deepsegrecon.training.engine import TrainConfig
from deepsegrecon.training.recipe import Recipe
from test_training_engine import make_ball_cases, tiny_net

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster, much faster on a busy machine


def tiny_recipe():
    """Imported by name (``test_training_ddp:tiny_recipe``) in every spawned process."""
    return Recipe(task="balls", build_net=tiny_net, modalities={"image": "*"}, label_map={"ball": 1})


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_end_with_identical_changed_weights(tmp_path):
    from monai.utils import set_determinism

    cases = make_ball_cases(tmp_path / "cases", n=6, size=16)
    cfg = TrainConfig(epochs=2, patch_size=(16, 16, 16), batch_size=1, samples_per_case=2, learning_rate=1e-2,
                      val_fraction=0.34, sw_batch_size=1)
    out, ranks = tmp_path / "out", tmp_path / "ranks"
    metrics = launch(2, "test_training_ddp:tiny_recipe", cases, out, cfg, rank_states_dir=ranks, backend="gloo")

    r0 = torch.load(ranks / "rank0.pt", weights_only=True)
    r1 = torch.load(ranks / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
    set_determinism(seed=cfg.seed)
    initial = tiny_net().state_dict()
    changed = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], r0[k])]
    assert len(changed) >= len([k for k in initial if k.endswith("weight")]) // 2

    # rank 0 alone wrote the results: one event per epoch in the progress log
    assert metrics["epochs"] == 2 and len(metrics["val_cases"]) == 2 and metrics["best_val_dice"] is not None
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()


def test_torchrun_entry_point_in_one_process(tmp_path, monkeypatch):
    """``main`` as torchrun runs it (environment rendezvous), here as a world of one: results, exit codes."""
    from deepsegrecon.training import ddp

    cases = make_ball_cases(tmp_path / "cases", n=3, size=16)
    (tmp_path / "cfg.json").write_text(json.dumps({"patch_size": [16, 16, 16], "val_fraction": 0.0,
                                                   "samples_per_case": 1}))
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(ddp.free_port()), GLOO_SOCKET_IFNAME="lo").items():
        monkeypatch.setenv(k, v)
    args = ["--recipe", "test_training_ddp:tiny_recipe", "--cases", str(cases), "--config", str(tmp_path / "cfg.json"),
            "--backend", "gloo"]
    assert ddp.main(args + ["--out", str(tmp_path / "out"), "--epochs", "1"]) == 0
    assert (tmp_path / "out" / "model.pt").is_file()
    monkeypatch.setenv("MASTER_PORT", str(ddp.free_port()))
    assert ddp.main(args + ["--out", str(tmp_path / "never"), "--minutes", "0"]) == 2
    assert not (tmp_path / "never" / "model.pt").exists()
