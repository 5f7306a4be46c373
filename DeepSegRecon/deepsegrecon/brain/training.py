"""Training / fine-tuning recipe for ``brain-tumor`` (``deepsegrecon train brain-tumor --cases DIR``).

Cases: folders with the MRI inputs and a BraTS labelmap (1 necrosis, 2 oedema, 3 enhancing; a label map file
with ``enhancing_tumor: 4`` reads BraTS 2015-2021 files). Any subset of the four inputs that holds FLAIR and
T1c works (``--image t1c=*t1c* --image flair=*flair*``): missing inputs are zero channels, as in the
modality dropout the shipped weights were trained with. Each case is put on the model's 2 mm grid and
z-scored over brain voxels exactly as inference does (:func:`.preprocess.to_network_input`).

The generic engine trains one network with a softmax loss over disjoint classes, so the network is wrapped:
its three sigmoid outputs (ET, TC, WT) become the log-probabilities of background / necrosis / oedema /
enhancing under the nesting (P(oedema) = P(WT)(1 - P(TC)), ...), Dice + cross-entropy is taken on those,
and the VAE's 0.1 L2 + 0.1 KL terms are added to the gradient (:class:`AddAux`). The shipped weights were
trained with the paper's soft Dice on the regions instead (:mod:`.train`).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..training.recipe import Recipe
from . import labels as L
from .nets import build_net, default_network, kl_divergence, state_without_vae
from .task import MODALITIES, REQUIRED

BRAIN_LABELS = {"necrotic_core": L.NCR, "edema": L.ED, "enhancing_tumor": L.ET}
DEFAULT_PATTERNS = {"t1": "t1.*", "t1c": "t1c.*", "t2": "t2.*", "flair": "flair.*"}


class AddAux(torch.autograd.Function):
    """Identity on ``x`` whose backward also back-propagates ``aux`` (a scalar loss) with gradient 1."""

    @staticmethod
    def forward(ctx, x, aux):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=grad.dtype, device=grad.device)


def region_to_class_logits(seg: torch.Tensor) -> torch.Tensor:
    """(B, 3 [ET, TC, WT] logits) -> (B, 4) log-probabilities of background, necrosis, oedema, enhancing."""
    et, tc, wt = seg[:, 0:1], seg[:, 1:2], seg[:, 2:3]
    lw, lnw = F.logsigmoid(wt), F.logsigmoid(-wt)
    lt, lnt = F.logsigmoid(tc), F.logsigmoid(-tc)
    le, lne = F.logsigmoid(et), F.logsigmoid(-et)
    return torch.cat([lnw, lw + lt + lne, lw + lnt, lw + lt + le], 1)


class ClassWrapper(torch.nn.Module):
    """The engine's view of the network: class log-probabilities, VAE terms added to the gradient when
    training. Its state dict is the bare network's (no prefix), so weights move freely between the two."""

    def __init__(self, network: dict, w_l2: float = 0.1, w_kl: float = 0.1):
        super().__init__()
        self.net = build_net(network, with_vae=True)
        self.w_l2, self.w_kl = w_l2, w_kl

    def forward(self, x):
        out = self.net(x)
        if isinstance(out, tuple):
            seg, recon, mu, logvar = out
            aux = self.w_l2 * torch.mean((recon.float() - x.float()) ** 2) + self.w_kl * kl_divergence(mu, logvar)
            return AddAux.apply(region_to_class_logits(seg), aux)
        return region_to_class_logits(out)

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        bad = [k for k in list(missing) + list(unexpected) if not k.startswith(("vd", "vu", "vae"))]
        if bad:
            raise RuntimeError(f"weights do not fit the brain-tumor network: {bad[:4]}")
        return torch.nn.modules.module._IncompatibleKeys([], [])


class BrainCaseToTensors:
    """Case -> {"image" (4, k, j, i) on the model grid, "label" class indices, "roi"} (picklable)."""

    def __init__(self, network: dict, label_values):
        self.network = network
        self.label_values = [int(v) for v in label_values]
        self.num_classes = len(self.label_values) + 1

    def __call__(self, case) -> dict:
        from .preprocess import resample_to, to_network_input

        images = {m: case.images[m] for m in MODALITIES if m in case.images}
        missing = [m for m in REQUIRED if m not in images]
        if missing:
            raise InputError(f"case '{case.name}' has no {', '.join(missing)} (brain-tumor needs FLAIR and T1c)")
        mods = list(self.network.get("modalities") or MODALITIES)
        x, grid, ref, _, _ = to_network_input(images, mods, float(self.network["spacing_mm"]))
        lab = np.asarray(case.label.array)
        lut = np.zeros(max(max(self.label_values), int(lab.max())) + 1, np.int16)
        lut[self.label_values] = np.arange(1, len(self.label_values) + 1)
        cls = ref.with_array(lut[lab])
        y = resample_to(cls, grid, order=0, dtype=np.int16).array if not grid.same_grid(ref) else cls.array
        roi = np.ones(y.shape, np.uint8)
        if case.roi is not None:
            r = ref.with_array(np.asarray(case.roi.array, np.uint8))
            roi = (resample_to(r, grid, order=0).array > 0).astype(np.uint8) if not grid.same_grid(ref) else r.array
        return {"image": x[0].float(), "label": torch.from_numpy(np.ascontiguousarray(y, np.int16)[None]),
                "roi": torch.from_numpy(np.ascontiguousarray(roi)[None])}


class BrainRecipe(Recipe):
    def check_case(self, data) -> dict:
        values = set(int(v) for v in np.unique(data.label.array) if v != 0)
        unknown = sorted(values - set(self.label_map.values()))
        if unknown:
            raise InputError(f"case '{data.name}': label values {unknown} are not brain-tumor labels "
                             f"({', '.join(f'{v} {n}' for n, v in self.label_map.items())})")
        missing = [m for m in REQUIRED if m not in data.images]
        if missing:
            raise InputError(f"case '{data.name}' has no {', '.join(missing)} (brain-tumor needs FLAIR and T1c)")
        for m, img in data.images.items():
            if not np.any(np.asarray(img.array) != 0):
                raise InputError(f"case '{data.name}': input {m} has no brain voxels (every voxel is 0)")
        return {"labels": sorted(values)}

    def export_state(self, part: str, state: dict) -> dict:
        net = build_net(self.network, with_vae=True)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
        return state_without_vae(net)

    def version_manifest(self, results: dict, base_manifest: dict | None, provenance: dict) -> dict:
        base = dict(base_manifest or {})
        return {"task": "brain-tumor",
                "labels": {str(v): n for n, v in self.label_map.items()},
                "input_spec": {**(base.get("input_spec") or {}), "modalities": list(MODALITIES),
                               "case_modalities": list(self.modalities), "spacing_mm": self.network["spacing_mm"]},
                "network": self.network,
                "description": ((base.get("description") or "SegResNet + VAE (Myronenko 2018) for brain tumours.")
                                + (f" Fine-tuned from {base.get('version')} on annotated cases."
                                   if base_manifest else " Trained on annotated cases."))}


def recipe(network: dict | None = None, modalities: dict | None = None, label_map=None, **_) -> BrainRecipe:
    """The brain-tumor recipe. ``network``: a manifest's (fine-tuning) or the CPU default; ``modalities``:
    ``{name: pattern}`` for any of t1, t1c, t2, flair (FLAIR and T1c required); ``label_map``: names -> values."""
    from ..training.labels import read_label_map

    network = dict(network or default_network())
    modalities = dict(modalities or DEFAULT_PATTERNS)
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise InputError(f"brain-tumor inputs are {', '.join(MODALITIES)}; unknown: {', '.join(unknown)}")
    missing = [m for m in REQUIRED if m not in modalities]
    if missing:
        raise InputError(f"brain-tumor training needs at least FLAIR and T1c; missing: {', '.join(missing)}")
    lmap = read_label_map(label_map) if label_map is not None else dict(BRAIN_LABELS)
    if sorted(lmap) != sorted(BRAIN_LABELS):
        raise InputError(f"the brain-tumor label map names {', '.join(BRAIN_LABELS)}; got {', '.join(lmap)}")
    lmap = {n: int(lmap[n]) for n in BRAIN_LABELS}  # class order: necrosis, oedema, enhancing
    patch = tuple(int(v) for v in network["vae_input_size"])
    defaults = dict(epochs=50, patch_size=patch, batch_size=1, samples_per_case=1, iterations_per_epoch=8,
                    learning_rate=1e-4, weight_decay=1e-5, optimizer="adam", loss="dicece", flip_axes=(0, 1, 2),
                    val_fraction=0.2, cache_cases=8, sw_batch_size=1, sw_overlap=0.25, crop="posneg",
                    pos_fraction=0.8, affine_prob=0.0, intensity_prob=0.5, intensity_scale=0.1, intensity_shift=0.1,
                    noise_prob=0.0, amp=False)
    return BrainRecipe(task="brain-tumor", build_net=partial(ClassWrapper, network), modalities=modalities,
                       label_map=lmap, normalize="custom", defaults=defaults,
                       to_sample=BrainCaseToTensors(network, list(lmap.values())), network=network)
