"""Register X-ray logic on a real MRML scene: a worker runs xray-register; the transform node and the DRR volume
come into the scene with the right geometry; bad input leaves the scene as it was."""

import numpy as np
import pytest
import slicer
import torch

from deepsegrecon.errors import InputError
from deepsegrecon.scene.volumes import image_to_volume_node
from deepsegrecon.scene.xray import RegisterXrayLogic
from deepsegrecon.task import TaskContext, get_task
from deepsegrecon.xray import geometry as G
from xray_testdata import landmarks, small_ct

TRUTH = {"parameterization": "euler_angles", "convention": "ZXY", "rotation": [0.05, 0.03, -0.04],
         "translation": [-6.0, 845.0, 5.0]}


def _drr(ct):
    params = {**get_task("drr").default_params(), "pose": TRUTH, "height": 64, "width": 64,
              "pixel_spacing": [4.5, 4.5]}
    return get_task("drr").run({"ct": ct}, params, TaskContext()).volumes["drr"]


def test_register_xray_logic_imports_transform_and_drr(tmp_path):
    torch.set_num_threads(1)
    ct = small_ct()
    xray = _drr(ct)
    scene = slicer.vtkMRMLScene()
    ct_node = image_to_volume_node(scene, ct, "CT")
    x_node = image_to_volume_node(scene, xray, "X-ray")
    before = _ids(scene)
    env = {"DEEPSEGRECON_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    logic = RegisterXrayLogic(scene, job_root=tmp_path / "jobs", env=env)
    geo = logic.xray_geometry(x_node)
    assert np.allclose(geo["pixel_spacing"], [4.5, 4.5]) and geo["slices"] == 1
    params = {"sdd": 1020.0, "pixel_spacing": geo["pixel_spacing"], "train_minutes": 0, "size": 64,
              "ct_spacing_mm": 0, "levels": [[32, 60], [64, 40]], "truth_pose": TRUTH,
              "landmarks": landmarks(ct).tolist()}
    logic.register(ct_node, x_node, params)
    status = logic.wait(timeout=240)
    assert status["state"] == "succeeded", status
    transform, drr_node = logic.output_nodes
    added = sorted(scene.GetNodeByID(i).GetClassName() for i in _ids(scene) - before)
    assert added == ["vtkMRMLLinearTransformNode", "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLScalarVolumeNode"]
    assert transform.IsA("vtkMRMLLinearTransformNode") and drr_node.IsA("vtkMRMLScalarVolumeNode")
    assert ct_node.GetParentTransformNode() is transform and x_node.GetParentTransformNode() is None
    rep = logic.result.report
    assert rep["mtre_mm"] < 3.0 < rep["start_mtre_mm"], rep
    # to-parent (RAS) of the node == the engine's LPS matrix, flipped
    m = vtk_to_np(transform.GetMatrixTransformToParent())
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert np.allclose(m, flip @ logic.result.matrix_lps @ flip, atol=1e-6)
    # the CT under the transform lands where the true pose puts it (landmarks within 2 mm)
    truth_m = G.ct_to_xray_matrix(G.read_pose_json(TRUTH), G.default_xray_frame(G.Carm(1020, 64, 64, 4.5, 4.5),
                                  _centre(ct)), _centre(ct))
    for p in landmarks(ct):
        got = np.array(transform.GetTransformToParent().TransformPoint(*(p * [-1, -1, 1]))) * [-1, -1, 1]
        assert np.linalg.norm(got - (truth_m @ np.append(p, 1))[:3]) < 3.0
    # the DRR lies on the X-ray's plane, same pixel size
    ijk = vtk_to_np_ijk(drr_node)
    ijk_x = vtk_to_np_ijk(x_node)
    assert np.allclose(ijk[:3, :3], ijk_x[:3, :3], atol=1e-6) and np.allclose(ijk[:3, 3], ijk_x[:3, 3], atol=1e-4)


def test_register_xray_logic_refuses_bad_input(tmp_path):
    ct = small_ct()
    scene = slicer.vtkMRMLScene()
    ct_node = image_to_volume_node(scene, ct, "CT")
    x_node = image_to_volume_node(scene, _drr(ct), "X")
    vol3d = image_to_volume_node(scene, small_ct(oblique=False), "not an X-ray")
    before = _ids(scene)
    logic = RegisterXrayLogic(scene, job_root=tmp_path / "jobs", env={"DEEPSEGRECON_HOME": str(tmp_path / "h")})
    with pytest.raises(InputError, match="pixel spacing"):
        logic.register(ct_node, x_node, {"sdd": 1020, "pixel_spacing": [0, 0]})
    with pytest.raises(InputError, match="source-to-detector"):
        logic.register(ct_node, x_node, {"pixel_spacing": [1, 1]})
    # a 3-D "X-ray": the worker refuses it, nothing is added
    logic.register(ct_node, vol3d, {"sdd": 1020, "pixel_spacing": [1, 1], "train_minutes": 0})
    status = logic.wait(timeout=120)
    assert status["state"] == "failed" and status["error_type"] == "InputError" and "3-D" in status["error"]
    assert _ids(scene) == before and not logic.output_nodes
    assert ct_node.GetParentTransformNode() is None
    assert not list((tmp_path / "jobs").glob("*"))  # the job folder is gone


def _ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _centre(ct):
    from deepsegrecon.xray.ct import centre_ras

    return centre_ras(ct)


def vtk_to_np(m):
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def vtk_to_np_ijk(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return vtk_to_np(m)
