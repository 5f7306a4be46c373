"""Training cases: folders users have (modality patterns, .seg.nrrd / NIfTI / NRRD labels, label maps),
case.json cases written atomically, and a clear refusal, naming the case, for each kind of bad case."""

import json
import os

import numpy as np
import pytest

from conftest import oblique_direction
from deepsegrecon import segio
from deepsegrecon.errors import InputError
from deepsegrecon.image import Image
from deepsegrecon.io import write_image
from deepsegrecon.results import SegmentationResult, SegmentInfo
from deepsegrecon.training.cases import check_cases, find_cases, load_case, read_label_map, write_case

SHAPE = (10, 12, 14)


def _grid(array, **kw):
    return Image(array, spacing=(0.5, 0.6, 1.2), origin=(3.0, -4.0, 10.0), direction=oblique_direction(), **kw)


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return _grid(rng.normal(100, 10, SHAPE).astype(np.float32))


def _label(values=(11, 21)):
    lab = np.zeros(SHAPE, np.uint8)
    for n, v in enumerate(values):
        lab[2:5, 2 + 4 * n:5 + 4 * n, 3:8] = v
    return _grid(lab)


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def _seg_nrrd(path, label_img, names):
    segs = [SegmentInfo(n, v, (1.0, 0.0, 0.0)) for n, v in names.items()]
    segio.write_seg_nrrd(SegmentationResult(label_img, segs), path)


# ---------------------------------------------------------------------------------------------- case.json


def test_write_case_round_trip_with_roi(tmp_path):
    t1, t2 = _image(1), _image(2)
    roi = _grid((np.arange(np.prod(SHAPE)).reshape(SHAPE) % 2).astype(np.uint8))
    case = write_case(tmp_path / "case_001", {"t1": t1, "t2": t2}, _label(), {"tooth_11": 11, "tooth_21": 21},
                      roi=roi, meta={"source": "corrected in Slicer", "user": "dr x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_001"]  # no staging left behind
    manifest = json.loads((tmp_path / "case_001" / "case.json").read_text())
    assert manifest["inputs"] == {"t1": "t1.nrrd", "t2": "t2.nrrd"}
    assert manifest["label"] == "label.seg.nrrd" and manifest["roi"] == "roi.nrrd"
    assert manifest["source"] == "corrected in Slicer" and manifest["meta"] == {"user": "dr x"}
    assert manifest["label_names"] == {"tooth_11": 11, "tooth_21": 21} and manifest["created"]

    data = load_case(tmp_path / "case_001").load()
    assert list(data.images) == ["t1", "t2"]
    np.testing.assert_array_equal(data.images["t2"].array, t2.array)
    assert data.images["t1"].same_grid(t1) and data.label.same_grid(t1)
    np.testing.assert_array_equal(data.label.array, _label().array)
    assert data.label_names == {"tooth_11": 11, "tooth_21": 21}
    np.testing.assert_array_equal(data.roi.array, roi.array)
    assert case.name == "case_001"

    # a label map with other values re-values the case by segment name
    remapped = load_case(tmp_path / "case_001", label_map={"tooth_11": 1, "tooth_21": 2, "tooth_31": 3}).load()
    assert sorted(np.unique(remapped.label.array)) == [0, 1, 2]
    assert remapped.label_names == {"tooth_11": 1, "tooth_21": 2}


@pytest.mark.parametrize("bad, message", [
    (dict(label=None), "the label is empty"),
    (dict(label="off grid"), "does not match the image grid"),
    (dict(label_names={"tooth_11": 11}), "label values [21] have no name"),
    (dict(roi="empty"), "the ROI mask is empty"),
    (dict(images={}), "at least one input image"),
    (dict(images={"label": "x"}), "cannot be a modality name"),
])
def test_write_case_refuses_bad_input_and_writes_nothing(tmp_path, bad, message):
    args = dict(images={"image": _image()}, label=_label(), label_names={"tooth_11": 11, "tooth_21": 21}, roi=None)
    if "label" in bad:
        args["label"] = _grid(np.zeros(SHAPE, np.uint8)) if bad["label"] is None else \
            Image(_label().array, spacing=(0.5, 0.6, 1.3), origin=(3.0, -4.0, 10.0), direction=oblique_direction())
    if bad.get("roi") == "empty":
        args["roi"] = _grid(np.zeros(SHAPE, np.uint8))
    for k in ("label_names", "images"):
        if k in bad:
            args[k] = bad[k]
    (tmp_path / "keep.txt").write_text("x")
    before = _tree(tmp_path)
    with pytest.raises(InputError, match="case 'new_case'") as e:
        write_case(tmp_path / "new_case", **args)
    assert message in str(e.value)
    assert _tree(tmp_path) == before


def test_write_case_existing_folder_refused_then_replaced_with_overwrite(tmp_path):
    write_case(tmp_path / "c", {"image": _image()}, _label(), {"a": 11, "b": 21})
    before = _tree(tmp_path)
    with pytest.raises(InputError, match="already exists"):
        write_case(tmp_path / "c", {"image": _image(5)}, _label((11,)), {"a": 11})
    assert _tree(tmp_path) == before
    write_case(tmp_path / "c", {"image": _image(5)}, _label((11,)), {"a": 11}, overwrite=True)
    assert sorted(np.unique(load_case(tmp_path / "c").load().label.array)) == [0, 11]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_write_case_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import deepsegrecon.segio as segio_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(segio_mod, "write_seg_nrrd", boom)
    with pytest.raises(OSError):
        write_case(tmp_path / "c", {"image": _image()}, _label(), {"a": 11, "b": 21})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- user folders


def test_seg_nrrd_label_by_name_and_cropped_extent(tmp_path):
    case = tmp_path / "c1"
    case.mkdir()
    write_image(_image(), case / "scan.nii.gz")
    # Slicer numbers segments 1, 2 ... and may save the segmentation cropped to its content
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 2:5, 3:8] = 1
    lab[2:5, 6:9, 3:8] = 2
    full = _grid(lab)
    crop = full.array[1:6, 1:10, 2:9]
    origin = full.physical_points(np.array([[2, 1, 1]]))[0]  # (i, j, k) of the crop start
    cropped = Image(crop, full.spacing, origin, full.direction)
    _seg_nrrd(case / "Segmentation.seg.nrrd", cropped, {"tooth_11": 1, "tooth_21": 2})

    c = load_case(case, label_map={"tooth_11": 11, "tooth_21": 21, "tooth_31": 31})
    assert c.label_file.name == "Segmentation.seg.nrrd" and c.inputs["image"].name == "scan.nii.gz"
    data = c.load()
    np.testing.assert_array_equal(data.label.array, _label().array)
    assert data.label_names == {"tooth_11": 11, "tooth_21": 21}

    plain = load_case(case).load()  # no map: the file's values and names
    assert plain.label_names == {"tooth_11": 1, "tooth_21": 2}
    with pytest.raises(InputError, match=r"case 'c1': segments \['tooth_21'\] of Segmentation.seg.nrrd are not in "
                                         r"the label map"):
        load_case(case, label_map={"tooth_11": 11}).load()


def test_nifti_label_with_label_map_dict_and_unknown_values(tmp_path):
    case = tmp_path / "p7"
    case.mkdir()
    write_image(_image(), case / "p7_ct.nii.gz")
    write_image(_label(), case / "p7_label.nii.gz")
    data = load_case(case, label_map={11: "tooth_11", 21: "tooth_21"}).load()
    assert data.label_names == {"tooth_11": 11, "tooth_21": 21}
    np.testing.assert_array_equal(data.label.array, _label().array)
    before = _tree(tmp_path)
    with pytest.raises(InputError, match=r"case 'p7': label values \[21\] in p7_label.nii.gz are not in the label map"):
        load_case(case, label_map={"tooth_11": 11}).load()
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["json", "csv", "ctbl"])
def test_nrrd_label_with_label_map_file(tmp_path, kind):
    case = tmp_path / "cases" / "a"
    case.mkdir(parents=True)
    write_image(_image(), case / "image.nrrd")
    write_image(_label(), case / "labels.nrrd")
    path = tmp_path / f"map.{kind}"
    if kind == "json":
        path.write_text(json.dumps({"11": "upper right central incisor", "21": "upper left central incisor"}))
    elif kind == "csv":
        path.write_text("value,name\n11,upper right central incisor\n21,upper left central incisor\n")
    else:
        path.write_text("# Slicer colour table\n0 background 0 0 0 0\n11 upper right central incisor 255 0 0 255\n"
                        "21 upper_left_central_incisor 0 255 0 255\n")
    names = read_label_map(path)
    assert names[list(names)[0]] == 11 and len(names) == 2
    cases = find_cases(tmp_path / "cases", label_map=path)
    data = cases[0].load()
    assert sorted(data.label_names.values()) == [11, 21]


def test_modality_patterns_channel_order_and_missing_modality(tmp_path):
    root = tmp_path / "brats"
    for n, name in enumerate(["BraTS-001", "BraTS-002"]):
        case = root / name
        case.mkdir(parents=True)
        for m, mod in enumerate(["t1n", "t1c", "t2w", "t2f"]):
            write_image(_grid(np.full(SHAPE, 10 * m + n, np.float32)), case / f"{name}-{mod}.nii.gz")
        write_image(_label((1, 2)), case / f"{name}-seg.nii.gz")
    (root / ".staging-xyz").mkdir()
    (root / "_scratch").mkdir()
    (root / "notes").mkdir()  # no image files: not a case
    mods = {"flair": "*t2f*", "t1c": "*T1C*", "t1": "*t1n*", "t2": "*t2w*"}
    cases = find_cases(root, modalities=mods)
    assert [c.name for c in cases] == ["BraTS-001", "BraTS-002"]
    data = cases[1].load()
    assert list(data.images) == ["flair", "t1c", "t1", "t2"]
    assert [float(img.array.flat[0]) for img in data.images.values()] == [31.0, 11.0, 1.0, 21.0]
    assert cases[0].label_file.name == "BraTS-001-seg.nii.gz"

    (root / "BraTS-002" / "BraTS-002-t2f.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case 'BraTS-002' has no file for modality 'flair' \(pattern '\*t2f\*'"):
        find_cases(root, modalities=mods)
    with pytest.raises(InputError, match=r"modality 'image' matches several files"):
        find_cases(root)


def test_root_folder_that_is_itself_a_case_and_empty_root(tmp_path):
    write_image(_image(), tmp_path / "ct.nrrd")
    write_image(_label(), tmp_path / "ct_label.nrrd")
    cases = find_cases(tmp_path)
    assert len(cases) == 1 and cases[0].folder == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no cases in"):
        find_cases(empty)


# ---------------------------------------------------------------------------------------------- bad cases


def _plain_case(root, name="bad"):
    case = root / name
    case.mkdir(parents=True)
    write_image(_image(), case / "image.nii.gz")
    write_image(_label(), case / "label.nii.gz")
    return case


def test_bad_cases_named_and_nothing_written(tmp_path):
    # empty label
    c = _plain_case(tmp_path, "empty")
    write_image(_grid(np.zeros(SHAPE, np.uint8)), c / "label.nii.gz")
    # label on another grid
    g = _plain_case(tmp_path, "grid")
    write_image(Image(_label().array, spacing=(0.5, 0.6, 1.2), origin=(3.0, -4.0, 11.0),
                      direction=oblique_direction()), g / "label.nii.gz")
    # truncated image file
    t = _plain_case(tmp_path, "truncated")
    data = (t / "image.nii.gz").read_bytes()
    (t / "image.nii.gz").write_bytes(data[: len(data) // 2])
    # not an image at all
    u = _plain_case(tmp_path, "unreadable")
    (u / "label.nii.gz").write_bytes(b"this is not an image")
    # damaged case.json
    j = _plain_case(tmp_path, "manifest")
    (j / "case.json").write_text("{ not json")
    # no label file
    n = _plain_case(tmp_path, "nolabel")
    (n / "label.nii.gz").unlink()

    before = _tree(tmp_path)
    expect = {
        "empty": "case 'empty': the label label.nii.gz is empty",
        "grid": "case 'grid': the label label.nii.gz does not match the image grid: origin",
        "truncated": "case 'truncated': modality 'image': cannot read",
        "unreadable": "case 'unreadable': label",
    }
    for name, message in expect.items():
        with pytest.raises(InputError) as e:
            load_case(tmp_path / name).load()
        assert message in str(e.value), str(e.value)
    with pytest.raises(InputError, match="case 'manifest': case.json is damaged"):
        load_case(j)
    with pytest.raises(InputError, match="case 'nolabel' has no label file"):
        load_case(n)
    with pytest.raises(InputError, match="case 'empty'"):
        check_cases([load_case(tmp_path / "grid"), load_case(tmp_path / "empty")][1:])
    assert _tree(tmp_path) == before


def test_label_map_file_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"a": 1, "b": 1}))
    with pytest.raises(InputError, match=r"label values \[1\] are given to more than one name"):
        read_label_map(p)
    p.write_text("{oops")
    with pytest.raises(InputError, match="is not valid JSON"):
        read_label_map(p)
    with pytest.raises(InputError, match="does not exist"):
        read_label_map(tmp_path / "missing.csv")
    assert not os.path.exists(tmp_path / "missing.csv")
