"""Generic recipes: a MONAI 3-D U-Net for any new structure (one or several labels), no task code needed.

    get_recipe("deepsegrecon.training.recipes_generic:generic_recipe", task="liver", label_map={"liver": 1})
    get_recipe("deepsegrecon.training.recipes_generic:binary_recipe", task="vertebrae", normalize=(-200, 1200))

The training jobs (:mod:`.jobs`) use :func:`generic_recipe` when asked to train a task that has no recipe of
its own but was given a label map. The network is rebuilt from the manifest's ``network`` with
:func:`build_generic_net`.
"""

from __future__ import annotations

from functools import partial

from ..errors import InputError
from .recipe import Recipe

DEFAULT_CHANNELS = (16, 32, 64, 128)


def build_generic_net(network: dict):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=int(network["in_channels"]), out_channels=int(network["out_channels"]),
                channels=tuple(network["channels"]), strides=tuple(network["strides"]),
                num_res_units=int(network.get("num_res_units", 1)), norm=network.get("norm", "instance"),
                dropout=float(network.get("dropout", 0.0)))


def generic_recipe(task: str, label_map, modalities: dict | None = None, normalize="zscore",
                   channels=DEFAULT_CHANNELS, patch_size=(96, 96, 96), num_res_units: int = 1, flips: bool = True,
                   network: dict | None = None, **defaults) -> Recipe:
    """A MONAI U-Net recipe for ``task`` with ``label_map`` ({name: value}; a file works too).

    ``normalize``: ``"zscore"`` or a ``(low, high)`` intensity window (e.g. HU for CT); ``flips``: mirror
    augmentation (leave it on only for left/right-symmetric labels); ``defaults``: TrainConfig settings.
    ``network`` (a manifest's) rebuilds the same net, for fine-tuning.
    """
    from .labels import read_label_map

    if label_map is None:
        raise InputError(f"training a new structure '{task}' needs a label map (names and values)")
    lmap = read_label_map(label_map)
    modalities = dict(modalities or {"image": "*"})
    channels = tuple(int(c) for c in channels)
    if network is None:
        network = {"arch": "monai.UNet", "in_channels": len(modalities), "out_channels": len(lmap) + 1,
                   "channels": list(channels), "strides": [2] * (len(channels) - 1), "num_res_units": num_res_units,
                   "norm": "instance"}
    elif int(network.get("out_channels", -1)) != len(lmap) + 1 or int(network.get("in_channels", -1)) != len(modalities):
        raise InputError(f"the base network has {network.get('in_channels')} input and {network.get('out_channels')} "
                         f"output channels; these cases have {len(modalities)} modalities and {len(lmap)} labels")
    levels = 2 ** (len(network["channels"]) - 1)
    patch = tuple(int(p) for p in patch_size)
    if any(p % levels for p in patch):
        raise InputError(f"patch_size {patch} must be a multiple of {levels} for this network")
    norm = list(normalize) if isinstance(normalize, (list, tuple)) else normalize
    cfg = dict(patch_size=patch, flip_axes=(0, 1, 2) if flips else (), learning_rate=1e-3, batch_size=2,
               samples_per_case=2, cache_cases=8, val_fraction=0.2, patience=0)
    cfg.update(defaults)
    return Recipe(task=task, build_net=partial(build_generic_net, dict(network)), modalities=modalities,
                  label_map=lmap, normalize=tuple(norm) if isinstance(norm, list) else norm, defaults=cfg,
                  network={**network, "normalize": norm, "patch_size": list(patch)})


def binary_recipe(task: str = "structure", name: str | None = None, **kw) -> Recipe:
    """One foreground class (label value 1) named ``name`` (default: the task name)."""
    kw.setdefault("label_map", {name or task: 1})
    return generic_recipe(task=task, **kw)
