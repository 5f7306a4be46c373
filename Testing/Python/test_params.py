"""Typed task parameters: every task declares them, and a run refuses unknown keys and wrong types before any
work, naming the key, the type it needs and the allowed keys."""

import numpy as np
import pytest

from deepsegrecon.capability import import_task_modules
from deepsegrecon.errors import InputError
from deepsegrecon.params import Params
from deepsegrecon.task import _REGISTRY, get_task


def test_every_task_declares_its_parameters_and_their_defaults_parse():
    import deepsegrecon.training.jobs  # noqa: F401 (train, finetune)

    import_task_modules()
    assert {"teeth", "brain-tumor", "slices", "cbct-recon", "xray-register", "drr", "train", "finetune"} <= set(_REGISTRY)
    for name in [n for n, cls in _REGISTRY.items() if cls.__module__.startswith("deepsegrecon.")]:
        task = get_task(name)
        assert issubclass(task.params_type, Params), name
        defaults = task.default_params()
        assert task.parse_params(defaults).to_dict() == defaults, name
        assert "device" in defaults and "model" in defaults, name


def test_values_are_converted_and_bad_ones_refused_with_the_key_named():
    task = get_task("cbct-recon")
    p = task.parse_params({"views": np.int64(8), "photons": 100000, "compare": ("fdk",), "seed": 3.0})
    assert (p.views, p.photons, p.compare, p.seed) == (8, 100000.0, ["fdk"], 3)
    assert type(p.views) is int and type(p.photons) is float
    assert p.detector == 128 and p["detector"] == 128 and p.get("nothing", 5) == 5 and {**p}["views"] == 8
    with pytest.raises(InputError, match=r"cbct-recon has no parameter 'view'; its parameters are: device, model"):
        task.parse_params({"view": 8})
    with pytest.raises(InputError, match=r"parameter 'views' must be a whole number or null, got 8.5"):
        task.parse_params({"views": 8.5})
    with pytest.raises(InputError, match=r"parameter 'noise' must be true or false, got 'yes'"):
        task.parse_params({"noise": "yes"})
    with pytest.raises(InputError, match=r"parameter 'seed' must be a whole number, got True"):
        task.parse_params({"seed": True})
    with pytest.raises(InputError, match=r"parameter 'photons' must be a number, got nan"):
        task.parse_params({"photons": float("nan")})
    p["views"] = 10.0
    assert p.views == 10
    with pytest.raises(InputError, match="must be a whole number"):
        p["views"] = "ten"


def test_a_run_refuses_an_unknown_parameter_before_any_work(tmp_path):
    from deepsegrecon import run
    from deepsegrecon.image import Image

    img = Image(np.zeros((8, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="teeth has no parameter 'tta_passes'"):
        run("teeth", {"image": img}, {"tta_passes": 2})
