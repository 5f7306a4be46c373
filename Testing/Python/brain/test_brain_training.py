"""`deepsegrecon train brain-tumor --cases DIR` on two-input (FLAIR + T1c) phantom cases: a new model version
that the task runs; the paper-faithful pieces of the recipe; a labelmap with unknown values is refused."""

import shutil

import numpy as np
import pytest
import torch

from deepsegrecon import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from deepsegrecon.brain.phantom import write_phantom

    root = tmp_path_factory.mktemp("brain-cases")
    for seed in (21, 22):
        d = root / "full" / f"case{seed}"
        write_phantom(seed, d)
        two = root / "two" / f"case{seed}"
        two.mkdir(parents=True)
        for f in ("flair.nrrd", "t1c.nrrd", "labels.seg.nrrd"):
            shutil.copy(d / f, two / f)
    return root


def test_class_logits_follow_the_nested_regions():
    from deepsegrecon.brain.training import region_to_class_logits

    seg = torch.tensor([[-9.0, 9.0, 9.0], [9.0, 9.0, 9.0], [-9.0, -9.0, 9.0], [-9.0, -9.0, -9.0]])  # ET, TC, WT
    probs = region_to_class_logits(seg[:, :, None, None, None]).exp()[:, :, 0, 0, 0]
    assert torch.allclose(probs.sum(1), torch.ones(4))
    assert probs.argmax(1).tolist() == [1, 3, 2, 0]  # necrosis, enhancing, oedema, background


def test_wrapper_adds_the_vae_terms_to_the_gradient():
    from deepsegrecon.brain.nets import default_network
    from deepsegrecon.brain.training import ClassWrapper

    torch.manual_seed(0)
    w = ClassWrapper(default_network(8, (16, 16, 16)))
    w.train()
    x = torch.randn(1, 4, 16, 16, 16)
    out = w(x)
    assert out.shape == (1, 4, 16, 16, 16)
    out.sum().backward()  # the class scores alone do not reach the VAE decoder; the added terms do
    assert w.net.vae_end.conv.weight.grad is not None and w.net.vae_end.conv.weight.grad.abs().sum() > 0
    w.eval()
    with torch.no_grad():
        assert w(torch.randn(1, 4, 24, 16, 32)).shape == (1, 4, 24, 16, 32)
    assert not any(k.startswith("net.") for k in w.state_dict())


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_on_flair_t1c_cases_gives_a_version_the_task_runs(capsys, cases, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    code, out, err = run(capsys, "train", "brain-tumor", "--cases", cases / "two", "--image", "t1c=t1c.*",
                         "--image", "flair=flair.*", "--epochs", "1", "--set", "iterations_per_epoch=2",
                         "--val-fraction", "0.5", "--name", "two-input-v1", "--device", "cpu")
    assert code == 0, err
    from deepsegrecon.store import ModelStore

    entry = ModelStore().get("brain-tumor", "two-input-v1")
    m = entry.manifest
    assert m["task"] == "brain-tumor" and list(entry.files) == ["model.pt"]
    assert m["input_spec"]["case_modalities"] == ["t1c", "flair"] and m["network"]["init_filters"] == 8
    state = torch.load(entry.dir / "model.pt", weights_only=True)
    assert not any(k.startswith(("vd", "vu", "vae")) for k in state)  # the VAE is a training-time regulariser
    assert m["training"]["history"] and np.isfinite(m["training"]["history"][0]["loss"])
    # the new version segments a case from FLAIR + T1c
    from deepsegrecon.io import read_image
    from deepsegrecon.runner import run_inline

    imgs = {n: read_image(cases / "two" / "case21" / f"{n}.nrrd") for n in ("flair", "t1c")}
    res = run_inline("brain-tumor", imgs, {"device": "cpu", "model": "two-input-v1"})
    assert res.labelmap.same_grid(imgs["flair"]) and res.report["model"] == "two-input-v1"


def test_training_refuses_unknown_label_values_and_writes_nothing(capsys, cases, tmp_path, monkeypatch):
    from deepsegrecon.io import read_image, write_image

    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad" / "case1"
    shutil.copytree(cases / "two" / "case21", bad)
    (bad / "labels.seg.nrrd").unlink()
    lab = read_image(cases / "full" / "case21" / "t1c.nrrd")
    arr = np.zeros(lab.array.shape, np.uint8)
    arr[30:40, 40:50, 30:40] = 5
    write_image(lab.with_array(arr), bad / "label.nrrd")
    code, out, err = run(capsys, "train", "brain-tumor", "--cases", tmp_path / "bad", "--image", "t1c=t1c.*",
                         "--image", "flair=flair.*", "--epochs", "1", "--name", "bad-v1", "--device", "cpu")
    assert code == 2 and "5" in err and ("label" in err.lower())
    assert not (tmp_path / "home" / "models" / "brain-tumor" / "bad-v1").exists()
