"""The capability registry (issue 23): what each subpackage declares is what it provides."""

import importlib
import subprocess
import sys

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
    assert set(cap.params) == set(cap.tasks)  # every task's typed parameters, named where hosts find them
    for task in cap.tasks:
        assert get_task(task).params_type is C.params_type(task)


def test_parameters_are_checked_without_torch():
    """A host (the Slicer panel) checks a job's parameters before starting it: no torch, MONAI or ITK for that."""
    code = ("import sys; from deepsegrecon import capability as C\n"
            "kinds = [C.params_type(t) for c in C.capabilities() for t in c.tasks]\n"
            "assert all(k.parse({'device': 'cpu'}).device == 'cpu' for k in kinds)\n"
            "print(sorted(m for m in ('torch', 'monai', 'itk', 'diffdrr', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lookups_by_task():
    assert C.capability_of("brain-tumor").package == "brain" and C.capability_of("drr").package == "xray"
    assert C.capability_of("no-such-task") is None and C.recipe_ref("cbct-recon") is None
    assert C.trainable_tasks() == ["brain-tumor", "slices", "teeth"]
    assert C.batch_tasks() == ["teeth", "slices", "cbct-recon", "xray-register", "brain-tumor"]
    assert C.region_label_hook("teeth") is None and C.batch_adapter("drr") is None
    with pytest.raises(InputError, match="unknown task 'no-such-task'; known tasks: .*teeth"):
        get_task("no-such-task")
