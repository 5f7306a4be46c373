"""The one training loop (deepsegrecon.training.loop): budgets and schedule, resume as if never stopped, best
weights, skipped steps, clipping, cancel; and no training anywhere else in the package."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsegrecon.errors import Cancelled, InputError
from deepsegrecon.task import CancelToken
from deepsegrecon.training.loop import Budget, Loop, load_checkpoint

PACKAGE = Path(__file__).resolve().parents[3] / "DeepSegRecon" / "deepsegrecon"


class Problem:
    """Fit y = x @ w on batches drawn from the problem's own NumPy generator (checkpointed with the loop)."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(4, 1)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=0.05)
        self.rng = np.random.default_rng(seed)
        self.w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def step(self, loop):
        x = torch.from_numpy(self.rng.normal(size=(8, 4)).astype(np.float32)) + 0.1 * torch.randn(8, 4)
        return torch.mean((self.net(x) - x @ self.w) ** 2)

    def state(self):
        def set_state(s):
            self.rng.bit_generator.state = s

        return (lambda: self.rng.bit_generator.state, set_state)

    def loop(self, budget, **kw):
        return Loop(self.net, self.opt, budget, state=self.state(), **kw)


def test_a_steps_budget_sets_the_schedule_and_max_steps_only_caps_it():
    p = Problem()
    lrs = []
    p.loop(Budget(steps=10), schedule=lambda step, frac: 0.1 * (1 - frac),
           after_step=lambda lp, rec: lrs.append(lp.opt.param_groups[0]["lr"])).run(p.step)
    assert np.allclose(lrs, [0.1 * (1 - s / 10) for s in range(10)])
    p, lrs = Problem(), []
    loop = p.loop(Budget(minutes=1e6, max_steps=4), schedule=lambda step, frac: 0.1 * (1 - frac),
                  after_step=lambda lp, rec: lrs.append(lp.opt.param_groups[0]["lr"])).run(p.step)
    assert loop.step == 4 and min(lrs) > 0.0999  # a cap, not a shorter schedule


def test_resume_continues_as_if_the_run_had_never_stopped(tmp_path):
    straight = Problem()
    straight.loop(Budget(steps=20), schedule=lambda s, f: 0.05 * (1 - f)).run(straight.step)

    first = Problem()
    part = first.loop(Budget(steps=20, max_steps=8), schedule=lambda s, f: 0.05 * (1 - f),
                      checkpoint=tmp_path / "ck.pt").run(first.step)
    assert part.step == 8 and load_checkpoint(tmp_path / "ck.pt")["step"] == 8
    torch.manual_seed(123)  # the resumed process starts from other random states: the checkpoint restores them
    again = Problem(seed=5)
    loop = again.loop(Budget(steps=20), schedule=lambda s, f: 0.05 * (1 - f), checkpoint=tmp_path / "ck.pt")
    loop.resume()
    loop.run(again.step)
    assert loop.step == 20
    for a, b in zip(straight.net.parameters(), again.net.parameters()):
        assert torch.equal(a, b)


def test_validation_keeps_the_best_weights_and_runs_at_the_end():
    p = Problem()
    scores = iter([0.2, 0.9, 0.5, 0.1])
    loop = p.loop(Budget(steps=10), log_every=3).run(p.step, lambda: next(scores), val_every=3)
    assert [r["step"] for r in loop.records if "val" in r] == [3, 6, 9, 10]
    assert len(p.loop(Budget(steps=6), log_every=3).run(p.step, lambda: 1.0, val_every=3).records) == 4  # 2 + 2
    assert loop.best["step"] == 6 and loop.best["metric"] == 0.9
    assert not torch.equal(loop.best_states()["model"]["weight"], p.net.weight.detach())
    q = Problem()
    kept = q.loop(Budget(steps=4)).run(q.step, lambda: 1.0, val_every=2, keep_best=False)
    assert kept.best["state"] is None and torch.equal(kept.best_states()["model"]["weight"], q.net.weight.detach())


def test_skipped_steps_do_not_count_and_a_step_that_never_gives_a_loss_is_refused():
    p = Problem()
    calls = []

    def every_other(loop):
        calls.append(loop.step)
        return None if len(calls) % 2 else p.step(loop)

    assert p.loop(Budget(steps=5)).run(every_other).step == 5 and len(calls) == 10
    with pytest.raises(InputError, match="no loss 1000 times"):
        p.loop(Budget(steps=5)).run(lambda loop: None)


def test_gradients_are_clipped_and_cancel_stops_the_run():
    p = Problem()
    norms = []

    def huge(loop):
        return 1e6 * p.step(loop)

    p.loop(Budget(steps=3), clip=0.5,
           after_step=lambda lp, rec: norms.append(float(torch.norm(torch.stack(
               [q.grad.norm() for q in lp.parameters()]))))).run(huge)
    assert max(norms) <= 0.5 + 1e-4
    token = CancelToken()
    with pytest.raises(Cancelled):
        p.loop(Budget(steps=50), cancel=token, after_step=lambda lp, rec: lp.step == 3 and token.cancel()).run(p.step)


def test_bad_budgets_and_checkpoints_are_refused(tmp_path):
    p = Problem()
    with pytest.raises(InputError, match="positive"):
        p.loop(Budget(minutes=0))
    with pytest.raises(InputError, match="give a training budget"):
        p.loop(Budget()).run(p.step)
    with pytest.raises(InputError, match="does not exist"):
        p.loop(Budget(steps=2)).resume(tmp_path / "none.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a DeepSegRecon training checkpoint"):
        p.loop(Budget(steps=2)).resume(tmp_path / "other.pt")
    p.loop(Budget(steps=2), checkpoint=tmp_path / "ck.pt").run(p.step)
    two = Loop({"stage1": p.net, "stage2": torch.nn.Linear(4, 1)}, p.opt, Budget(steps=2))
    with pytest.raises(InputError, match="holds"):
        two.resume(tmp_path / "ck.pt")


def test_bfloat16_autocast_runs_the_forward_pass_in_bfloat16():
    p = Problem()
    seen = []

    def step(loop):
        with loop.autocast():
            out = p.net(torch.ones(2, 4))
        seen.append(out.dtype)
        return out.float().pow(2).mean()

    p.loop(Budget(steps=1), amp=torch.bfloat16).run(step)
    p.loop(Budget(steps=1)).run(step)
    assert seen == [torch.bfloat16, torch.float32]


def test_no_training_step_outside_the_loop():
    """Every network in the package trains through Loop: no other module calls backward() (X-ray pose refinement
    optimises a pose at inference, not a network)."""
    allowed = {"training/loop.py", "xray/refine.py"}
    found = {str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
             if re.search(r"\.backward\(", f.read_text(encoding="utf-8"))}
    assert found == allowed
