"""The capability registry (issue 23): what each subpackage declares is what it provides."""

import importlib

import pytest

from deepsegrecon import capability as C
from deepsegrecon.errors import InputError
from deepsegrecon.task import _REGISTRY, get_task


@pytest.mark.parametrize("cap", C.capabilities(), ids=lambda c: c.package)
def test_each_declaration_matches_its_package(cap):
    importlib.import_module(cap.module(cap.task_module))
    assert set(cap.tasks) <= set(_REGISTRY)  # importing its task module registers every task it names
    cli = importlib.import_module(cap.module(cap.cli))
    assert cli.COMMANDS and callable(cli.add_parsers)
    for task, ref in cap.recipes.items():
        assert task in cap.tasks and C.recipe_ref(task) == cap.module(ref)
    for task in cap.batch_adapters:
        assert C.batch_adapter(task).task == task
    for task in cap.region_label_hooks:
        assert callable(C.region_label_hook(task))


def test_lookups_by_task():
    assert C.capability_of("brain-tumor").package == "brain" and C.capability_of("drr").package == "xray"
    assert C.capability_of("no-such-task") is None and C.recipe_ref("cbct-recon") is None
    assert C.trainable_tasks() == ["brain-tumor", "slices", "teeth"]
    assert C.batch_tasks() == ["teeth", "slices", "cbct-recon", "xray-register", "brain-tumor"]
    assert C.region_label_hook("teeth") is None and C.batch_adapter("drr") is None
    with pytest.raises(InputError, match="unknown task 'no-such-task'; known tasks: .*teeth"):
        get_task("no-such-task")
