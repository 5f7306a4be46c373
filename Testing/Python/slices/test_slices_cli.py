"""deepsegrecon slices: DICOM in, .seg.nrrd / preview / metrics CSV out; bad input refused with nothing written;
training and fine-tuning through the engine's jobs (tiny network, fresh weights in a temporary store)."""

import csv
import json

import numpy as np
import pytest
import torch

from deepsegrecon import cli
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.io import read_image, write_image
from deepsegrecon.segio import read_seg_nrrd
from deepsegrecon.slices.labels import read_label_set
from deepsegrecon.slices.nets import SMALL, build_net
from deepsegrecon.store import ModelStore

torch.set_num_threads(1)
TINY = {**SMALL, "img_size": 32, "pixel_mm": 12.0, "width": 8, "blocks": [1, 1, 1], "groups": 4, "hidden": 32,
        "heads": 2, "mlp": 64, "layers": 1, "head_channels": 16, "decoder": [16, 8, 8, 8], "out_channels": 9,
        "classes": read_label_set().names, "context": 1, "window": [-125.0, 275.0]}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_store(tmp_path, monkeypatch):
    """A user store with 'tiny': a seeded, untrained tiny TransUNet (the shipped weights are not needed here)."""
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(build_net(TINY).state_dict(), path)
    ModelStore().write_version("slices", "tiny", {"model.pt": path},
                               {"task": "slices", "network": TINY, "labels": {"5": "liver"}})
    return tmp_path


@pytest.fixture(scope="module")
def dicom_and_reference(shared_data, tmp_path_factory):
    """The 20-slice DICOM CT and its TotalSegmentator labels resampled onto the DICOM grid (nearest), with the
    abdomen label set's values (TotalSegmentator's own values differ for the aorta)."""
    import SimpleITK as sitk

    folder = shared_data / "totalseg_ct_dicom"
    ct = read_image(folder / "dicom")
    ts = sitk.ReadImage(str(folder / "labels_totalsegmentator.nii.gz"))
    on_grid = sitk.Resample(ts, ct.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, ts.GetPixelID())
    names = json.loads((folder / "classes_total.json").read_text())
    src = sitk.GetArrayFromImage(on_grid)
    lab = np.zeros(src.shape, np.uint8)
    for organ in read_label_set().organs:
        for value, name in names.items():
            if name == organ.name:
                lab[src == int(value)] = organ.value
    path = tmp_path_factory.mktemp("ref") / "reference.nrrd"
    write_image(ct.with_array(lab), path)
    return folder / "dicom", ct, path, lab


def test_dicom_series_in_segmentation_and_metrics_out(capsys, tiny_store, dicom_and_reference):
    dicom, ct, ref_path, ref = dicom_and_reference
    out = tiny_store / "out"
    code, stdout, err = run(capsys, "slices", dicom, "-o", out, "--model", "tiny", "--reference", ref_path,
                            "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["dicom.seg.nrrd", "dicom_metrics.csv", "dicom_preview.png"]
    seg = read_seg_nrrd(out / "dicom.seg.nrrd")
    assert seg.labelmap.same_grid(ct)  # the DICOM series' own geometry
    names = read_label_set().names
    assert all(s.name in names for s in seg.segments)
    assert "absent:" in stdout
    with open(out / "dicom_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["organ"] for r in rows] == names
    vox_ml = float(np.prod(ct.spacing)) / 1000
    by = {r["organ"]: r for r in rows}
    for organ in ("liver", "spleen", "stomach", "aorta"):  # present in this slab (TotalSegmentator labels)
        n = int((ref == read_label_set().by_name(organ).value).sum())
        assert n > 0 and float(by[organ]["volume_ref_ml"]) == pytest.approx(n * vox_ml, rel=1e-3)
        assert by[organ]["status"] in ("ok", "missed")
    assert by["gallbladder"]["status"] in ("absent", "false positive")  # not in the reference


def _assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir())


def test_2d_image_is_refused(capsys, tiny_store):
    img = Image(np.zeros((64, 64), np.int16) - 1000, (0.8, 0.8), (0, 0), np.eye(2))
    img.array[20:40, 20:40] = 50
    path = tiny_store / "slice.nrrd"
    write_image(img, path)
    code, _, err = run(capsys, "slices", path, "-o", tiny_store / "out", "--model", "tiny")
    assert code == 2 and "2-D" in err
    _assert_nothing_written(tiny_store / "out")


def test_label_set_with_duplicate_values_is_refused(capsys, tiny_store, dicom_and_reference):
    bad = tiny_store / "organs.json"
    bad.write_text(json.dumps({"labels": [{"name": "liver", "value": 5}, {"name": "spleen", "value": 5}]}))
    code, _, err = run(capsys, "slices", dicom_and_reference[0], "-o", tiny_store / "out", "--model", "tiny",
                       "--labels", bad)
    assert code == 2 and "value 5 is used twice" in err
    _assert_nothing_written(tiny_store / "out")


def test_reference_of_another_geometry_is_refused(capsys, tiny_store, shared_data):
    # TotalSegmentator's own file: the same slab, but another grid (its rows run the other way)
    raw = shared_data / "totalseg_ct_dicom" / "labels_totalsegmentator.nii.gz"
    code, _, err = run(capsys, "slices", shared_data / "totalseg_ct_dicom" / "dicom", "-o", tiny_store / "out",
                       "--model", "tiny", "--reference", raw)
    assert code == 2 and "another geometry" in err
    _assert_nothing_written(tiny_store / "out")


def test_non_ct_intensities_warn(capsys, tiny_store):
    k, j, i = np.meshgrid(np.arange(12), np.arange(48), np.arange(40), indexing="ij")
    mri = (200 + 800 * (((j - 24) ** 2 + (i - 20) ** 2) < 150)).astype(np.float32)  # MR-like, no air at -1000
    path = tiny_store / "mri.nrrd"
    write_image(Image(mri, (1.0, 1.0, 3.0), (0, 0, 0), np.eye(3)), path)
    code, _, err = run(capsys, "slices", path, "-o", tiny_store / "out", "--model", "tiny", "--device", "cpu")
    assert code == 0, err
    assert "warning: the intensities" in err and "do not look like CT" in err


def test_unknown_model_and_label_set(capsys, tiny_store, dicom_and_reference):
    code, _, err = run(capsys, "slices", dicom_and_reference[0], "-o", tiny_store / "out", "--model", "nope")
    assert code == 3 and "nope" in err
    code, _, err = run(capsys, "slices", dicom_and_reference[0], "-o", tiny_store / "out", "--labels", "thorax")
    assert code == 2 and "unknown label set" in err
    _assert_nothing_written(tiny_store / "out")


# ------------------------------------------------------------------------------------------ training
def _case(folder, seed=0):
    """A small synthetic CT (air, body, a liver-like and a spleen-like blob) as a training case."""
    from deepsegrecon.training.cases import write_case

    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(np.arange(10), np.arange(64), np.arange(64), indexing="ij")
    body = ((j - 32) ** 2 + (i - 32) ** 2) < 28 ** 2
    liver = body & (((j - 30) ** 2 + (i - 20) ** 2) < 10 ** 2)
    spleen = body & (((j - 34) ** 2 + (i - 46) ** 2) < 6 ** 2)
    ct = np.where(body, 0.0, -1000.0) + np.where(liver, 60.0, 0) + np.where(spleen, 120.0, 0)
    ct = (ct + rng.normal(0, 10, ct.shape)).astype(np.float32)
    lab = np.where(liver, 5, np.where(spleen, 1, 0)).astype(np.uint8)
    grid = dict(spacing=(6.0, 6.0, 5.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    write_case(folder, {"image": Image(ct, **grid)}, Image(lab, **grid), read_label_set().label_map())


def test_train_and_finetune_through_the_jobs(tiny_store):
    from deepsegrecon.runner import run_inline
    from deepsegrecon.training import jobs  # noqa: F401 (registers train and finetune)

    cases = tiny_store / "cases"
    _case(cases / "a", 0)
    _case(cases / "b", 1)
    settings = {"iterations_per_epoch": 2, "samples_per_case": 2, "cache_cases": 2}
    res = run_inline("train", {}, {"task": "slices", "cases": str(cases), "name": "tiny-trained", "epochs": 2,
                                   "device": "cpu", "val_fraction": 0.5, "settings": settings,
                                   "recipe_options": {"network": TINY}})
    entry = ModelStore().get("slices", "tiny-trained")
    assert entry.manifest["network"]["img_size"] == 32 and entry.manifest["labels"]["5"] == "liver"
    state = torch.load(entry.path("model.pt"), weights_only=True)
    assert all(v.dtype == torch.float16 for k, v in state.items() if v.is_floating_point())
    assert res.history and res.history[-1]["val_dice"] is not None
    res2 = run_inline("finetune", {}, {"task": "slices", "cases": str(cases), "base": "tiny-trained",
                                       "name": "tiny-ft", "epochs": 1, "device": "cpu", "val_fraction": 0.5,
                                       "settings": settings})
    assert ModelStore().get("slices", "tiny-ft").manifest["base_version"] == "tiny-trained"
    assert res2.manifest["training"]["config"]["model"]["learning_rate"] == 1e-4  # the recipe's fine-tune rate
    # the new version runs
    from deepsegrecon.slices.task import load_model, segment

    img = read_image(next((cases / "a").glob("image*")))
    out = segment(img, load_model(ModelStore().get("slices", "tiny-ft")), read_label_set(), "cpu")
    assert out.labelmap.same_grid(img)


def test_recipe_refuses_a_label_map_out_of_order():
    from deepsegrecon.training.recipe import get_recipe

    r = get_recipe("slices")
    assert list(r.label_map) == read_label_set().names and r.num_classes == 9
    assert r.config().patch_size == (1, 128, 128) and r.config().flip_axes == ()
    with pytest.raises(InputError, match="must be the network's classes"):
        get_recipe("slices", label_map={"liver": 5, "spleen": 1})
