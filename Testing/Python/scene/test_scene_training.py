"""TrainingLogic on a real MRML scene: corrected segmentations become training cases, a fine-tuning job (a real
worker process) fills a table and a plot chart epoch by epoch, cancel writes no model version, and the chosen
version (rollback included) is the one the next segmentation run uses.

The fine-tuning job runs a test-only plugin task that behaves like the engine's ``finetune`` task: it reads the
training set with the engine's case loader, reports ``epoch`` / ``loss`` / ``val_dice`` progress fields, checks for
cancel each epoch, and writes the new version into the model store only when it succeeds.
"""

import json
import textwrap
import time

import numpy as np
import pytest
import slicer

from deepsegrecon import scene as sc
from deepsegrecon.errors import InputError, ModelError
from deepsegrecon.image import Image
from deepsegrecon.results import SegmentationResult, SegmentInfo
from deepsegrecon.scene.curves import epoch_row
from deepsegrecon.scene.logic import SegmentTeethLogic
from deepsegrecon.scene.selection import active_model_version
from deepsegrecon.scene.training import TrainingLogic
from deepsegrecon.store import ModelStore
from deepsegrecon.training.cases import load_case
from scene_testdata import oblique_grid, teeth_result

TASK = "teeth"
LABELS = {"1": "maxilla", "2": "mandible", "11": "tooth_11", "36": "tooth_36"}

PLUGIN = textwrap.dedent('''
    """Test-only tasks: a fine-tuning task shaped like the engine's "finetune", and a segmentation task that
    reports which model version it was given."""
    import time

    import numpy as np

    from deepsegrecon.errors import InputError
    from deepsegrecon.store import ModelStore
    from deepsegrecon.task import InputSpec, Task, register
    from deepsegrecon.results import ModelResult, SegmentationResult, SegmentInfo
    from deepsegrecon.training.cases import find_cases


    def _report(ctx, stage, fraction, message, extra):
        try:
            ctx.step(stage, fraction, message, extra=extra)
        except TypeError:  # an engine whose ctx.step takes no extra fields: write the line whole
            ctx.cancel.raise_if_cancelled()
            event = ctx.progress(stage, fraction, message)
            ctx.progress.sink({**event, **extra})


    @register
    class FakeFinetune(Task):
        name = "test_fake_finetune"
        inputs = ()
        uses_device = False
        result_kind = "model"

        def run(self, images, params, ctx):
            cases = find_cases(params["cases"], label_map=params.get("label_map"))
            for c in cases:
                c.load()  # the cases written by the scene logic load with the engine's reader
            store = ModelStore()
            base = store.get(params["task"], params.get("base")) if params.get("base") else None
            epochs = int(params.get("epochs") or 3)
            history = []
            parts = params.get("parts") or [None]
            for n, part in enumerate(parts):  # networks trained in turn, their epochs each counted from 1
                for e in range(1, epochs + 1):
                    if params.get("fail_at") == e:
                        raise InputError("training diverged (on purpose)")
                    time.sleep(float(params.get("dt", 0.0)))
                    row = {"event": "epoch", "epoch": e, "loss": round(1.0 / e + n, 6),
                           "val_dice": round(0.5 + 0.1 * e, 6) if e % 2 == 0 else None}
                    if part:
                        row["part"] = part
                    history.append(row)
                    f = (n + e / epochs) / len(parts)
                    _report(ctx, "train", f, f"epoch {e}/{epochs}: loss {row['loss']:.3f}", {**row, "epochs": epochs})
                    # an iteration line of the next epoch, which is not a row
                    _report(ctx, "train", f, "batch", {"event": "iteration", "epoch": e + 1, "iteration": 1})
            weights = ctx.model_dir  # unused
            files = dict((n, base.dir / n) for n in base.files) if base else {}
            manifest = {"base_version": params.get("base"), "description": "fine-tuned in a test",
                        "metrics": {"best_val_dice": max(r["val_dice"] or 0 for r in history)},
                        "labels": dict(base.manifest.get("labels") or {}) if base else {},
                        "trained_on": [c.name for c in cases]}
            entry = store.write_version(params["task"], params["name"], files, manifest)
            return ModelResult(params["task"], params["name"], entry.manifest, history,
                               {"cases": [c.name for c in cases]})


    @register
    class SegmentWithModel(Task):
        name = "test_segment_with_model"
        inputs = (InputSpec("image"),)
        uses_device = False
        uses_model = True
        model_task = "teeth"

        def run(self, images, params, ctx):
            ctx.step("segmenting", 0.5)
            img = images["image"]
            lab = np.where(img.array > 80, 11, 0).astype(np.uint8)
            return SegmentationResult(img.with_array(lab), [SegmentInfo("tooth_11", 11, (1.0, 0.9, 0.8))],
                                      report={"model": params.get("model"), "model_dir": str(ctx.model_dir)})
''')


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated model store (built-in v1, the default) and DeepSegRecon home; a real scene with a volume."""
    home, builtin = tmp_path / "home", tmp_path / "builtin"
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(home))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(builtin))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"not really weights")
    ModelStore(root=builtin).write_version(TASK, "v1", {"weights.bin": weights},
                                           {"default": True, "labels": LABELS, "description": "Shipped. Phantoms."})
    plugin = tmp_path / "dsr_training_test_tasks.py"
    plugin.write_text(PLUGIN)
    mrml = slicer.vtkMRMLScene()
    grid = oblique_grid()
    volume = sc.image_to_volume_node(mrml, grid, "CBCT 1")
    seg = sc.result_to_segmentation_node(mrml, teeth_result(), reference_volume_node=volume, name="Corrected")
    logic = TrainingLogic(mrml, TASK, python=None, job_root=tmp_path / "jobs", plugins=[str(plugin)])
    logic.finetune_task = "test_fake_finetune"
    yield {"mrml": mrml, "grid": grid, "volume": volume, "seg": seg, "logic": logic, "home": home,
           "plugin": plugin, "tmp": tmp_path, "jobs": tmp_path / "jobs"}
    logic.cancel()
    mrml.Clear(1)


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _segmentation(mrml, image, segments, name="S", reference=None):
    return sc.result_to_segmentation_node(mrml, SegmentationResult(image, segments), reference_volume_node=reference,
                                          name=name)


def _expected_labels():
    return teeth_result().labelmap.array


# ------------------------------------------------------------------------------------------- training set
def test_add_case_writes_a_case_the_engine_loads(env):
    logic, mrml = env["logic"], env["mrml"]
    n_nodes = mrml.GetNumberOfNodes()
    assert logic.training_folder == env["home"] / "training" / TASK and logic.case_count() == 0
    folder = logic.add_to_training_set({"image": env["volume"]}, env["seg"])
    assert folder.parent == logic.training_folder and folder.name.startswith("CBCT_1-")
    assert sorted(p.name for p in folder.iterdir()) == ["case.json", "image.nrrd", "label.seg.nrrd"]
    assert [p.name for p in logic.training_folder.iterdir()] == [folder.name]  # no staging folder left
    manifest = json.loads((folder / "case.json").read_text())
    assert manifest["inputs"] == {"image": "image.nrrd"} and manifest["roi"] is None
    assert manifest["label_names"] == {"tooth_11": 11, "mandible": 2, "tooth_36": 36}
    assert manifest["source"] == {"volumes": {"image": "CBCT 1"}, "segmentation": "Corrected"}
    assert manifest["meta"]["task"] == TASK and manifest["meta"]["model_version"] == "v1"
    assert manifest["meta"]["label_resampled"] is False
    data = load_case(folder).load()
    assert data.images["image"].same_grid(env["grid"], tol=1e-5)
    np.testing.assert_array_equal(data.images["image"].array, env["grid"].array)
    np.testing.assert_array_equal(data.label.array, _expected_labels())
    assert data.roi is None
    assert logic.case_count() == 1 and logic.case_names() == [folder.name]
    assert mrml.GetNumberOfNodes() == n_nodes  # adding a case adds no node

    # a named case; the same name again is refused, nothing changes
    named = logic.add_to_training_set({"image": env["volume"]}, env["seg"], case_name="patient_7")
    assert named.name == "patient_7" and logic.case_count() == 2
    before = _tree(logic.training_folder)
    with pytest.raises(InputError, match="already has a case 'patient_7'"):
        logic.add_to_training_set({"image": env["volume"]}, env["seg"], case_name="patient_7")
    assert _tree(logic.training_folder) == before


def test_segments_are_revalued_by_name_to_the_models_labels(env):
    """Segments added in the Segment Editor get label values 1, 2, 3...; the case uses the model's values."""
    logic, mrml, grid = env["logic"], env["mrml"], env["grid"]
    lab = np.zeros(grid.array.shape, np.uint8)
    lab[2:5, 3:6, 4:9] = 1
    lab[6:9, 8:12, 2:6] = 2
    seg = _segmentation(mrml, grid.with_array(lab), [SegmentInfo("tooth_36", 1, (1, 0, 0)),
                                                     SegmentInfo("maxilla", 2, (0, 1, 0))], reference=env["volume"])
    folder = logic.add_to_training_set({"image": env["volume"]}, seg)
    data = load_case(folder).load()
    expected = np.where(lab == 1, 36, np.where(lab == 2, 1, 0))
    np.testing.assert_array_equal(data.label.array, expected)
    assert data.label_names == {"tooth_36": 36, "maxilla": 1}


def test_roi_markups_box_labelmap_and_segment(env):
    logic, mrml, grid, volume = env["logic"], env["mrml"], env["grid"], env["volume"]
    ijk_to_ras = grid.ijk_to_ras()

    # a markups ROI box, rotated by a parent transform: the mask is exactly the voxel centres inside it
    roi = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode", "reviewed box")
    centre = (ijk_to_ras @ np.array([7.0, 6.0, 5.0, 1.0]))[:3]
    roi.SetCenter(*centre)
    roi.SetRadiusXYZ(6.0, 5.0, 3.0)
    tilt = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    m[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    m[:3, 3] = centre - m[:3, :3] @ centre  # rotate about the box centre
    tilt.SetMatrixTransformToParent(sc._mrml.vtk_matrix(m))
    roi.SetAndObserveTransformNodeID(tilt.GetID())
    n_nodes = mrml.GetNumberOfNodes()
    folder = logic.add_to_training_set({"image": volume}, env["seg"], roi=roi)
    assert mrml.GetNumberOfNodes() == n_nodes
    data = load_case(folder).load()
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.array.shape], indexing="ij")
    ras = (np.c_[i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)] @ ijk_to_ras.T)[:, :3]
    inside = np.array([roi.IsPointInROIWorld(list(p)) for p in ras]).reshape(grid.array.shape)
    assert 20 < inside.sum() < inside.size // 2
    np.testing.assert_array_equal(data.roi.array, inside.astype(np.uint8))
    np.testing.assert_array_equal(data.label.array, _expected_labels())  # the label is kept; the ROI masks the loss
    assert json.loads((folder / "case.json").read_text())["meta"]["roi"] == "markups ROI"

    # a labelmap volume node on the same grid
    mask = np.zeros(grid.array.shape, np.uint8)
    mask[1:7, 2:10, 3:13] = 5
    lm = sc.image_to_volume_node(mrml, grid.with_array(mask), "reviewed", labelmap=True)
    data = load_case(logic.add_to_training_set({"image": volume}, env["seg"], roi=lm)).load()
    np.testing.assert_array_equal(data.roi.array, (mask > 0).astype(np.uint8))

    # a segment of the corrected segmentation, in its own layer overlapping tooth_11: it is the region, not a label
    seg = sc.result_to_segmentation_node(mrml, teeth_result(), reference_volume_node=volume, name="with region")
    region = np.zeros(grid.array.shape, np.uint8)
    region[0:6, 0:7, 0:10] = 1
    layer = sc.result_to_segmentation_node(mrml, SegmentationResult(grid.with_array(region), [
        SegmentInfo("reviewed", 1, (1, 1, 0))]), reference_volume_node=volume)
    seg.GetSegmentation().CopySegmentFromSegmentation(layer.GetSegmentation(), "reviewed")
    assert seg.GetSegmentation().GetNumberOfLayers() == 2
    folder = logic.add_to_training_set({"image": volume}, seg, roi="reviewed")
    data = load_case(folder).load()
    np.testing.assert_array_equal(data.roi.array, region)
    np.testing.assert_array_equal(data.label.array, _expected_labels())  # tooth_11 under the region is intact
    assert data.label_names == {"tooth_11": 11, "mandible": 2, "tooth_36": 36}


def test_segmentation_on_another_grid_is_resampled_like_slicer_export(env):
    logic, mrml, grid, volume = env["logic"], env["mrml"], env["grid"], env["volume"]
    coarse = _expected_labels()
    # oversampled 3x (as "Specify geometry" in the Segment Editor): fine voxel 3i+1 is centred on coarse voxel i
    fine_arr = coarse.repeat(3, 0).repeat(3, 1).repeat(3, 2)
    sp = np.array(grid.spacing) / 3
    origin = np.asarray(grid.origin) - grid.direction @ sp
    fine = Image(fine_arr, spacing=tuple(sp), origin=tuple(origin), direction=grid.direction)
    seg = _segmentation(mrml, fine, teeth_result().segments, name="oversampled")
    folder = logic.add_to_training_set({"image": volume}, seg)
    data = load_case(folder).load()
    np.testing.assert_array_equal(data.label.array, coarse)
    meta = json.loads((folder / "case.json").read_text())["meta"]
    assert meta["label_resampled"] is True and meta["segmentation_grid"]["shape"] == list(fine_arr.shape)

    # cropped to its content (Slicer saves segmentations so): the same voxels, copied exactly
    box = (slice(2, 11), slice(2, 13), slice(2, 15))
    origin = grid.ijk_to_lps() @ np.array([2, 2, 2, 1.0])
    cropped = Image(coarse[box], spacing=grid.spacing, origin=tuple(origin[:3]), direction=grid.direction)
    folder = logic.add_to_training_set({"image": volume}, _segmentation(mrml, cropped, teeth_result().segments))
    np.testing.assert_array_equal(load_case(folder).load().label.array, coarse)
    assert json.loads((folder / "case.json").read_text())["meta"]["label_resampled"] is False


def _shifted(grid, lab, mm):
    return Image(lab, spacing=grid.spacing, origin=tuple(np.asarray(grid.origin) + np.asarray(mm)),
                 direction=grid.direction)


def test_bad_inputs_write_nothing_and_add_no_nodes(env):
    logic, mrml, grid, volume, seg = env["logic"], env["mrml"], env["grid"], env["volume"], env["seg"]
    logic.add_to_training_set({"image": volume}, seg, case_name="first")  # the training set exists already
    lab = _expected_labels()
    empty = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    blank = _segmentation(mrml, grid.with_array(np.zeros_like(lab)), [SegmentInfo("tooth_11", 11, (1, 0, 0))],
                          name="blank")
    far = _segmentation(mrml, _shifted(grid, lab, (300.0, 0, 0)), teeth_result().segments, name="far")
    half = _segmentation(mrml, _shifted(grid, lab, grid.direction @ (np.array(grid.spacing) * (6, 0, 0))),
                         teeth_result().segments, name="half")
    nerve = _segmentation(mrml, grid.with_array((lab > 0).astype(np.uint8)), [SegmentInfo("nerve", 1, (1, 1, 0))],
                          name="nerve")
    far_box = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far box")
    far_box.SetCenter(500.0, 500.0, 500.0)
    far_box.SetRadiusXYZ(5.0, 5.0, 5.0)
    unplaced = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode", "unplaced")
    other_scene = slicer.vtkMRMLScene()
    foreign = sc.image_to_volume_node(other_scene, grid, "elsewhere")
    label_volume = sc.image_to_volume_node(mrml, grid.with_array(lab), "a labelmap", labelmap=True)
    cases = [
        (dict(inputs={"image": volume}, segmentation_node=empty), "has no segments"),
        (dict(inputs={"image": volume}, segmentation_node=blank), "is empty: none of its segments"),
        (dict(inputs={"image": volume}, segmentation_node=far), "does not overlap the volume 'CBCT 1'"),
        (dict(inputs={"image": volume}, segmentation_node=half), "lie outside the volume 'CBCT 1'"),
        (dict(inputs={"image": None}, segmentation_node=seg), "lacks the input volume for modality 'image'"),
        (dict(inputs={"ct": volume}, segmentation_node=seg), "lacks the input volume for modality 'image'"),
        (dict(inputs={}, segmentation_node=seg), "choose the input volume"),
        (dict(inputs={"image": foreign}, segmentation_node=seg), "is not in this scene"),
        (dict(inputs={"image": label_volume}, segmentation_node=seg), "not a labelmap"),
        (dict(inputs={"image": volume}, segmentation_node=None), "choose the corrected segmentation"),
        (dict(inputs={"image": volume}, segmentation_node=nerve), r"segments \['nerve'\] .* not labels of the teeth"),
        (dict(inputs={"image": volume}, segmentation_node=seg, roi=far_box), "marks no voxel"),
        (dict(inputs={"image": volume}, segmentation_node=seg, roi=unplaced), "is not placed yet"),
        (dict(inputs={"image": volume}, segmentation_node=seg, roi="no_such_segment"), "has no segment 'no_such"),
        (dict(inputs={"image": volume}, segmentation_node=seg, roi=seg), "cannot be the corrected segmentation"),
        (dict(inputs={"image": volume}, segmentation_node=seg, roi=3.5), "must be a segment ID"),
        (dict(inputs={"image": volume}, segmentation_node=seg, case_name="../up"), "cannot be a case name"),
    ]
    before = _tree(logic.training_folder)
    n_nodes = mrml.GetNumberOfNodes()
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            logic.add_to_training_set(**kwargs)
        assert _tree(logic.training_folder) == before, message
        assert mrml.GetNumberOfNodes() == n_nodes, message
    # modalities given by the task: a case without one of them is refused
    two = TrainingLogic(mrml, TASK, training_root=env["tmp"] / "two", modalities=["t1", "t2"])
    with pytest.raises(InputError, match="lacks the input volume for modality 't2'"):
        two.add_to_training_set({"t1": volume}, seg)
    assert not (env["tmp"] / "two").exists()
    other_scene.Clear(1)


# ------------------------------------------------------------------------------------------- fine-tuning
def test_finetune_fills_the_curves_epoch_by_epoch_and_adds_a_version(env):
    logic, mrml = env["logic"], env["mrml"]
    logic.add_to_training_set({"image": env["volume"]}, env["seg"])
    logic.add_to_training_set({"image": env["volume"]}, env["seg"])
    assert [v for v, _ in logic.model_versions()] == ["v1"]
    new = logic.start_finetune("v1", "v1-ft1", epochs=4, device="cpu", options={"dt": 0.3})
    assert new == "v1-ft1"
    table, chart = logic.table_node, logic.chart_node
    assert table.GetScene() is mrml and chart.GetScene() is mrml
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == \
        ["epoch", "loss", "val_dice", "part", "part_epoch"]
    seen_rows = []
    end = time.monotonic() + 120
    while True:
        status = logic.poll()
        seen_rows.append(table.GetNumberOfRows())
        assert status["rows"] == table.GetNumberOfRows() or status["state"] != "running"
        if status["state"] != "running" or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert status["state"] == "succeeded", status
    assert status["version"] == "v1-ft1" and status["epoch"] == 4 and status["rows"] == 4
    assert any(0 < n < 4 for n in seen_rows), f"the table did not grow during the run: {sorted(set(seen_rows))}"
    assert seen_rows == sorted(seen_rows)
    # one row per epoch: epoch, loss, val_dice (NaN where there was no validation)
    assert table.GetNumberOfRows() == 4
    data = table.GetTable()
    rows = [(data.GetValue(r, 0).ToInt(), data.GetValue(r, 1).ToDouble(), data.GetValue(r, 2).ToDouble())
            for r in range(4)]
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([r[1] for r in rows], [1.0, 0.5, 1 / 3, 0.25], rtol=1e-5)
    assert np.isnan(rows[0][2]) and np.isnan(rows[2][2])
    np.testing.assert_allclose([rows[1][2], rows[3][2]], [0.7, 0.9])
    # the chart shows the loss and the validation Dice of that table, against the epoch
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.GetNthPlotSeriesNode(n) for n in range(2)]
    assert [s.GetYColumnName() for s in series] == ["loss", "val_dice"]
    assert all(s.GetXColumnName() == "epoch" and s.GetTableNode() is table for s in series)
    assert "(" not in table.GetName() and table.GetAttribute("DeepSegRecon.state") == "succeeded"
    # the new version is in the store and listed; the old one is kept and still the default (and active)
    versions = dict(logic.model_versions())
    assert list(versions) == ["v1", "v1-ft1"]
    assert "fine-tuned from v1" in versions["v1-ft1"] and "validation Dice 0.900" in versions["v1-ft1"]
    assert "built-in" in versions["v1"]
    assert logic.active_version() == "v1"
    assert logic.result.version == "v1-ft1" and logic.result.report["cases"] == logic.case_names()
    assert list(env["jobs"].iterdir()) == []


def test_networks_trained_in_turn_follow_each_other_in_the_table(env):
    """Teeth trains stage1 then stage2, each counting epochs from 1: the table runs on, with the part named."""
    logic = env["logic"]
    logic.add_to_training_set({"image": env["volume"]}, env["seg"])
    logic.start_finetune("v1", "two-parts", epochs=3, device="cpu", options={"parts": ["stage1", "stage2"]})
    status = logic.wait(timeout=120, poll_interval=0.05)
    assert status["state"] == "succeeded", status
    assert status["part"] == "stage2" and status["epoch"] == 3 and status["rows"] == 6
    data = logic.table_node.GetTable()
    rows = [(data.GetValue(r, 0).ToInt(), data.GetValue(r, 3).ToString(), data.GetValue(r, 4).ToInt(),
             round(data.GetValue(r, 1).ToDouble(), 4)) for r in range(logic.table_node.GetNumberOfRows())]
    assert rows == [(1, "stage1", 1, 1.0), (2, "stage1", 2, 0.5), (3, "stage1", 3, 0.3333),
                    (4, "stage2", 1, 2.0), (5, "stage2", 2, 1.5), (6, "stage2", 3, 1.3333)]


def test_cancel_keeps_the_curves_and_writes_no_version(env):
    logic, mrml = env["logic"], env["mrml"]
    logic.add_to_training_set({"image": env["volume"]}, env["seg"])
    store = ModelStore()
    before = ([(e.version, str(e.dir)) for e in store.list(TASK)], _tree(store.root))
    logic.start_finetune(new_name="never", epochs=200, device="cpu", options={"dt": 0.15})  # base: the active one
    end = time.monotonic() + 60
    while logic.poll()["rows"] < 2:
        assert logic.poll()["state"] == "running" and time.monotonic() < end
        time.sleep(0.05)
    n_nodes = mrml.GetNumberOfNodes()
    t0 = time.monotonic()
    logic.cancel()
    assert time.monotonic() - t0 < 2.5
    status = logic.poll()
    assert status["state"] == "cancelled" and status["rows"] >= 2
    assert ([(e.version, str(e.dir)) for e in store.list(TASK)], _tree(store.root)) == before
    assert "never" not in dict(logic.model_versions())
    # the curves stay, as the user's record, marked cancelled
    assert mrml.GetNumberOfNodes() == n_nodes
    assert logic.table_node.GetName().endswith("(cancelled)") and logic.chart_node.GetName().endswith("(cancelled)")
    assert logic.table_node.GetNumberOfRows() >= 2
    assert list(env["jobs"].iterdir()) == []
    logic.cancel()  # nothing running: nothing happens
    assert logic.poll()["state"] == "cancelled"


def test_failed_job_writes_no_version(env):
    logic = env["logic"]
    logic.add_to_training_set({"image": env["volume"]}, env["seg"])
    logic.start_finetune("v1", "diverged", epochs=5, device="cpu", options={"fail_at": 3})
    status = logic.wait(timeout=120, poll_interval=0.05)
    assert status["state"] == "failed" and "training diverged (on purpose)" in status["error"]
    assert status["error_type"] == "InputError" and status["rows"] == 2
    assert [v for v, _ in logic.model_versions()] == ["v1"]
    assert logic.table_node.GetName().endswith("(failed)")


def test_start_refuses_before_anything_starts(env):
    logic, mrml = env["logic"], env["mrml"]
    n_nodes = mrml.GetNumberOfNodes()
    with pytest.raises(InputError, match="has no cases yet"):
        logic.start_finetune("v1", "x", epochs=1)
    logic.add_to_training_set({"image": env["volume"]}, env["seg"])
    n_nodes = mrml.GetNumberOfNodes()
    for kwargs, error, message in [
        (dict(base_version="v9", epochs=1), ModelError, "has no model version 'v9'"),
        (dict(new_name="v1", epochs=1), ModelError, "already exists"),
        (dict(new_name="bad name!", epochs=1), InputError, "not a valid name"),
        (dict(), InputError, "give a training budget"),
        (dict(minutes=0), InputError, "positive number of minutes"),
        (dict(epochs=2.5), InputError, "whole number"),
        (dict(epochs=1, val_fraction=1.0), InputError, "validation fraction"),
    ]:
        with pytest.raises(error, match=message):
            logic.start_finetune(**kwargs)
        assert mrml.GetNumberOfNodes() == n_nodes and not logic.running
    logic.start_finetune(epochs=50, device="cpu", options={"dt": 0.2})
    with pytest.raises(InputError, match="already running"):
        logic.start_finetune(epochs=1)
    logic.cancel()


def test_rollback_selects_the_version_the_next_segmentation_uses(env):
    logic, mrml, volume = env["logic"], env["mrml"], env["volume"]
    logic.add_to_training_set({"image": volume}, env["seg"])
    logic.start_finetune("v1", "v2", epochs=2, device="cpu")
    assert logic.wait(timeout=120, poll_interval=0.05)["state"] == "succeeded"
    seg_logic = SegmentTeethLogic(mrml, job_root=env["jobs"], plugins=[str(env["plugin"])],
                                  task_name="test_segment_with_model")
    assert seg_logic.model_task == TASK
    assert seg_logic.model_versions() == ["v1", "v2"]  # what the Slicer module's model combo box lists

    def model_of_next_run(params=None):
        seg_logic.run({"image": volume}, params or {}, timeout=60)
        return seg_logic.result.report["model"]

    assert model_of_next_run() == "v1"  # nothing chosen: the store's default
    assert logic.set_active_version("v2") == "v2"
    assert active_model_version(mrml, TASK) == "v2" and logic.active_version() == "v2"
    assert model_of_next_run() == "v2"
    assert model_of_next_run({"model": "v1"}) == "v1"  # a run that names its model keeps it
    assert logic.set_active_version("v1") == "v1"  # rollback
    assert model_of_next_run() == "v1"
    assert [v for v, _ in logic.model_versions()] == ["v1", "v2"]  # nothing removed
    with pytest.raises(InputError, match="has no model version 'v7'"):
        logic.set_active_version("v7")
    assert logic.active_version() == "v1"
    logic.set_active_version(None)
    assert active_model_version(mrml, TASK) is None and logic.active_version() == "v1"
    # fine-tuning from the active version by default
    logic.set_active_version("v2")
    logic.start_finetune(new_name="v3", epochs=1, device="cpu")
    assert logic.wait(timeout=120, poll_interval=0.05)["state"] == "succeeded"
    assert ModelStore().get(TASK, "v3").manifest["base_version"] == "v2"


def test_epoch_rows_from_progress_lines():
    assert epoch_row({"stage": "train", "epoch": 3, "loss": 0.5, "val_dice": None}) == \
        {"part": "", "epoch": 3, "loss": 0.5, "val_dice": None}
    assert epoch_row({"event": "epoch", "part": "stage2", "epoch": 2, "loss": "nan", "val_dice": 0.8}) == \
        {"part": "stage2", "epoch": 2, "loss": None, "val_dice": 0.8}
    assert epoch_row({"event": "iteration", "epoch": 4, "loss": 0.3}) is None
    assert epoch_row({"stage": "train", "epoch": 4}) is None  # no loss, no "event": not an end-of-epoch line
    assert epoch_row({"state": "succeeded", "epoch": 4, "loss": 1}) is None
    assert epoch_row({"stage": "x", "metrics": {"epoch": 5, "loss": 0.1, "val_dice": 0.7}}) == \
        {"part": "", "epoch": 5, "loss": 0.1, "val_dice": 0.7}
    assert epoch_row({"epoch": 1.5, "loss": 1}) is None


# ------------------------------------------------------------------------------------ the Slicer module side
from test_slicer_module_logic import module  # noqa: E402,F401  (Segment Teeth with stand-in Qt, real MRML)


def test_segment_teeth_module_creates_the_training_logic(module, tmp_path):
    import sys
    from pathlib import Path

    logic = module.SegmentTeethLogic(python=sys.executable)
    training = logic.createTrainingLogic()
    assert isinstance(training, TrainingLogic)
    assert training.task_name == "teeth" and training.scene is slicer.mrmlScene
    assert training._job.python == sys.executable and Path(training._job.job_root) == Path(logic.job_root)
    assert training.training_folder == tmp_path / "home" / "training" / "teeth"
    assert training.model_versions() == [] and training.case_count() == 0

    from DeepSegReconCommon.FinetuneSection import describeProgress, findSectionUI

    assert Path(findSectionUI()) == Path(__file__).resolve().parents[3] / "Resources" / "UI" / "FinetuneSection.ui"
    assert module.formatEta(125) == "about 2 min 05 s left"
    assert describeProgress({"epoch": 3, "epochs": 10, "loss": 0.25, "val_dice": 0.5, "best_val_dice": 0.75}) == \
        "epoch 3/10, loss 0.2500, validation Dice 0.500, best 0.750"
    assert describeProgress({"stage": "check cases", "message": ""}) == "check cases"


# ------------------------------------------------------------------------------------ the engine's own tasks
@pytest.mark.slow
def test_the_engines_train_and_finetune_tasks_through_the_logic(tmp_path, monkeypatch):
    """The real "train" and "finetune" worker tasks (deepsegrecon.training.jobs) on a tiny made-up task: the table
    gets the epochs, the versions land in the store, and a cancelled fine-tune writes nothing."""
    import importlib.util

    if importlib.util.find_spec("deepsegrecon.training.jobs") is None:
        pytest.skip("the engine's training tasks (deepsegrecon.training.jobs) are not there")
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    mrml = slicer.vtkMRMLScene()
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 10, (32, 32, 32)).astype(np.float32)
    lab = np.zeros(arr.shape, np.uint8)
    lab[4:14, 6:20, 8:24], lab[18:28, 10:26, 4:16] = 11, 2
    arr[lab == 11] += 300
    arr[lab == 2] += 150
    img = Image(arr, spacing=(1.0, 1.0, 1.0))
    volume = sc.image_to_volume_node(mrml, img, "toy")
    seg = _segmentation(mrml, img.with_array(lab), [SegmentInfo("tooth_11", 11, (1, 0, 0)),
                                                    SegmentInfo("mandible", 2, (0, 1, 0))], reference=volume)
    logic = TrainingLogic(mrml, "toytask", job_root=tmp_path / "jobs")
    for _ in range(3):
        logic.add_to_training_set({"image": volume}, seg)
    small = {"settings": {"patch_size": [32, 32, 32], "samples_per_case": 1, "batch_size": 1}}
    try:
        logic.start_training("toy-v1", epochs=1, device="cpu",
                             options={**small, "label_map": {"tooth_11": 11, "mandible": 2}})
        status = logic.wait(timeout=300)
        assert status["state"] == "succeeded", status
        assert logic.table_node.GetNumberOfRows() == 1 and status["version"] == "toy-v1"

        logic.start_finetune("toy-v1", "toy-v2", epochs=2, device="cpu", options=small)
        status = logic.wait(timeout=300)
        assert status["state"] == "succeeded", status
        assert logic.table_node.GetNumberOfRows() == 2 and [r["epoch"] for r in logic.history] == [1, 2]
        assert all(r["loss"] is not None for r in logic.history)
        assert sorted(v for v, _ in logic.model_versions()) == ["toy-v1", "toy-v2"]
        assert ModelStore().get("toytask", "toy-v2").manifest["base_version"] == "toy-v1"

        store = ModelStore()
        before = ([(e.version, str(e.dir)) for e in store.list("toytask")], _tree(store.root))
        logic.start_finetune("toy-v2", "toy-v3", minutes=10, device="cpu", options=small)
        end = time.monotonic() + 120
        while logic.poll()["stage"] != "train":
            assert logic.poll()["state"] == "running" and time.monotonic() < end
            time.sleep(0.1)
        logic.cancel()
        assert logic.poll()["state"] == "cancelled"
        assert ([(e.version, str(e.dir)) for e in store.list("toytask")], _tree(store.root)) == before
        assert list((tmp_path / "jobs").iterdir()) == []
    finally:
        logic.cancel()
        mrml.Clear(1)
