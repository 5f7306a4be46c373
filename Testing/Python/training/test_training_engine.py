"""Training engine: a tiny 3-D U-Net learns bright balls in noise; resume, cancel, budgets, early stopping,
ROI-masked loss, fine-tuning through a Recipe into the model store."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsegrecon.errors import Cancelled, InputError
from deepsegrecon.image import Image
from deepsegrecon.task import CancelToken
from deepsegrecon.training.cases import find_cases, write_case
from deepsegrecon.training.data import CaseToTensors
from deepsegrecon.training.engine import IGNORE_INDEX, SegLoss, TrainConfig, load_checkpoint, train
from deepsegrecon.training.recipe import Recipe, fit

N = 32
EPOCHS = 7


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")  # tiny nets: one thread is faster, much faster on a busy machine


def make_ball_cases(root: Path, n: int = 8, size: int = N, seed: int = 0, roi: bool = False) -> Path:
    """``n`` cases: a bright ball (random centre and radius) in Gaussian noise; label 1 = ball."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    for c in range(n):
        centre = rng.uniform(size * 0.3, size * 0.7, 3)
        r = rng.uniform(size * 0.15, size * 0.25)
        ball = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 < r * r
        img = rng.normal(0, 1, (size,) * 3).astype(np.float32) + 2.0 * ball
        mask = None
        if roi:  # only the half of the volume around the ball was reviewed
            m = np.zeros((size,) * 3, np.uint8)
            m[:, :, : size // 2] = 1 if centre[2] < size / 2 else 0
            m[:, :, size // 2:] = 0 if centre[2] < size / 2 else 1
            mask = Image(m, spacing=(0.8, 0.8, 0.8))
        write_case(root / f"case{c:02d}", {"image": Image(img, spacing=(0.8, 0.8, 0.8))},
                   Image(ball.astype(np.uint8), spacing=(0.8, 0.8, 0.8)), {"ball": 1}, roi=mask)
    return root


def tiny_net():
    from monai.networks.nets import UNet

    return UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1)


def tiny_config(**kw) -> TrainConfig:
    base = dict(epochs=EPOCHS, patch_size=(24, 24, 24), batch_size=2, samples_per_case=2, learning_rate=1e-2,
                val_fraction=0.25, sw_batch_size=1)
    base.update(kw)
    return TrainConfig(**base)


def run(cases, out, config, **kw):
    torch.manual_seed(0)
    return train(tiny_net(), cases, config, out, num_classes=2, to_sample=CaseToTensors(label_values=[1]), **kw)


@pytest.fixture(scope="module")
def ball_cases(tmp_path_factory):
    return find_cases(make_ball_cases(tmp_path_factory.mktemp("balls")))


@pytest.fixture(scope="module")
def trained(ball_cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    events = []
    result = run(ball_cases, out, tiny_config(), progress=events.append)
    return result, events, out


def test_learns_balls_history_progress_and_outputs(trained):
    result, events, out = trained
    h = result.history
    assert [e["epoch"] for e in h] == list(range(1, EPOCHS + 1))
    assert h[-1]["loss"] < 0.6 * h[0]["loss"], [e["loss"] for e in h]
    assert result.metrics["best_val_dice"] >= 0.7, [e["val_dice"] for e in h]
    assert result.metrics["best_val_dice"] == max(e["val_dice"] for e in h)
    assert result.metrics["stopped"] == "epochs" and len(result.metrics["val_cases"]) == 2

    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    for e in epochs:
        assert {"loss", "val_dice", "elapsed_s", "eta_s", "fraction", "message"} <= set(e)
    assert epochs[-1]["eta_s"] == 0.0 and epochs[0]["eta_s"] > 0 and epochs[-1]["fraction"] == 1.0
    assert events[-1]["event"] == "done"
    checks = [e for e in events if e["event"] == "check"]
    assert len(checks) == 8 and checks[-1]["fraction"] == 1.0 and events.index(checks[-1]) < events.index(epochs[0])

    # best weights written, loadable the safe way; the checkpoint too
    saved = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in result.best_state.items())
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == EPOCHS and len(ck["history"]) == EPOCHS
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["best_epoch"] == result.metrics["best_epoch"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_resume_continues_the_epoch_count(trained, ball_cases, tmp_path):
    result, _, out = trained
    work = tmp_path / "work"
    shutil.copytree(out, work)
    events = []
    more = run(ball_cases, work, tiny_config(epochs=EPOCHS + 2, resume=True), progress=events.append)
    assert [e["epoch"] for e in more.history] == list(range(1, EPOCHS + 3))
    assert more.history[:EPOCHS] == result.history
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [EPOCHS + 1, EPOCHS + 2]
    assert load_checkpoint(work / "checkpoint.pt")["epoch"] == EPOCHS + 2


def test_resumed_run_equals_uninterrupted_run(ball_cases, tmp_path):
    cfg = dict(patch_size=(16, 16, 16), samples_per_case=1, val_fraction=0.0, affine_prob=0.3)
    straight = run(ball_cases[:4], tmp_path / "a", tiny_config(epochs=3, **cfg))
    run(ball_cases[:4], tmp_path / "b", tiny_config(epochs=2, **cfg))
    resumed = run(ball_cases[:4], tmp_path / "b", tiny_config(epochs=3, resume=True, **cfg))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for k, v in straight.last_state.items():
        assert torch.equal(v, resumed.last_state[k]), k


def test_cancel_raises_and_writes_no_final_weights(ball_cases, tmp_path):
    token = CancelToken()

    def on_progress(event):
        if event["event"] == "iteration":
            token.cancel()

    with pytest.raises(Cancelled):
        run(ball_cases, tmp_path / "c", tiny_config(cancel_every=1), progress=on_progress, cancel=token)
    assert not (tmp_path / "c" / "model.pt").exists()
    assert not (tmp_path / "c" / "metrics.json").exists()


@pytest.mark.parametrize("budget", [dict(epochs=0), dict(minutes=0), dict(minutes=-5), dict(epochs=-1)])
def test_non_positive_budget_refused(ball_cases, tmp_path, budget):
    with pytest.raises(InputError, match="budget must be positive"):
        run(ball_cases, tmp_path / "never", tiny_config(**budget))
    assert not (tmp_path / "never").exists()


def test_time_budget_stops_training(ball_cases, tmp_path):
    res = run(ball_cases[:3], tmp_path / "t", tiny_config(epochs=None, minutes=0.03, patch_size=(16, 16, 16),
                                                         val_fraction=0.0))
    assert res.metrics["stopped"] == "time budget"
    assert 1 <= res.metrics["epochs"] and res.metrics["elapsed_s"] < 0.03 * 60 + 3
    assert (tmp_path / "t" / "model.pt").exists()


def test_early_stopping_stops(ball_cases, tmp_path):
    res = run(ball_cases[:4], tmp_path / "e", tiny_config(epochs=20, patience=2, min_delta=1.0,
                                                         patch_size=(16, 16, 16)))
    assert res.metrics["stopped"] == "early stopping"
    assert len(res.history) == 3 and res.metrics["best_epoch"] == 1


def test_bad_case_refused_before_anything_is_written(ball_cases, tmp_path):
    bad = tmp_path / "cases"
    make_ball_cases(bad, n=3, size=16)
    (bad / "case01" / "label.seg.nrrd").write_bytes(b"NRRD0004\ntruncated")
    with pytest.raises(InputError, match="case 'case01'"):
        run(find_cases(bad), tmp_path / "out", tiny_config())
    assert not (tmp_path / "out").exists()


def test_loss_leaves_out_voxels_outside_the_roi():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    full = torch.ones_like(label)
    loss = SegLoss("dicece", include_background=True)
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert torch.allclose(loss(logits, label, full), ref, atol=1e-6)

    roi = torch.zeros_like(label)
    roi[..., :4] = 1
    changed = label.clone()
    changed[..., 4:] = (changed[..., 4:] + 1) % 3  # differs only outside the ROI
    a, b = loss(logits, label, roi), loss(logits, changed, roi)
    assert torch.allclose(a, b) and not torch.allclose(a, loss(logits, label, full))
    a.backward()
    assert torch.all(logits.grad[..., 4:] == 0) and logits.grad[..., :4].abs().sum() > 0
    none = loss(logits, label, torch.zeros_like(label))
    assert torch.isfinite(none)
    assert IGNORE_INDEX < 0


class _Recipe:
    @staticmethod
    def make():
        return Recipe(task="balls", build_net=tiny_net, modalities={"image": "*"}, label_map={"ball": 1},
                      defaults=tiny_config().to_dict(), network={"arch": "UNet", "channels": [4, 8, 16]})


def test_finetune_with_roi_cases_into_the_model_store(trained, tmp_path):
    from deepsegrecon.store import ModelStore, load_state_dict

    base = trained[0].best_state
    cases = make_ball_cases(tmp_path / "corrected", n=3, seed=7, roi=True)
    recipe = _Recipe.make()
    events = []
    res = fit(recipe, cases, tmp_path / "ft", recipe.config(epochs=2, learning_rate=1e-3, val_fraction=0.34),
              base_state=base, progress=events.append)
    # fine-tuning starts from the trained weights: good from the first epoch
    assert res.history[0]["val_dice"] >= 0.7, res.history
    store = ModelStore(root=tmp_path / "models", builtin_root=tmp_path / "none")
    entry = store.write_version("balls", "ft1", {"model.pt": tmp_path / "ft" / "model.pt"},
                                recipe.manifest(res, base_version="v1", description="fine-tuned"))
    assert entry.manifest["base_version"] == "v1" and entry.manifest["labels"] == {"ball": 1}
    assert entry.manifest["trained_on"]["train"] and entry.manifest["metrics"]["best_val_dice"] >= 0.7
    state = load_state_dict(entry, "model.pt", task="balls")
    net = tiny_net()
    net.load_state_dict(state)


def test_dice_per_class_matches_monai_on_one_hot():
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from deepsegrecon.training.engine import dice_per_class

    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 3, (1, 6, 7, 8), generator=g)
    lab = torch.randint(0, 3, (1, 6, 7, 8), generator=g)
    pred[pred == 2] = 1  # class 3 absent from both, class 2 only in the label
    ref = DiceMetric(include_background=False, reduction="none")(one_hot(pred[None], 4), one_hot(lab[None], 4))[0]
    d = dice_per_class(pred, lab, 4)
    assert torch.allclose(d[:2], ref[:2].double()) and d[1] == 0 and torch.isnan(d[2])


def test_workers_cache_and_fixed_iterations_per_epoch(ball_cases, tmp_path):
    res = run(ball_cases[:3], tmp_path / "w", tiny_config(epochs=2, num_workers=1, cache_cases=3,
                                                         iterations_per_epoch=4, patch_size=(16, 16, 16),
                                                         val_fraction=0.0))
    assert [h["iterations"] for h in res.history] == [4, 4]
