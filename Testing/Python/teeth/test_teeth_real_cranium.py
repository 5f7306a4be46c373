"""Segment Teeth on a real head CT (issue 19): Debian's ``Cranium.inv3`` (``apt-get install invesalius-examples``;
``make test`` installs it when it can), read with its true orientation, and the reference labelling of its upper
teeth made by ``Testing/Data/make_cranium_teeth_reference.py``.

The reference tests are quick. The pipeline test runs the shipped teeth pipeline (phantom-v4, trained with head
phantoms and real scans without teeth; never on this scan) on the whole scan (about a minute on the CPU, ``slow``)
and holds it to the issue's bar.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("make_cranium_teeth_reference",
                                               ROOT / "Testing" / "Data" / "make_cranium_teeth_reference.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

pytestmark = pytest.mark.skipif(not R.CRANIUM.is_file(), reason=R.MISSING)


@pytest.fixture(scope="module")
def cranium():
    return R.read_cranium()


@pytest.fixture(scope="module")
def reference(cranium):
    return R.load_reference()


def test_stored_reference_is_what_the_script_makes(cranium, reference):
    """The stored labelmap is the script's output on the Debian file (deterministic), on a sub-grid of the scan."""
    fresh = R.make_reference(cranium)
    assert reference.same_grid(fresh) and np.array_equal(reference.array, fresh.array)
    assert R.REFERENCE.stat().st_size < 200_000
    assert np.array_equal(R.on_grid(reference, cranium)[R.BOX[0][0]:R.BOX[0][1], R.BOX[1][0]:R.BOX[1][1],
                                                        R.BOX[2][0]:R.BOX[2][1]], reference.array)


def test_reference_labelling_is_a_plausible_upper_dentition(cranium, reference):
    """10-16 upper teeth, each a crown with its roots (>= 6 slices, 0.3-1.5 cm3), all within 20 mm of the lowest
    slice and in the front half of the head; the reference meets the bar against itself."""
    from deepsegrecon.teeth import labels as L

    lab = R.on_grid(reference, cranium)
    teeth = [int(v) for v in np.unique(lab) if v]
    assert 10 <= len(teeth) <= 16 and all(L.is_upper(f) for f in teeth)
    assert len(teeth) == len(R.SEEDS) == 11
    vox = float(np.prod(cranium.spacing))
    for f in teeth:
        m = lab == f
        slices = np.nonzero(m.any((1, 2)))[0]
        assert slices.min() == 0 and len(slices) >= 6, (f, slices)  # crown in the lowest slice, roots above
        assert 300 <= m.sum() * vox <= 1500, (f, m.sum() * vox)
        assert len(slices) == slices.max() - slices.min() + 1  # one piece from crown to apex
    pts = cranium.physical_points(np.argwhere(lab > 0)[:, ::-1])
    z_low = cranium.physical_points(np.array([[0, 0, 0]]))[0, 2]
    assert pts[:, 2].max() - z_low <= R.MAX_HEIGHT_MM
    assert pts[:, 1].max() < R.head_middle_y(cranium)  # LPS: front = smaller y
    # the arch: incisors in front, molars at the back, the two sides on either side of the midline
    cent = {f: cranium.physical_points(np.argwhere(lab == f)[:, ::-1]).mean(0) for f in teeth}
    assert max(cent[11][1], cent[21][1]) < min(cent[17][1], cent[27][1]) - 25.0
    assert all(cent[f][0] < cent[11][0] + 1 for f in teeth if f < 20)
    assert all(cent[f][0] > cent[21][0] - 1 for f in teeth if f > 20)
    self_scores = R.compare(lab, lab, cranium)
    assert self_scores["meets_bar"] and self_scores["teeth_found"] == 11
    assert self_scores["fdi_agreement_up_to_mirror"] == 1.0 and self_scores["mean_dice"] == 1.0


def test_scores_judge_fdi_up_to_a_mirror(cranium, reference):
    """The yardstick: the mirrored numbering (and 14/24 for the premolars) agrees fully; teeth on the forehead,
    lower teeth and missed teeth fail the bar."""
    lab = R.on_grid(reference, cranium)
    mirrored = np.where(lab > 0, (3 - lab // 10) * 10 + lab % 10, 0).astype(np.uint8)
    mirrored[mirrored == 15] = 14
    s = R.compare(mirrored, lab, cranium)
    assert s["fdi_agreement_up_to_mirror"] == 1.0 and s["fdi_agreement_as_is"] == 0 and s["meets_bar"]
    bad = np.where(np.isin(lab, (11, 12)), 0, lab)  # two teeth missed
    bad[100:104, 60:64, 120:124] = 21  # a "tooth" on the forehead, behind the middle of the head
    bad[0:2, 215:217, 100:102] = 41  # a lower tooth
    s = R.compare(bad, lab, cranium)
    assert s["teeth_found"] == 9 and not s["meets_bar"]
    assert len(s["bar_failures"]) == 4 and s["predicted_lower_teeth"] == [41]
    assert s["dice_per_tooth"]["11"] == 0.0 and s["tooth_voxels_above_20mm"] == 64


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_shipped_pipeline_finds_the_upper_teeth(cranium, reference):
    """The issue's bar: >= 10 upper teeth found in the mouth (Dice >= 0.5 against the reference), no lower teeth,
    no tooth voxel higher than 20 mm above the lowest slice or in the back half of the head."""
    from deepsegrecon.errors import InputError
    from deepsegrecon.runner import run_inline

    try:
        result = run_inline("teeth", {"image": cranium}, {"device": "cpu"})
        pred = result.labelmap.array
    except InputError as e:  # the result withheld ("no teeth found"): no tooth claimed
        pred, why = np.zeros(cranium.array.shape, np.uint8), str(e)
    else:
        why = ""
    s = R.compare(pred, R.on_grid(reference, cranium), cranium)
    summary = {k: s[k] for k in ("teeth_found", "mean_dice", "predicted_teeth", "dice_per_tooth",
                                 "fdi_agreement_up_to_mirror", "max_tooth_height_above_lowest_slice_mm",
                                 "tooth_voxels_in_back_half")}
    assert s["meets_bar"], f"{'; '.join(s['bar_failures'])} {why} {summary}"
    # floors under what phantom-v4 measured (11 found, mean Dice 0.82, FDI up to a mirror 0.73)
    assert s["mean_dice"] >= 0.7 and s["fdi_agreement_up_to_mirror"] >= 0.6, summary
