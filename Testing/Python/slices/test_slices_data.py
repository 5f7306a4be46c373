"""Training data for slices: TotalSegmentator labels put onto a CT's voxels (flipped / permuted grids found,
other grids refused), the second patient's case, and the class-balanced slice sampling of the recipe."""

import numpy as np
import pytest
import torch

from deepsegrecon import cli
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.slices.data import labels_on_grid, read_totalseg_case
from deepsegrecon.slices.labels import read_label_set
from deepsegrecon.training.cases import load_case
from deepsegrecon.training.data import build_transforms
from deepsegrecon.training.engine import TrainConfig
from test_slices_cli import dicom_and_reference  # noqa: F401 (fixture)

torch.set_num_threads(1)


def _image(shape=(4, 5, 6)):
    rng = np.random.default_rng(0)
    return Image(rng.integers(0, 50, shape).astype(np.uint8), (0.8, 0.9, 2.0), (10.0, -20.0, 5.0))


def test_labels_on_a_flipped_grid_are_put_back_on_the_image_voxels():
    img = _image()
    flip_j = np.diag([1.0, -1.0, 1.0])  # rows stored bottom-up, as in the TotalSegmentator NIfTI
    origin = img.physical_points(np.array([[0.0, 4.0, 0.0]]))[0]
    lab = Image(img.array[:, ::-1, :], img.spacing, tuple(origin), flip_j)
    assert np.array_equal(labels_on_grid(lab, img), img.array)


def test_labels_with_swapped_axes_are_put_back_on_the_image_voxels():
    img = _image()
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # label i runs along image j
    lab = Image(np.swapaxes(img.array, 1, 2), (0.9, 0.8, 2.0), img.origin, swap)
    assert np.array_equal(labels_on_grid(lab, img), img.array)


@pytest.mark.parametrize("change", ["shape", "shift", "spacing"])
def test_labels_on_another_grid_are_refused(change):
    img = _image()
    lab = {"shape": Image(img.array[:, :4], img.spacing, img.origin),
           "shift": Image(img.array, img.spacing, (10.4, -20.0, 5.0)),
           "spacing": Image(img.array, (0.8, 0.9, 2.5), img.origin)}[change]
    with pytest.raises(InputError, match="do not lie on the image's voxels"):
        labels_on_grid(lab, img)


def test_second_patient_case_matches_a_sitk_resampling(shared_data, dicom_and_reference, tmp_path, capsys):
    """The 20-slice DICOM CT: its TotalSegmentator labels (stored with the rows flipped) mapped by name agree
    voxel for voxel with SimpleITK's physical resampling, and the CLI writes them as a training case."""
    folder = shared_data / "totalseg_ct_dicom"
    args = (folder / "dicom", folder / "labels_totalsegmentator.nii.gz", folder / "classes_total.json")
    ct, lab, present = read_totalseg_case(*args)
    _, ref_ct, _, ref = dicom_and_reference
    assert lab.same_grid(ref_ct) and np.array_equal(lab.array, ref)
    assert present == ["spleen", "liver", "stomach", "pancreas", "aorta"]
    liver = lab.array == read_label_set().by_name("liver").value
    assert 0 < np.median(ct.array[liver]) < 200  # soft tissue HU: the labels sit on the organ, not flipped off it

    out = tmp_path / "cases" / "totalseg"
    argv = ["slices-totalseg-case", *map(str, args[:2]), "--classes", str(args[2]), "-o", str(out)]
    assert cli.main(argv) == 0
    written = load_case(out, label_map=read_label_set().label_map()).load()
    assert written.label.same_grid(ct) and np.array_equal(written.label.array, lab.array)
    assert "organs present: spleen, liver, stomach, pancreas, aorta" in capsys.readouterr().out
    assert cli.main(argv) != 0  # an existing case is not overwritten
    assert "not empty" in capsys.readouterr().err


def test_classes_crop_draws_small_organs_as_often_as_large_ones():
    """Whole-slice patches from a stack where class 2 is in 1 slice of 40 and class 1 in all: each class is the
    centre of about a third of the draws (background, 1, 2), instead of class 2 hardly ever."""
    d, s = 40, 16
    label = np.zeros((1, d, s, s), np.int16)
    label[0, :, 2:12, 2:12] = 1
    label[0, 7, 12:14, 12:14] = 2
    sample = {"image": torch.as_tensor(label.astype(np.float32)), "label": torch.as_tensor(label),
              "roi": torch.ones((1, d, s, s), dtype=torch.uint8)}
    cfg = TrainConfig(patch_size=(1, s, s), crop="classes", samples_per_case=300, flip_axes=(), affine_prob=0,
                      intensity_prob=0, noise_prob=0).check()
    det, rnd = build_transforms(cfg, num_classes=3)
    rnd.set_random_state(0)
    patches = rnd(det(sample))
    with_2 = sum(bool((p["label"] == 2).any()) for p in patches)
    assert 70 < with_2 < 130, with_2
    with pytest.raises(InputError, match="number of classes"):
        build_transforms(cfg)
    with pytest.raises(InputError, match="posneg, classes or random"):
        TrainConfig(crop="balanced").check()
