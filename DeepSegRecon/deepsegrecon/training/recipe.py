"""What a task tells the training engine, and the one call the CLI / worker make: :func:`fit`.

A task that can be trained provides a :class:`Recipe`: how to build a fresh network, its modalities (channel
order and file patterns), its label map (class order), normalisation, and training defaults. The CLI finds
it with :func:`get_recipe`: ``"teeth"`` -> ``deepsegrecon.teeth.training:recipe`` (a function returning a
Recipe, or a Recipe), or any ``"package.module:attribute"`` reference (which is also how DDP processes
started by ``torchrun`` find it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .cases import find_cases, read_label_map
from .data import CaseToTensors
from .engine import TrainConfig, TrainResult, train


@dataclass
class Recipe:
    task: str
    build_net: Callable  # () -> torch.nn.Module, a fresh network
    modalities: dict  # {name: file glob pattern}, in channel order
    label_map: dict  # {name: label value}; class n = the n-th entry (background = class 0)
    normalize: object = "zscore"  # see CaseToTensors
    defaults: dict = field(default_factory=dict)  # TrainConfig settings the task prefers (patch size, flips ...)
    label_pattern: str | None = None
    roi_pattern: str | None = None
    to_sample: Callable | None = None  # default: CaseToTensors(modalities, label values, normalize)
    inferer: Callable | None = None  # default: sliding window with the patch size
    network: dict = field(default_factory=dict)  # manifest "network": how to rebuild the net

    def __post_init__(self):
        self.label_map = read_label_map(self.label_map)

    @property
    def num_classes(self) -> int:
        return len(self.label_map) + 1

    def sample_fn(self) -> Callable:
        return self.to_sample or CaseToTensors(list(self.modalities), list(self.label_map.values()), self.normalize)

    def config(self, **overrides) -> TrainConfig:
        """The task's defaults with ``overrides`` on top, taken literally: pass only what the user set
        (``epochs=None, minutes=M`` trains for M minutes however many epochs that is)."""
        return TrainConfig.from_dict(dict(self.defaults), **overrides)

    def find_cases(self, root) -> list:
        return find_cases(root, self.modalities, self.label_map, self.label_pattern, self.roi_pattern)

    def manifest(self, result: TrainResult, base_version: str | None = None, description: str = "") -> dict:
        """Manifest fields for ``ModelStore.write_version`` (the store adds files, sums and dates)."""
        return {"task": self.task, "labels": dict(self.label_map), "network": dict(self.network),
                "input_spec": {"modalities": list(self.modalities), "normalize": self.normalize
                               if isinstance(self.normalize, (str, list, tuple)) else "custom",
                               "patch_size": list(result.metrics["config"]["patch_size"])},
                "base_version": base_version, "description": description, **result.manifest_fields()}


def get_recipe(ref, **options) -> Recipe:
    """A task name (its capability's recipe, ``teeth`` -> ``deepsegrecon.teeth.training:recipe``) or a
    ``module:attribute`` reference; a callable attribute is called with ``options``."""
    from ..capability import recipe_ref

    ref = str(ref)
    target = ref if ":" in ref else recipe_ref(ref)
    if target is None:
        raise InputError(f"task '{ref}' cannot be trained (no training recipe)")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    obj = getattr(module, attr, None)
    if obj is None:
        raise InputError(f"{module_name} has no '{attr}'")
    recipe = obj(**options) if callable(obj) and not isinstance(obj, Recipe) else obj
    if not isinstance(recipe, Recipe):
        raise InputError(f"{ref} did not give a training Recipe")
    return recipe


def fit(recipe: Recipe, cases_dir, out_dir, config: TrainConfig | None = None, base_state: dict | None = None,
        progress=None, cancel=None, val_dir=None, distributed: bool = False, device=None) -> TrainResult:
    """Train (``base_state=None``) or fine-tune a task's network on the cases in ``cases_dir``.

    Writes ``out_dir/checkpoint.pt`` while training and, on success, ``out_dir/model.pt`` (best weights)
    and ``out_dir/metrics.json``. Install the result with ``ModelStore().write_version(task, version,
    {"model.pt": out_dir / "model.pt"}, recipe.manifest(result, base_version))``.
    """
    from monai.utils import set_determinism

    config = config or recipe.config()
    cases = recipe.find_cases(cases_dir)
    val_cases = recipe.find_cases(val_dir) if val_dir is not None else None
    set_determinism(seed=config.seed)  # the fresh network's initial weights are seeded too
    net = recipe.build_net()
    return train(net, cases, config, Path(out_dir), base_state=base_state, progress=progress, cancel=cancel,
                 distributed=distributed, num_classes=recipe.num_classes, to_sample=recipe.sample_fn(),
                 inferer=recipe.inferer, val_cases=val_cases, device=device)
