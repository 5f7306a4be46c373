"""Brain tumour task and CLI: shipped weights on held-out phantoms, missing inputs, geometry in and out,
bad input (clear message, nothing written), outputs, the real BraTS 2023 case end to end."""

import csv

import numpy as np
import pytest

from conftest import oblique_direction
from deepsegrecon import cli
from deepsegrecon.brain import labels as L
from deepsegrecon.image import Image

# Regression floors for the shipped phantom-v1 weights on held-out phantom seeds (measured values are in the
# manifest and README; these sit a little below them).
FLOOR_4 = {"WT": 0.90, "TC": 0.85, "ET": 0.80}  # the bars
FLOOR_2 = {"WT": 0.85, "TC": 0.80, "ET": 0.75}  # seed 100001; FLAIR + T1c fails on some seeds (README)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom():
    from deepsegrecon.brain.phantom import make_phantom

    return make_phantom(100_001)  # a held-out seed


@pytest.fixture(scope="module")
def model():
    from deepsegrecon.brain.task import load_model
    from deepsegrecon.store import ModelStore

    return load_model(ModelStore().get("brain-tumor", "phantom-v1"))  # the phantom floors are phantom-v1's


def _dice(res, truth):
    from deepsegrecon.brain.evaluate import dice

    pr, gt = L.to_regions(res.labelmap.array), L.to_regions(truth)
    return {r: dice(pr[i], gt[i]) for i, r in enumerate(("ET", "TC", "WT"))}


def test_shipped_weights_on_a_held_out_phantom_all_inputs_and_flair_t1c(phantom, model):
    from deepsegrecon.brain.task import segment

    res4 = segment(phantom["images"], model)
    d4 = _dice(res4, phantom["labels"].array)
    assert all(d4[r] >= FLOOR_4[r] for r in d4), d4
    assert res4.report["inputs_used"] == ["t1", "t1c", "t2", "flair"] and res4.report["inputs_missing"] == []
    two = {m: phantom["images"][m] for m in ("flair", "t1c")}
    res2 = segment(two, model)
    d2 = _dice(res2, phantom["labels"].array)
    assert all(d2[r] >= FLOOR_2[r] for r in d2), d2
    assert res2.report["inputs_used"] == ["t1c", "flair"] and res2.report["inputs_missing"] == ["t1", "t2"]
    vols = res4.report["volumes_ml"]
    true = L.region_volumes_ml(phantom["labels"].array, (2, 2, 2))
    assert abs(vols["whole_tumor"] - true["whole_tumor"]) < 0.25 * true["whole_tumor"]
    assert vols["enhancing_tumor"] <= vols["tumor_core"] <= vols["whole_tumor"]


def test_oblique_anisotropic_inputs_give_labels_on_the_first_inputs_grid(phantom, model):
    """Inputs on an oblique 1.6 x 1.9 x 2.6 mm grid, one input on yet another grid: the labelmap has the first
    input's exact geometry, and it matches the truth resampled there."""
    from deepsegrecon.brain.preprocess import resample_to
    from deepsegrecon.brain.task import segment

    src = phantom["labels"]
    centre = src.physical_points(np.array(src.size)[None] / 2 - 0.5)[0]
    d = oblique_direction((0.15, -0.1, 0.2))
    sp = np.array([1.6, 1.9, 2.6])
    size = np.array([100, 100, 62])
    origin = centre - d @ (sp * (size - 1) / 2)
    grid = Image(np.zeros(tuple(size[::-1]), np.float32), tuple(sp), tuple(origin), d)
    imgs = {m: resample_to(phantom["images"][m], grid) for m in ("t1c", "flair", "t2")}
    other = Image(np.zeros((70, 80, 75), np.float32), (2.2, 2.2, 2.2), tuple(np.array(src.origin) + 3), src.direction)
    imgs["t2"] = resample_to(phantom["images"]["t2"], other)
    res = segment(imgs, model)
    assert res.labelmap.same_grid(imgs["t1c"]) and res.labelmap.array.shape == tuple(size[::-1])
    truth = resample_to(src, grid, order=0, dtype=np.uint8).array
    d = _dice(res, truth)
    assert d["WT"] >= FLOOR_2["WT"] - 0.05, d


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    from deepsegrecon.brain.phantom import write_phantom

    d = tmp_path_factory.mktemp("brain") / "case-007"
    write_phantom(100_002, d)
    return d


def test_cli_writes_region_segments_volumes_and_preview(capsys, phantom_dir, tmp_path):
    import slicerio

    out = tmp_path / "out"
    args = [f"--{m}={phantom_dir / (m + '.nrrd')}" for m in ("t1", "t1c", "t2", "flair")]
    code, stdout, err = run(capsys, "brain-tumor", *args, "-o", out, "--model", "phantom-v1")  # phantom weights
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["case-007.seg.nrrd", "case-007_preview.png",
                                                       "case-007_volumes.csv"]
    seg = slicerio.read_segmentation(str(out / "case-007.seg.nrrd"))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["enhancing_tumor", "tumor_core", "whole_tumor"]
    vox = seg["voxels"]
    assert vox.ndim == 4 and vox.shape[0] == 3  # overlapping: one layer each
    et, tc, wt = (vox[i] > 0 for i in range(3))
    assert wt.sum() > tc.sum() > et.sum() > 0 and not (et & ~tc).any() and not (tc & ~wt).any()
    assert [tuple(s["color"]) for s in seg["segments"]] == [L.COLORS[n] for n in names]
    assert seg["segments"][0]["terminology"]["type"][2] == "Neoplasm"
    rows = list(csv.DictReader((out / "case-007_volumes.csv").open()))
    assert [r["region"] for r in rows] == names
    ml = {r["region"]: float(r["volume_ml"]) for r in rows}
    assert abs(ml["whole_tumor"] - wt.sum() * 8 / 1000) < 0.01  # 2 mm voxels
    assert "whole_tumor" in stdout and "inputs used: t1, t1c, t2, flair" in stdout
    # BraTS labels on request
    out2 = tmp_path / "out2"
    code, stdout, err = run(capsys, "brain-tumor", f"--flair={phantom_dir / 'flair.nrrd'}",
                            f"--t1c={phantom_dir / 't1c.nrrd'}", "-o", out2, "--labels", "brats", "--model", "phantom-v1")
    assert code == 0, err
    from deepsegrecon.segio import read_seg_nrrd

    lab = read_seg_nrrd(out2 / "case-007.seg.nrrd")
    assert set(np.unique(lab.labelmap.array)) <= {0, 1, 2, 4} and 4 in lab.labelmap.array
    assert "missing: t1, t2" in stdout


def _bad(capsys, tmp_path, name, **arrays):
    """Run the CLI with the given modality images; expect exit 2, a message, and nothing written."""
    paths = []
    from deepsegrecon.io import write_image

    for m, img in arrays.items():
        p = tmp_path / f"{name}-{m}.nrrd"
        write_image(img, p)
        paths += [f"--{m}", p]
    out = tmp_path / f"out-{name}"
    code, stdout, err = run(capsys, "brain-tumor", *paths, "-o", out)
    assert code == 2 and not out.exists(), (code, err)
    return err


def test_bad_input_clear_message_nothing_written(capsys, tmp_path, phantom):
    flair, t1c = phantom["images"]["flair"], phantom["images"]["t1c"]
    assert "at least two" in _bad(capsys, tmp_path, "one", flair=flair)
    assert "FLAIR and T1c" in _bad(capsys, tmp_path, "pair", flair=flair, t2=phantom["images"]["t2"])
    flat = Image(flair.array[40].copy(), flair.spacing[:2], flair.origin[:2], np.eye(2))
    assert "2-D" in _bad(capsys, tmp_path, "2d", flair=flat, t1c=t1c)
    assert "no brain voxels" in _bad(capsys, tmp_path, "empty", flair=flair.with_array(np.zeros_like(flair.array)),
                                     t1c=t1c)
    far = Image(t1c.array, t1c.spacing, tuple(np.array(t1c.origin) + 900.0), t1c.direction)
    assert "does not overlap" in _bad(capsys, tmp_path, "far", flair=flair, t1c=far)
    nan = flair.array.copy()
    nan[10, 10, 10] = np.nan
    assert "NaN" in _bad(capsys, tmp_path, "nan", flair=flair.with_array(nan), t1c=t1c)
    code, _, err = run(capsys, "brain-tumor", "--flair", tmp_path / "missing.nii.gz", "--t1c", tmp_path / "x.nrrd",
                       "-o", tmp_path / "never")
    assert code == 2 and not (tmp_path / "never").exists()


def test_brain_phantom_command(capsys, tmp_path):
    code, out, err = run(capsys, "brain-phantom", "--seed", "5", "-o", tmp_path / "p", "--labels", "brats2021")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["flair.nrrd", "labels.seg.nrrd", "t1.nrrd",
                                                                 "t1c.nrrd", "t2.nrrd"]
    from deepsegrecon.segio import read_seg_nrrd

    lab = read_seg_nrrd(tmp_path / "p" / "labels.seg.nrrd").labelmap.array
    assert 4 in lab and 3 not in lab


def _left_of_midline(img, mask, midline):
    """Share of ``mask`` voxels on the patient's left (LPS L above ``midline``), from every 7th voxel."""
    pts = img.physical_points(np.argwhere(mask)[::7, ::-1].astype(float))
    return float((pts[:, 0] > midline).mean())


@pytest.fixture(scope="module")
def real_case(shared_data, tmp_path_factory):
    """The real 4-input BraTS 2023 case (240 x 240 x 155, 1 mm) through the full CLI, once for the tests below."""
    from deepsegrecon.io import read_image
    from deepsegrecon.segio import read_seg_nrrd

    case = shared_data / "brats2023_gli_00001"
    files = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
    out = tmp_path_factory.mktemp("real")
    code = cli.main(["brain-tumor", *[f"--{m}={case / (f + '.nii.gz')}" for m, f in files.items()],
                     "-o", str(out), "--labels", "brats2023"])
    assert code == 0
    ml = {r["region"]: float(r["volume_ml"]) for r in csv.DictReader((out / "brats2023_gli_00001_volumes.csv").open())}
    return {"ref": read_image(case / "t1n.nii.gz"), "flair": read_image(case / "t2f.nii.gz"), "ml": ml,
            "lab": read_seg_nrrd(out / "brats2023_gli_00001.seg.nrrd").labelmap}


@pytest.mark.slow
def test_real_brats2023_case_end_to_end(real_case):
    """The real case, full CLI: the output has the input's exact geometry, nested regions inside the brain and a
    whole-tumour volume in the range of gliomas, in mL that match the labelmap."""
    ref, lab, ml = real_case["ref"], real_case["lab"], real_case["ml"]
    assert ref.array.shape == (155, 240, 240)
    assert lab.array.shape == ref.array.shape and lab.same_grid(ref)
    et, tc, wt = L.to_regions(np.asarray(lab.array))
    assert not (et & ~tc).any() and not (tc & ~wt).any() and et.any()
    assert abs(ml["whole_tumor"] - wt.sum() / 1000) < 0.01  # 1 mm voxels
    assert 5.0 < ml["whole_tumor"] < 400.0, ml  # a glioma-sized volume (where it lies: the next test)
    assert not wt[np.asarray(real_case["flair"].array) == 0].any()


@pytest.mark.slow
def test_real_brats2023_tumour_where_the_image_shows_it(real_case):
    """There is no ground truth, so the tumour's place is checked against the image itself: the case has one
    large mass whose oedema makes FLAIR abnormally bright in one hemisphere. The whole tumour must be a plausible
    glioma volume, mostly one connected piece, on the side where FLAIR is abnormally bright, and much brighter on
    FLAIR than the brain on average. phantom-v1 failed it (it labels the brain's outer rim and the falx: 70 % of its
    WT in the wrong hemisphere, mean FLAIR z-score -0.1); the default weights, trained on real patients, pass."""
    from scipy import ndimage as ndi

    flair, ml = real_case["flair"], real_case["ml"]
    _, _, wt = L.to_regions(np.asarray(real_case["lab"].array))
    a = np.asarray(flair.array, np.float32)
    brain = a != 0
    z = (a - a[brain].mean()) / a[brain].std()
    midline = float(np.median(flair.physical_points(np.argwhere(brain)[::97, ::-1].astype(float))[:, 0]))
    hot_left = _left_of_midline(flair, brain & (z > 2.0), midline)
    assert hot_left > 0.8 or hot_left < 0.2, hot_left  # the case itself: one hemisphere is abnormally bright
    assert 20.0 < ml["whole_tumor"] < 250.0, ml
    comp, _ = ndi.label(wt)
    assert np.bincount(comp.ravel())[1:].max() >= 0.8 * wt.sum(), "the whole tumour is scattered"
    wt_left = _left_of_midline(flair, wt, midline)
    assert (wt_left > 0.8) if hot_left > 0.5 else (wt_left < 0.2), (hot_left, wt_left)
    assert float(z[wt].mean()) > 1.0
