"""Head phantoms (issue 19) and the post-processing rules that real head scans needed: one arch only, and a root
cut off its crown."""

import numpy as np
import pytest

from deepsegrecon.teeth import labels as L
from deepsegrecon.teeth.head import generate_head_phantom
from deepsegrecon.teeth.phantom import generate_teeth_phantom
from deepsegrecon.teeth.postprocess import merge_stacked, single_arch


@pytest.mark.parametrize("field", ["upper", "above"])
def test_head_phantom_fields(field):
    """An upper-arch scan holds upper teeth only, their crowns at the bottom edge; a scan above the roots holds
    none; skull, sinuses and spine are there but never labelled."""
    img, lab, info = generate_head_phantom(7, spacing=1.0, field=field, modality="CT")
    assert img.array.shape == lab.array.shape and img.spacing[0] == 1.0
    teeth = [f for f in np.unique(lab.array) if f in L.FDI]
    air = img.array < -500
    bone = img.array > 600
    assert air.mean() > 0.02 and bone.mean() > 0.01
    if field == "above":
        assert not teeth and info["present"] == []
        return
    assert len(teeth) >= 10 and all(L.is_upper(int(f)) for f in teeth)
    z = np.nonzero(np.isin(lab.array, L.FDI).any((1, 2)))[0]
    assert z.min() <= 3  # the scan starts at the occlusal plane
    # bone outside the jaws is background: most bright voxels carry no label
    assert np.count_nonzero(bone & (lab.array == 0)) > 0.3 * np.count_nonzero(bone)


def test_truncated_cbct_labels_only_what_it_images():
    """A CBCT whose field of view is a truncated cylinder is dark outside it, and nothing is labelled there: teeth
    the scanner did not see are not asked of the networks (some were, before)."""
    img, lab, info = generate_head_phantom(1, spacing=1.0, field="jaws", modality="CBCT")
    assert "truncated_mm" in info["render"]
    _, Y, X = img.array.shape
    yy, xx = np.mgrid[0:Y, 0:X]
    outside = np.hypot(yy - Y / 2, xx - X / 2) > info["render"]["truncated_mm"] + 1.0
    assert outside.any() and np.ptp(img.array[:, outside]) == 0  # the constant fill (the grey scale may shift it)
    assert not lab.array[:, outside].any()
    assert np.isin(lab.array, L.FDI).sum() > 2000  # the teeth inside are still labelled


def _cached_sample():
    x1 = np.full((8, 8, 8), 1.8, np.float16)  # dentin-bright, scale 1000
    x1[:, :, :4] = -1.0  # air
    y1 = np.zeros((4, 8, 8, 8), np.uint8)
    y1[3] = 255
    return {"x1": x1, "y1": y1}


def test_teeth_labels_on_air_move_to_background():
    from deepsegrecon.teeth.train_head import _no_teeth_in_air

    s = _cached_sample()
    _no_teeth_in_air(s)
    assert not s["y1"][3][:, :, :4].any() and (s["y1"][0][:, :, :4] == 255).all()
    assert (s["y1"][3][:, :, 4:] == 255).all() and not s["y1"][0][:, :, 4:].any()


def test_head_phantom_is_deterministic_and_tilted():
    a = generate_head_phantom(11, spacing=1.0, field="jaws")
    b = generate_head_phantom(11, spacing=1.0, field="jaws")
    assert np.array_equal(a[0].array, b[0].array) and a[2]["tilt_deg"] == b[2]["tilt_deg"]


def _heights_values(seed, keep):
    """Teeth voxel heights and intensities of a jaw phantom, keeping ``keep`` ('both', 'upper', 'lower')."""
    img, lab, _ = generate_teeth_phantom(seed, shape=(90, 80, 70))
    m = np.isin(lab.array, [f for f in L.FDI if keep == "both" or L.is_upper(f) == (keep == "upper")])
    k = np.argwhere(m)
    return img.physical_points(k[:, ::-1])[:, 2], img.array[m].astype(float)


@pytest.mark.parametrize("keep, expected", [("both", None), ("upper", "upper"), ("lower", "lower")])
def test_single_arch_from_where_the_crowns_lie(keep, expected):
    h, v = _heights_values(3, keep)
    assert single_arch(h, v) == expected
    assert single_arch(-h, v) == {"upper": "lower", "lower": "upper", None: None}[expected]  # head upside down


def test_a_root_cut_off_its_crown_is_joined_but_not_an_opposing_or_a_neighbouring_tooth():
    inst = np.zeros((30, 10, 30), np.int32)
    inst[2:8, 2:8, 2:8] = 1  # crown
    inst[8:20, 3:7, 3:7] = 2  # its root, above
    inst[2:8, 2:8, 8:14] = 3  # the neighbour beside it
    inst[20:28, 3:7, 3:7] = 4  # above the root, but of the other jaw
    key = np.where(inst > 0, 1, 0)
    key[inst == 4] = 12
    out = merge_stacked(inst, key, lambda idx: np.asarray(idx, float)[:, ::-1])  # (k, j, i) -> (x, y, z): z = k
    assert out[5, 5, 5] == out[15, 5, 5] != out[5, 5, 10]
    assert out[25, 5, 5] not in (out[5, 5, 5], out[5, 5, 10])
