"""The Segment Teeth Slicer module's code, run outside Slicer.

``SegmentTeeth.py`` imports ``qt`` and ``slicer.ScriptedLoadableModule``, which only Slicer has. Here they are
small stand-ins (the ``slicer`` package itself is the real MRML one from the slicer-core wheel), faithful to what
the module relies on: Slicer's ``ScriptedLoadableModuleLogic.__init__`` calls ``super().__init__()`` with no
arguments, which decides how the module's logic may combine it with the engine's scene logic. The widget needs
Slicer's PythonQt and is covered by the .ui tests and by the module's own test inside Slicer.
"""

import importlib.util
import os
import sys
import textwrap
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[3]
MODULE_PY = ROOT / "DeepSegRecon" / "SegmentTeeth" / "SegmentTeeth.py"

PLUGIN = textwrap.dedent('''
    import numpy as np

    from deepsegrecon.task import InputSpec, Task, register

    from deepsegrecon.results import SegmentationResult, SegmentInfo


    @register
    class ModuleSmokeTeeth(Task):
        name = "test_module_smoke_teeth"
        inputs = (InputSpec("image"),)
        uses_device = False

        def run(self, images, params, ctx):
            ctx.step("segmenting", 0.5, "half way")
            img = images["image"]
            lab = np.where(img.array > 50, 21, 0).astype(np.uint8)
            lab[(img.array > 10) & (img.array <= 50)] = 1
            return SegmentationResult(img.with_array(lab), [SegmentInfo("tooth_21", 21, (1.0, 0.9, 0.8)),
                                                           SegmentInfo("maxilla", 1, (0.9, 0.8, 0.6))],
                                      absent=["tooth_11"])
''')


def _stand_in_modules():
    qt = types.ModuleType("qt")

    class QIcon:
        def __init__(self, path=""):
            self.path = path

        def isNull(self):
            return not self.path

    qt.QIcon = QIcon
    qt.QTimer = type("QTimer", (), {})
    qt.QDir = type("QDir", (), {"homePath": staticmethod(lambda: str(Path.home()))})

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            super().__init__()
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title, parent.categories, parent.dependencies, parent.contributors = "", [], [], []
            parent.helpText = parent.acknowledgementText = ""

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            super().__init__()

    class ScriptedLoadableModuleLogic:  # the parts of Slicer's class the module uses, same semantics
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                return node
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return slicer.mrmlScene.AddNode(node)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=100):
            pass

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return qt, slm


@pytest.fixture
def module(monkeypatch, tmp_path):
    qt, slm = _stand_in_modules()
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    home = tmp_path / "Slicer"
    (home / "bin").mkdir(parents=True)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path / "tmp"),
                                                             slicerHome=str(home)), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setenv("DEEPSEGRECON_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPSEGRECON_BUILTIN_MODELS", str(tmp_path / "builtin"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module adds the engine folder; undo afterwards
    spec = importlib.util.spec_from_file_location("SegmentTeeth_under_test", MODULE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    slicer.mrmlScene.Clear(1)


def test_engine_and_resources_are_found_from_the_source_tree(module):
    assert module.findResource("UI/SegmentTeeth.ui") == str(ROOT / "Resources" / "UI" / "SegmentTeeth.ui")
    assert module.findResource("Icons/SegmentTeeth.png") == str(ROOT / "Resources" / "Icons" / "SegmentTeeth.png")
    assert module.findResource("UI/NoSuchModule.ui") is None
    assert str(ROOT / "DeepSegRecon") in sys.path
    assert module.FINAL_STATES == ("succeeded", "failed", "cancelled")


def test_logic_is_the_scene_logic_with_slicer_module_logic(module, tmp_path):
    from deepsegrecon.scene.logic import SegmentTeethLogic as SceneLogic

    logic = module.SegmentTeethLogic(python=sys.executable)
    assert isinstance(logic, SceneLogic)
    assert isinstance(logic, module.ScriptedLoadableModuleLogic)
    assert logic.moduleName == "SegmentTeeth" and logic.task_name == "teeth"
    assert logic.scene is slicer.mrmlScene
    assert Path(logic.job_root) == tmp_path / "tmp" / "DeepSegRecon" / "jobs"
    parameters = logic.getParameterNode()
    node = parameters.parameterNode
    assert isinstance(parameters, module.SegmentTeethParameterNode)
    assert node.GetAttribute("ModuleName") == "SegmentTeeth" and logic.getParameterNode().parameterNode is node
    for name in ("start", "poll", "cancel", "wait", "run", "create_surfaces", "create_models", "export_surfaces",
                 "model_versions", "import_model", "needs_overwrite_confirmation"):
        assert callable(getattr(logic, name)), name


def test_worker_runs_with_python_slicer(module, tmp_path):
    with pytest.raises(RuntimeError, match="PythonSlicer"):
        module.pythonSlicerExecutable()
    exe = Path(slicer.app.slicerHome) / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert module.pythonSlicerExecutable() == str(exe)
    assert module.SegmentTeethLogic().python == str(exe)


def test_a_job_through_the_module_logic(module, tmp_path):
    """start -> poll (as the widget's timer does) -> the segmentation node in the scene."""
    from deepsegrecon.image import Image
    from deepsegrecon.scene.volumes import image_to_volume_node

    plugin = tmp_path / "dsr_module_smoke_tasks.py"
    plugin.write_text(PLUGIN)
    logic = module.SegmentTeethLogic(python=sys.executable)
    logic.task_name, logic.plugins = "test_module_smoke_teeth", (str(plugin),)
    arr = np.zeros((12, 14, 16), np.int16)
    arr[3:9, 4:10, 5:11] = 30
    arr[5:7, 6:8, 7:9] = 90
    volume = image_to_volume_node(slicer.mrmlScene, Image(arr, spacing=(0.4, 0.4, 0.5)), "CBCT")
    logic.start({"image": volume}, {"device": "cpu"})
    seen = []
    status = logic.wait(timeout=120, on_progress=seen.append)
    assert status["state"] in module.FINAL_STATES and status["state"] == "succeeded", status
    assert all(0.0 <= s["fraction"] <= 1.0 for s in seen)
    (seg,) = [n for n in logic.output_nodes if n.IsA("vtkMRMLSegmentationNode")]
    assert module.describeSegmentation(seg, logic.result) == "1 tooth, maxilla; absent: 11."


def test_model_versions_lists_the_default_first(module, tmp_path):
    from deepsegrecon.store import ModelStore

    logic = module.SegmentTeethLogic(python=sys.executable)
    assert logic.model_versions() == []
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    store = ModelStore()
    store.write_version("teeth", "v1", {"w.bin": weights}, manifest={"default": True})
    store.write_version("teeth", "v2", {"w.bin": weights})
    store.write_version("brain", "v9", {"w.bin": weights})
    assert logic.model_versions() == ["v1", "v2"]


def test_eta_text(module):
    assert module.formatEta(None) == ""
    assert module.formatEta(7.4) == "about 7 s left"
    assert module.formatEta(125) == "about 2 min 05 s left"
    assert module.formatEta(3 * 3600 + 60) == "about 3 h 01 min left"


# ------------------------------------------------------------------------------------------ self-tests
MODULE_NAMES = ("SegmentTeeth", "SegmentSlices", "ReconstructCBCT", "RegisterXray", "SegmentBrainTumor")


@pytest.fixture
def load_module(module, monkeypatch):
    """Load DeepSegRecon/<name>/<name>.py with the stand-ins (``module`` set them up). No other module is
    importable by name: a module imports none of the others."""
    for name in MODULE_NAMES:
        monkeypatch.delitem(sys.modules, name, raising=False)

    def load(name):
        if name == "SegmentTeeth":
            return module
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "DeepSegRecon" / name / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_self_test_skips_with_the_reason_when_torch_is_missing(load_module, monkeypatch, name):
    test_class = getattr(load_module(name), f"{name}Test")
    monkeypatch.setitem(sys.modules, "torch", None)  # as in a Slicer where torch was never installed
    # CTest: slicer.testing.runUnitTest loads the module's TestCase classes and runs them with unittest
    result = unittest.TestResult()
    unittest.TestLoader().loadTestsFromTestCase(test_class).run(result)
    assert result.testsRun >= 1 and len(result.skipped) == result.testsRun and result.wasSuccessful()
    for _, reason in result.skipped:
        assert "self-test skipped: the Python packages torch are not installed in Slicer's Python" in reason
    # "Reload and Test" calls runTest(): it says why and returns instead of failing
    case = test_class()
    shown = []
    case.delayDisplay = lambda message, msec=100: shown.append(message)
    case.runTest()
    assert len(shown) == 1 and "torch" in shown[0] and "skipped" in shown[0]


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_self_test_runs_when_its_packages_are_installed(load_module, name):
    from DeepSegReconCommon import SelfTest

    test_class = getattr(load_module(name), f"{name}Test")
    assert SelfTest.skipReason(name) is None  # this environment has every package the worker needs
    slicer.mrmlScene.AddNode(slicer.vtkMRMLScalarVolumeNode())
    test_class().setUp()  # no skip: it goes on to clear the scene for the real case
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_skip_reason_names_every_missing_package():
    from DeepSegReconCommon import SelfTest

    assert sorted(SelfTest.SELF_TEST_IMPORTS) == sorted(MODULE_NAMES)
    missing = {"torch", "diffdrr", "kornia"}
    find = lambda name: None if name in missing else importlib.util.find_spec(name)  # noqa: E731
    assert SelfTest.missingImports(SelfTest.SELF_TEST_IMPORTS["RegisterXray"], find) == ["torch", "diffdrr", "kornia"]
    reason = SelfTest.skipReason("RegisterXray", "Register X-ray", find)
    assert reason.startswith("Register X-ray self-test skipped: the Python packages torch, diffdrr, kornia are not")
    assert SelfTest.skipReason("SegmentTeeth", findSpec=find).startswith("SegmentTeeth self-test skipped")
    with pytest.raises(unittest.SkipTest, match="torch"):
        SelfTest.skipIfMissing("SegmentBrainTumor", findSpec=find)


# ------------------------------------------------------------------------------------------ parameter nodes
def _sample_value(scene, name, value_type, default):
    """A value of ``value_type`` that differs from ``default`` (a new node of that class for a node type)."""
    if isinstance(value_type, type) and issubclass(value_type, slicer.vtkMRMLNode):
        cls = "vtkMRMLSegmentationNode" if value_type is slicer.vtkMRMLNode else value_type.__name__
        return scene.AddNewNodeByClass(cls, f"{name} node")
    return {str: f"{name}: ü, spaces and /a/path", int: 7, float: 2.75, bool: not default}[value_type]


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_parameter_node_round_trip_through_a_saved_scene(load_module, tmp_path, name):
    """Each module's parameter node (Slicer's parameterNodeWrapper inside Slicer; the stand-in on slicer-core):
    defaults on first use (no output node: results go into a new one), every value written, saved with the scene
    and read back from the saved file; the fine-tune section keeps its values in the same node."""
    import typing

    from DeepSegReconCommon import Parameters
    from DeepSegReconCommon.FinetuneSection import FinetuneParameters

    mod = load_module(name)
    assert Parameters.WRAPPER == "fallback"  # slicer-core ships no slicer.parameterNodeWrapper
    with pytest.raises(ImportError):
        importlib.import_module("slicer.parameterNodeWrapper")
    cls = getattr(mod, f"{name}ParameterNode")
    widget_class = getattr(mod, f"{name}Widget")
    types_ = typing.get_type_hints(cls)
    assert set(widget_class.parameterWidgets) == set(types_), "every parameter has its widget, and only those"

    logic = getattr(mod, f"{name}Logic")(python=sys.executable)
    parameters = logic.getParameterNode()
    assert isinstance(parameters, cls)
    node = parameters.parameterNode
    assert node.GetSingletonTag() == name and logic.getParameterNode().parameterNode is node
    defaults = {n: getattr(parameters, n) for n in types_}
    assert defaults.get("outputSegmentation") is None  # a new output node by default
    assert all(v is None for n, v in defaults.items() if isinstance(types_[n], type)
               and issubclass(types_[n], slicer.vtkMRMLNode))

    scene = slicer.mrmlScene
    values = {n: _sample_value(scene, n, t, defaults[n]) for n, t in types_.items()}
    for n, v in values.items():
        setattr(parameters, n, v)
    section = FinetuneParameters(node)
    assert section.finetuneRegion is None and section.finetuneMinutes == 10
    region = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "reviewed") if hasattr(
        slicer, "vtkMRMLMarkupsROINode") else scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "reviewed")
    section.finetuneRegion, section.finetuneMinutes = region, 25
    with pytest.raises(ValueError):
        section.finetuneMinutes = "25"  # typed, as Slicer's wrapper
    assert {n: getattr(logic.getParameterNode(), n) for n in types_} == values  # a second wrapper reads them

    path = tmp_path / "scene.mrml"
    scene.SetURL(str(path))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(path))
    assert loaded.Import()
    back = cls(loaded.GetSingletonNode(name, "vtkMRMLScriptedModuleNode"))
    for n, v in values.items():
        got = getattr(back, n)
        if isinstance(v, slicer.vtkMRMLNode):
            assert got is not None and (got.GetID(), got.GetName()) == (v.GetID(), v.GetName()), n
        else:
            assert got == v and type(got) is type(v), n
    section_back = FinetuneParameters(back.parameterNode)
    assert section_back.finetuneRegion.GetName() == "reviewed" and section_back.finetuneMinutes == 25
    loaded.Clear(1)
