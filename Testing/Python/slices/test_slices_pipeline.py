"""Slice pipeline (windowing, resizing, 2.5D context, geometry round trip), label sets and metrics."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import oblique_direction
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.slices import metrics as M
from deepsegrecon.slices import pipeline as P
from deepsegrecon.slices.labels import read_label_set
from deepsegrecon.slices.task import SliceModel, ct_warning, segment

torch.set_num_threads(1)


def test_window_and_physical_pixel_size():
    # a disc of radius 30 mm on 0.5 mm pixels, off-centre; the body box centre is the disc's centre
    r, c = np.meshgrid(np.arange(400), np.arange(300), indexing="ij")
    disc = ((r - 250) * 0.5) ** 2 + ((c - 120) * 0.5) ** 2 < 30.0 ** 2
    vol = np.where(disc, 75.0, -1000.0)[None].astype(np.float32)  # 75 HU: the middle of [-125, 275]
    grid = P.slice_grid(vol, (0.5, 0.5), {"img_size": 32, "pixel_mm": 3.0})
    assert grid.centre == pytest.approx((250.0, 120.0), abs=0.5)
    x = P.slices_to_net(vol, grid)
    assert x.shape == (1, 32, 32)
    inside = x[0] > 0.25
    assert float(x[0].max()) == pytest.approx(0.5, abs=1e-4) and float(x[0].min()) == 0.0
    # 3 mm pixels: the disc covers pi * 10^2 pixels, centred on the grid
    assert inside.sum().item() == pytest.approx(math.pi * 100, rel=0.08)
    rows, cols = np.nonzero(inside.numpy())
    assert rows.mean() == pytest.approx(15.5, abs=0.3) and cols.mean() == pytest.approx(15.5, abs=0.3)


def test_grid_round_trip_and_outside_is_background():
    r, c = np.meshgrid(np.arange(90), np.arange(120), indexing="ij")
    lab = np.zeros((1, 90, 120), np.int64)
    lab[0, 30:60, 40:80] = 1  # 15 x 20 mm box on 0.5 mm pixels
    lab[0, 50:60, 60:80] = 2
    grid = P.SliceGrid((90, 120), (0.5, 0.5), (45.0, 60.0), 24, 1.0)  # 24 mm field of view: part of the slice
    y = P.labels_to_net(lab, 3, grid)
    assert (y == 1).sum() == 15 * 20 - (y == 2).sum() and (y == 2).sum() == 5 * 10
    back = grid.from_net(F.one_hot(y, 3).permute(0, 3, 1, 2).float()).argmax(1)[0].numpy()
    assert back.shape == (90, 120)
    inner = slice(22, 68), slice(12, 108)  # within the field of view
    assert (back[inner] == lab[0][inner]).mean() > 0.97
    assert (back[:, :10] == 0).all()  # outside the network's field of view: background


def test_context_channels():
    x = torch.arange(4.0)[:, None, None].expand(4, 2, 2)
    c = P.with_context(x, 1, 3)
    assert c.shape == (4, 3, 2, 2)
    assert c[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert P.with_context(x, 0, 3)[2, :, 0, 0].tolist() == [2, 2, 2]


def test_largest_component_per_class():
    lab = np.zeros((5, 10, 10), np.uint8)
    lab[1:4, 1:5, 1:5] = 3
    lab[2, 8, 8] = 3  # a speck
    lab[0, 0, 9] = 5
    out = P.largest_components(lab.copy(), [3, 5])
    assert out[2, 8, 8] == 0 and (out == 3).sum() == 3 * 16 and out[0, 0, 9] == 5


class _ThresholdNet(torch.nn.Module):
    """Class 1 where the centre channel is bright (over 0.6 of the window), class 0 elsewhere."""

    def forward(self, x):
        c = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        return torch.cat([torch.zeros_like(c), (c - 0.6) * 50], 1)


def _phantom(direction, spacing):
    k, j, i = np.meshgrid(np.arange(24), np.arange(60), np.arange(50), indexing="ij")
    ball = ((k - 12) * spacing[2]) ** 2 + ((j - 30) * spacing[1]) ** 2 + ((i - 22) * spacing[0]) ** 2 < 18.0 ** 2
    arr = np.where(ball, 250.0, -1000.0).astype(np.float32)
    arr[:, :3, :3] = 40.0
    return Image(arr, spacing, (10.0, -20.0, 5.0), direction), ball


@pytest.mark.parametrize("oblique", [False, True])
def test_segment_returns_labels_on_the_input_grid(oblique):
    direction = oblique_direction() if oblique else np.diag([1.0, -1.0, 1.0])
    img, ball = _phantom(direction, (0.8, 0.6, 2.5))
    lset = read_label_set()
    classes = ["liver"]
    model = SliceModel(_ThresholdNet(), {"img_size": 32, "pixel_mm": 1.5, "classes": classes, "context": 1,
                                           "in_channels": 3},
                       "test")
    res = segment(img, model, read_label_set(_one_organ_set(lset)), "cpu", batch=5)
    assert res.labelmap.same_grid(img)
    liver = res.labelmap.array == 5
    dice = 2 * (liver & ball).sum() / (liver.sum() + ball.sum())
    assert dice > 0.9
    assert [s.name for s in res.segments] == ["liver"] and res.segments[0].label == 5
    assert "Liver" in res.segments[0].terminology
    assert res.report["organs"]["liver"]["volume_ml"] == pytest.approx(ball.sum() * 0.8 * 0.6 * 2.5 / 1000, rel=0.1)


def _one_organ_set(lset):
    o = lset.by_name("liver")
    return {"name": "liver only", "labels": [{"name": o.name, "value": o.value, "color": list(o.color),
                                              "terminology": o.terminology}]}


def test_segment_refuses_organs_the_model_does_not_know():
    img, _ = _phantom(np.eye(3), (1.0, 1.0, 2.0))
    model = SliceModel(_ThresholdNet(), {"img_size": 32, "classes": ["liver"], "context": 1, "in_channels": 3})
    with pytest.raises(InputError, match="does not segment spleen"):
        segment(img, model, read_label_set(), "cpu")


def test_ct_warning():
    img, _ = _phantom(np.eye(3), (1.0, 1.0, 2.0))
    assert ct_warning(img) is None
    mri = img.with_array((img.array + 1000.0) / 1250.0)
    assert "do not look like CT" in ct_warning(mri)


# ------------------------------------------------------------------------------------------ label sets
def test_default_label_set():
    lset = read_label_set()
    assert lset.names == ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
                          "aorta"]
    assert len({o.value for o in lset.organs}) == 8
    assert lset.by_name("kidney_left").info().terminology.count("~") == 6


@pytest.mark.parametrize("labels, message", [
    ([{"name": "liver", "value": 1}, {"name": "spleen", "value": 1}], "value 1 is used twice"),
    ([{"name": "liver", "value": 1}, {"name": "liver", "value": 2}], "'liver' is used twice"),
    ([{"name": "liver", "value": 0}], "1..255"),
    ([{"name": "liver", "value": 2, "color": [1, 2, 3]}], "colour"),
    ([], "non-empty"),
])
def test_bad_label_set_files(tmp_path, labels, message):
    f = tmp_path / "set.json"
    f.write_text(json.dumps({"name": "x", "labels": labels}))
    with pytest.raises(InputError, match=message):
        read_label_set(f)


def test_unknown_label_set_name():
    with pytest.raises(InputError, match="unknown label set 'thorax'.*abdomen"):
        read_label_set("thorax")


# ------------------------------------------------------------------------------------------ metrics
def test_dice_and_hd95_by_hand():
    a = np.zeros((10, 10, 10), bool)
    a[2:5, 2:5, 2:5] = True
    b = np.zeros_like(a)
    b[2:5, 2:5, 3:6] = True  # shifted one voxel along i
    assert M.dice(a, b) == pytest.approx(2 * 18 / 54)
    # every surface distance is at most one voxel step along i: its spacing in mm
    assert M.hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert M.hd95(a, b, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
    c = np.zeros_like(a)
    c[2:5, 2:5, 2:5] = True
    assert M.dice(a, c) == 1.0 and M.hd95(a, c, (1.0, 1.0, 1.0)) == 0.0


def test_absent_missed_and_false_positive_organs():
    ref = np.zeros((6, 8, 8), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4, 1:4] = 1  # liver in both
    pred[1:4, 1:4, 1:4] = 1
    ref[4:6, 5:8, 5:8] = 2  # spleen only in the reference: missed
    pred[0, 6:8, 0:2] = 3  # kidney only in the prediction: false positive
    organs = {"liver": 1, "spleen": 2, "kidney": 3, "pancreas": 4}
    m = M.organ_metrics(pred, ref, organs, (1.0, 1.0, 2.0))
    assert m["liver"]["status"] == "ok" and m["liver"]["dice"] == 1.0 and m["liver"]["hd95_mm"] == 0.0
    assert m["spleen"]["status"] == "missed" and m["spleen"]["dice"] == 0.0 and math.isinf(m["spleen"]["hd95_mm"])
    assert m["kidney"]["status"] == "false positive" and m["kidney"]["dice"] == 0.0
    assert m["pancreas"]["status"] == "absent" and m["pancreas"]["dice"] is None and m["pancreas"]["hd95_mm"] is None
    assert m["liver"]["volume_ref_ml"] == pytest.approx(27 * 2.0 / 1000)
    s = M.summary(m)
    assert s["mean_dice"] == 0.5 and s["organs_scored"] == ["liver", "spleen"]
    assert s["false_positives"] == ["kidney"] and s["absent"] == ["pancreas"]


def test_metrics_csv(tmp_path):
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    m = M.organ_metrics(ref.copy(), ref, {"liver": 1, "spleen": 2}, (1, 1, 1))
    M.write_csv(m, tmp_path / "m.csv")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].startswith("organ,label,status,dice,hd95_mm")
    assert lines[1].startswith("liver,1,ok,1.0000,0.00") and lines[2].startswith("spleen,2,absent,,")


def test_window_is_configurable():
    img, ball = _phantom(np.eye(3), (0.8, 0.6, 2.5))
    model = SliceModel(_ThresholdNet(), {"img_size": 32, "pixel_mm": 1.5, "classes": ["liver"], "context": 1,
                                         "in_channels": 3})
    lset = read_label_set(_one_organ_set(read_label_set()))
    assert (segment(img, model, lset, "cpu").labelmap.array == 5).sum() > 0
    # with a window whose top is far above the ball's 250 HU, it no longer passes the net's 0.6 threshold
    res = segment(img, model, lset, "cpu", window=(-1000, 2000))
    assert (res.labelmap.array == 5).sum() == 0 and res.absent == ["liver"]
    assert res.report["window_hu"] == [-1000, 2000]


def test_augmented_copies_move_image_and_labels_together():
    from deepsegrecon.slices.training import augment_slices

    y = torch.zeros(2, 4, 64, 64, dtype=torch.int16)
    y[0, :, 20:44, 16:40] = 3
    y[1] = 1  # the ROI channel
    x = (y[:1] == 3).float().expand(3, -1, -1, -1).clone()  # the image shows the organ
    ax, ay = augment_slices(x, y, 2, seed=1)
    assert ax.shape == (3, 12, 64, 64) and ay.shape == (2, 12, 64, 64) and ay.dtype == torch.int16
    assert torch.equal(ax[:, :4], x) and torch.equal(ay[:, :4], y)  # the originals come first
    copies = ay[0, 4:] == 3
    assert not torch.equal(copies, ay[0, :8] == 3)  # moved
    agree = ((ax[1, 4:] > 0.5) == copies).float().mean()
    assert agree > 0.98
    assert ((ay[1, 4:] == 0) <= (ax[1, 4:] == 0)).all()  # outside the shifted slice: no ROI, no image
