"""TaskLogic: a real worker process runs a (test-only) task; the result comes into a real MRML scene.
Failure, cancel and a SIGKILLed worker leave the scene's nodes and the job folders as they were."""

import os
import signal
import textwrap
import time

import numpy as np
import pytest
import slicer

from deepsegrecon import scene as sc
from deepsegrecon.errors import InputError
from deepsegrecon.scene.logic import SegmentTeethLogic, TaskLogic
from scene_testdata import oblique_grid

PLUGIN = textwrap.dedent('''
    """A test-only segmentation task: thresholds the image into two labelled segments, slowly if asked."""
    import time

    import numpy as np

    from deepsegrecon.errors import InputError
    from deepsegrecon.task import InputSpec, Task, register
    from deepsegrecon.results import SegmentationResult, SegmentInfo


    @register
    class ThresholdTeeth(Task):
        name = "test_threshold_teeth"
        inputs = (InputSpec("image"),)
        uses_device = False

        def run(self, images, params, ctx):
            n, dt = int(params.get("steps", 3)), float(params.get("dt", 0.0))
            for i in range(n):
                ctx.step("segmenting", i / n, f"step {i + 1} of {n}")
                if params.get("fail") and i == 1:
                    raise InputError("no teeth found in this test image (on purpose)")
                time.sleep(dt)
            img = images["image"]
            lab = np.zeros(img.array.shape, np.uint8)
            lab[img.array > params.get("high", 80)] = 11
            lab[(img.array > 20) & (img.array <= params.get("high", 80))] = 2
            segs = [SegmentInfo("tooth_11", 11, (1.0, 0.9, 0.8)), SegmentInfo("mandible", 2, (0.3, 0.5, 0.9))]
            return SegmentationResult(img.with_array(lab), segs)
''')


@pytest.fixture
def setup(tmp_path):
    plugin = tmp_path / "dsr_scene_test_tasks.py"
    plugin.write_text(PLUGIN)
    mrml = slicer.vtkMRMLScene()
    grid = oblique_grid()
    volume = sc.image_to_volume_node(mrml, grid, "CBCT 1")
    jobs = tmp_path / "jobs"
    logic = TaskLogic(mrml, "test_threshold_teeth", job_root=jobs, plugins=[str(plugin)])
    yield mrml, volume, grid, logic, jobs
    logic.cancel()
    mrml.Clear(1)


def _expected(grid, high=80):
    lab = np.zeros(grid.array.shape, np.uint8)
    lab[grid.array > high] = 11
    lab[(grid.array > 20) & (grid.array <= high)] = 2
    return lab


def test_run_brings_the_segmentation_into_the_scene(setup):
    mrml, volume, grid, logic, jobs = setup
    seen = []
    logic.start({"image": volume}, {"steps": 3})
    assert mrml.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # nothing before the result is complete
    status = logic.wait(timeout=60, on_progress=seen.append, poll_interval=0.05)
    assert status["state"] == "succeeded", status
    assert status["fraction"] == 1.0 and status["error"] is None
    assert any(s["state"] == "running" for s in seen)
    (seg,) = logic.output_nodes
    assert seg.GetName() == "CBCT 1 test_threshold_teeth" and seg.GetScene() is mrml
    assert seg.GetNodeReference("referenceImageGeometryRef") is volume
    lab, infos = sc.segmentation_node_to_labelmap(seg, volume)
    assert lab.same_grid(grid, tol=1e-6)  # oblique geometry survived the job folder and back
    np.testing.assert_array_equal(lab.array, _expected(grid))
    assert [(s.name, s.label) for s in infos] == [("tooth_11", 11), ("mandible", 2)]
    assert list(jobs.iterdir()) == []  # job folder removed

    # again, into the same output node, with another parameter: replaced in place
    n_nodes = mrml.GetNumberOfNodes()
    nodes = logic.run({"image": volume}, {"steps": 1, "high": 60}, output_node=seg, timeout=60)
    assert nodes == [seg] and mrml.GetNumberOfNodes() == n_nodes
    lab, _ = sc.segmentation_node_to_labelmap(seg, volume)
    np.testing.assert_array_equal(lab.array, _expected(grid, 60))
    assert logic.poll()["state"] == "succeeded"


def test_failure_raises_the_engine_error_and_adds_nothing(setup):
    mrml, volume, grid, logic, jobs = setup
    n_nodes = mrml.GetNumberOfNodes()
    with pytest.raises(InputError, match="no teeth found in this test image"):
        logic.run({"image": volume}, {"steps": 3, "fail": True}, timeout=60)
    assert mrml.GetNumberOfNodes() == n_nodes and logic.output_nodes == []
    assert list(jobs.iterdir()) == []
    with pytest.raises(InputError, match="unknown task"):
        TaskLogic(mrml, "no_such_task", job_root=jobs).run({"image": volume}, {}, timeout=60)
    assert mrml.GetNumberOfNodes() == n_nodes and list(jobs.iterdir()) == []


def test_cancel_stops_quickly_and_leaves_nothing(setup):
    mrml, volume, grid, logic, jobs = setup
    n_nodes = mrml.GetNumberOfNodes()
    logic.start({"image": volume}, {"steps": 200, "dt": 0.05})
    _wait_until_running(logic)
    with pytest.raises(InputError, match="already running"):
        logic.start({"image": volume}, {})
    pid = logic._handle.pid
    t0 = time.monotonic()
    logic.cancel()
    assert time.monotonic() - t0 < 2.0
    assert logic.poll()["state"] == "cancelled"
    assert _gone(pid)
    assert mrml.GetNumberOfNodes() == n_nodes and logic.output_nodes == []
    assert list(jobs.iterdir()) == []


def test_cancel_a_task_that_does_not_check_for_it(setup):
    """A task busy in one long call never sees the flag file: SIGTERM (then SIGKILL) stops it."""
    mrml, volume, grid, logic, jobs = setup
    n_nodes = mrml.GetNumberOfNodes()
    logic.start({"image": volume}, {"steps": 1, "dt": 60})
    _wait_until_running(logic)
    pid = logic._handle.pid
    t0 = time.monotonic()
    logic.cancel()
    assert time.monotonic() - t0 < 2.0
    assert _gone(pid) and logic.poll()["state"] == "cancelled"
    assert mrml.GetNumberOfNodes() == n_nodes and list(jobs.iterdir()) == []


def test_sigkilled_worker_is_reported_and_leaves_nothing(setup):
    mrml, volume, grid, logic, jobs = setup
    n_nodes = mrml.GetNumberOfNodes()
    logic.start({"image": volume}, {"steps": 200, "dt": 0.05})
    _wait_until_running(logic)
    os.kill(logic._handle.pid, signal.SIGKILL)  # the worker this test started
    status = logic.wait(timeout=10, poll_interval=0.05)
    assert status["state"] == "failed"
    assert "killed (signal 9" in status["error"] and "worker.log" not in status["error"]
    assert mrml.GetNumberOfNodes() == n_nodes and logic.output_nodes == []
    assert list(jobs.iterdir()) == []


def test_input_under_nonlinear_transform_is_refused_before_any_job(setup):
    mrml, volume, grid, logic, jobs = setup
    import vtk

    bent = mrml.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    tps = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (20, 20, 20)]:
        src.InsertNextPoint(p)
        dst.InsertNextPoint(p[0], p[1] + (4 if p == (20, 20, 20) else 0), p[2])
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    bent.SetAndObserveTransformToParent(tps)
    volume.SetAndObserveTransformNodeID(bent.GetID())
    n_nodes = mrml.GetNumberOfNodes()
    with pytest.raises(InputError, match="non-linear"):
        logic.start({"image": volume}, {})
    assert mrml.GetNumberOfNodes() == n_nodes
    assert not jobs.exists() or list(jobs.iterdir()) == []


@pytest.mark.parametrize("params, why", [({"tta": "yes"}, "parameter 'tta' must be true or false"),
                                         ({"thershold": 0.5}, "has no parameter 'thershold'; its parameters are:"),
                                         ({"device": "gpu"}, "unknown device 'gpu'")])
def test_a_wrong_parameter_is_refused_before_any_job(setup, params, why):
    """The Slicer panel gets the message at once: the task's typed parameters are checked in the Slicer process
    (their modules import no torch), before a job folder or a worker exists."""
    mrml, volume, grid, _, jobs = setup
    logic = SegmentTeethLogic(mrml, job_root=jobs)
    n_nodes = mrml.GetNumberOfNodes()
    with pytest.raises(InputError, match=why):
        logic.start({"image": volume}, params)
    assert mrml.GetNumberOfNodes() == n_nodes and not logic.running
    assert not jobs.exists() or list(jobs.iterdir()) == []


def test_segment_teeth_logic_surfaces_models_files(setup, tmp_path):
    mrml, volume, grid, _, jobs = setup
    logic = SegmentTeethLogic(mrml, job_root=jobs, plugins=[str(tmp_path / "dsr_scene_test_tasks.py")],
                              task_name="test_threshold_teeth")
    assert SegmentTeethLogic.task_name == "teeth" and SegmentTeethLogic(mrml).task_name == "teeth"
    (seg,) = logic.run({"image": volume}, {"steps": 1}, timeout=60)
    surfaces = logic.create_surfaces(seg, 0.5)
    assert set(surfaces) == {"tooth_11", "mandible"}
    folder = logic.create_models(seg)
    assert len(sc.folder_models(mrml, folder)) == 2
    paths = logic.export_surfaces(seg, tmp_path / "out", "stl")
    assert [p.name for p in paths] == ["tooth_11.stl", "mandible.stl"] and all(p.stat().st_size > 84 for p in paths)


def _wait_until_running(logic, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = logic.poll()
        assert status["state"] == "running", status
        if status["stage"] == "segmenting":
            return
        time.sleep(0.05)
    raise AssertionError("the worker did not start the task in time")


def _gone(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
