"""The patient-specific pose regressor (DiffPose): a ResNet-18 with GroupNorm (MONAI) that regresses the
pose offset from the start pose, trained on DRRs of the patient's own CT at random offsets.

Loss (the seed's): ``1 - multiscale NCC(DRR at predicted pose, DRR at true pose)
+ 0.01 (log-geodesic + double-geodesic)``; random bone contrast; offsets drawn from normal distributions
in se(3). CPU schedule: low-resolution DRRs of a downsampled CT, Adam, a time budget."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, ModelError
from .geometry import ROT_SIZE, check_parameterization, from_pose, to_pose

TASK = "xray-register"
WEIGHTS = "regressor.pt"
ROT_SIGMA = (0.1, 0.1, 0.1)  # rad, se(3) log rotation offsets
TRANS_SIGMA = (20.0, 20.0, 20.0)  # mm
CONTRAST = (1.0, 10.0)  # bone attenuation multiplier, uniform (the seed's)


def default_config(parameterization: str = "se3_log_map", convention=None) -> dict:
    return {"parameterization": parameterization, "convention": convention, "size": 64, "ct_spacing_mm": 5.0,
            "layers": [2, 2, 2, 2], "widths": [64, 128, 256, 512], "groups": 16}


class PoseRegressor(torch.nn.Module):
    """Image (B, 1, S, S) -> (rotation, translation) of the offset in ``parameterization``."""

    def __init__(self, config: dict):
        super().__init__()
        from monai.networks.nets import ResNet

        check_parameterization(config["parameterization"], config.get("convention"))
        if config["parameterization"] == "matrix":
            raise InputError("the regressor cannot output a raw rotation matrix (not rigid): use rotation_9d")
        self.config = dict(config)
        self.n_rot = ROT_SIZE[config["parameterization"]]
        self.backbone = ResNet("basic", list(config["layers"]), list(config["widths"]), spatial_dims=2,
                               n_input_channels=1, num_classes=3 + self.n_rot,
                               norm=("group", {"num_groups": int(config["groups"])}))
        ident = torch.eye(4, dtype=torch.float64)[None]
        from diffdrr.pose import RigidTransform

        rot, _ = from_pose(RigidTransform(ident), config["parameterization"], config.get("convention"))
        self.register_buffer("rot_base", rot[0].float())

    def forward(self, x):
        out = self.backbone(x)
        trans = 30.0 * out[:, :3]
        rot = self.rot_base + 0.2 * out[:, 3:]
        return rot, trans

    def offsets(self, x) -> torch.Tensor:
        """(B, 4, 4) offset matrices (world frame): pose = offset @ start."""
        rot, trans = self(x)
        return to_pose(rot, trans, self.config["parameterization"], self.config.get("convention")).matrix


def random_offsets(n: int, gen: torch.Generator) -> torch.Tensor:
    from diffdrr.pose import se3_exp_map

    r = torch.randn(n, 3, generator=gen) * torch.tensor(ROT_SIGMA)
    t = torch.randn(n, 3, generator=gen) * torch.tensor(TRANS_SIGMA)
    return se3_exp_map(torch.cat([t, r], 1)).mT


def model_key(ct_array: np.ndarray, ct_spacing, carm, config: dict) -> str:
    """The store version of a patient's regressor: CT content + geometry + network."""
    h = hashlib.sha256(np.ascontiguousarray(ct_array).tobytes())
    h.update(json.dumps([list(map(float, ct_spacing)), round(carm.sdd, 2), round(carm.sid, 2), carm.view,
                         round(carm.delx * carm.width, 1), round(carm.dely * carm.height, 1),
                         round(carm.x0, 2), round(carm.y0, 2), config], sort_keys=True).encode())
    return "ct-" + h.hexdigest()[:16]


def train(renderer, carm, start: np.ndarray, config: dict, minutes: float, max_steps: int = None,
          batch_size: int = 4, lr: float = 1e-3, seed: int = 0, step=None):
    """Train a regressor for ``minutes`` (or ``max_steps``) on DRRs of ``renderer``'s CT.
    Returns (model, history)."""
    from diffdrr.pose import RigidTransform

    from ..training.loop import Budget, Loop
    from .metrics import double_geodesic, geodesic_se3, multiscale_ncc
    from .xrayio import network_input

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = PoseRegressor(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    size = int(config["size"])
    renderer.set_carm(carm.scaled(size))
    start_t = torch.as_tensor(start, dtype=torch.float32)

    def train_step(loop):
        renderer.set_contrast(float(torch.empty(1).uniform_(*CONTRAST, generator=gen)))
        true = random_offsets(batch_size, gen) @ start_t
        with torch.no_grad():
            img = renderer(RigidTransform(true))
        pred = model.offsets(network_input(img, size)) @ start_t
        mncc = multiscale_ncc(renderer(RigidTransform(pred)), img)
        geo = geodesic_se3(pred.double(), true.double()).float()
        dgeo = double_geodesic(pred, true, carm.sid)[2]
        return (1 - mncc + 1e-2 * (geo + dgeo)).mean(), {"ncc": mncc.mean(), "double_geodesic_mm": dgeo.mean()}

    def report(loop, rec):
        if step:
            step(min(1.0, loop.fraction()), f"training step {loop.step}: loss {rec['loss']:.3f}",
                 {"step": loop.step, **rec})

    budget = Budget(steps=max_steps) if max_steps is not None else Budget(minutes=max(float(minutes), 1e-9))
    loop = Loop(model, opt, budget, clip=10.0, schedule=lambda n, frac: lr * (0.1 if frac > 0.75 else 1.0),
                after_step=report).run(train_step)
    history = [{"step": n + 1, **h} for n, h in enumerate(loop.history)]
    renderer.contrast = None
    renderer.set_contrast(1.0)
    renderer.set_carm(carm)
    model.eval()
    return model, history


def save(store, version: str, model: PoseRegressor, carm, history: list, ct_sha: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / WEIGHTS
        torch.save(model.state_dict(), path)
        tail = history[-20:]
        def mean(key):
            return float(np.mean([h[key] for h in tail])) if tail else None

        metrics = {"steps": len(history), "final_loss": mean("loss"),
                   "final_double_geodesic_mm": mean("double_geodesic_mm")}
        return store.write_version(TASK, version, {WEIGHTS: path}, {
            "name": f"X-ray pose regressor {version}", "task": TASK, "version": version,
            "network": model.config, "input_spec": {"carm": carm.to_dict()}, "trained_on": ct_sha,
            "metrics": metrics, "description": "patient-specific pose regressor (DiffPose), one CT"}, overwrite=True)


def load(entry) -> PoseRegressor:
    from ..store import check_task, load_state_dict

    check_task(entry, TASK)
    config = entry.manifest.get("network")
    if not isinstance(config, dict) or "parameterization" not in config:
        raise ModelError(f"model {entry.version} ({entry.dir}) has no regressor network config in its manifest")
    try:
        model = PoseRegressor(config)
        model.load_state_dict(load_state_dict(entry, WEIGHTS, task=TASK))
    except (RuntimeError, KeyError, TypeError) as e:
        raise ModelError(f"{WEIGHTS} in model {entry.version} does not fit its network config ({e})") from e
    model.eval()
    return model
