"""The Reconstruct CBCT Slicer module's code outside Slicer (qt and ScriptedLoadableModule stand-ins, the real
MRML ``slicer`` from slicer-core), as for Segment Teeth."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

from test_slicer_module_logic import _stand_in_modules  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
MODULE_PY = ROOT / "DeepSegRecon" / "ReconstructCBCT" / "ReconstructCBCT.py"


@pytest.fixture
def module(monkeypatch, tmp_path):
    qt, slm = _stand_in_modules()
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path / "tmp"),
                                                             slicerHome=str(tmp_path / "Slicer")), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("ReconstructCBCT_under_test", MODULE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    slicer.mrmlScene.Clear(1)


def test_module_logic_is_the_scene_logic(module, tmp_path):
    from deepsegrecon.errors import InputError
    from deepsegrecon.scene.cbct import ReconstructCBCTLogic as SceneLogic
    from DeepSegReconCommon.TaskWidget import findResource  # the module put DeepSegReconCommon on the path

    assert findResource("UI/ReconstructCBCT.ui") == str(ROOT / "Resources" / "UI" / "ReconstructCBCT.ui")
    assert findResource("Icons/ReconstructCBCT.png")
    logic = module.ReconstructCBCTLogic(python=sys.executable)
    assert isinstance(logic, SceneLogic) and isinstance(logic, module.ScriptedLoadableModuleLogic)
    assert logic.moduleName == "ReconstructCBCT" and logic.task_name == "cbct-recon"
    assert Path(logic.job_root) == tmp_path / "tmp" / "DeepSegRecon" / "jobs"
    assert logic.model_versions() == []
    with pytest.raises(InputError, match="choose an input volume"):
        logic.reconstruct(None, True, 10)
    assert module.describeMetrics({"metrics": None}).startswith("No reference")
    text = module.describeMetrics({"metrics": {"dif_gaussian": {"psnr_db": 31.234, "ssim": 0.81},
                                               "fdk": {"psnr_db": 22.5, "ssim": 0.4}}})
    assert "DIF-Gaussian: 31.23 dB" in text and "FDK: 22.50 dB" in text and "network alone" not in text
    text = module.describeMetrics({"metrics": {"dif_gaussian": {"psnr_db": 31.2, "ssim": 0.8},
                                               "dif_gaussian_network_only": {"psnr_db": 29.0, "ssim": 0.7},
                                               "fdk": {"psnr_db": 22.5, "ssim": 0.4}}})
    assert "network alone: 29.00 dB" in text
