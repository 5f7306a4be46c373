"""Segment Brain Tumour: T1, T1c, T2, FLAIR (at least FLAIR and T1c) -> enhancing tumour, tumour core and whole
tumour segments with their volumes in mL (SegResNet + VAE regulariser, Myronenko 2018).

Slicer module of the DeepSegRecon extension. Qt wiring only: every button calls one method of
:class:`SegmentBrainTumorLogic`, the engine's headless scene logic
(``deepsegrecon.scene.brain.SegmentBrainTumorLogic``) with Slicer's module-logic base. The work runs in a worker
process (``PythonSlicer``); a QTimer polls it for progress, ETA and the result.
"""

import logging
import os
import shutil
import sys
import tempfile

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
POLL_INTERVAL_MS = 200
MODALITIES = ("t1", "t1c", "t2", "flair")


def findResource(relativePath):
    """Absolute path of a shared resource (installed extension or source tree), or None."""
    for folder in (os.path.join(MODULE_DIR, "Resources"),
                   os.path.join(os.path.dirname(os.path.dirname(MODULE_DIR)), "Resources")):
        path = os.path.join(folder, relativePath)
        if os.path.exists(path):
            return path
    return None


def setUpEngine():
    for parent in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(parent, "deepsegrecon", "__init__.py")):
            if parent not in sys.path:
                sys.path.insert(0, parent)
            break
    models = findResource("Models")
    if models and "DEEPSEGRECON_BUILTIN_MODELS" not in os.environ:
        os.environ["DEEPSEGRECON_BUILTIN_MODELS"] = models


setUpEngine()

try:
    from deepsegrecon.scene.brain import SegmentBrainTumorLogic as SceneSegmentBrainTumorLogic
    from deepsegrecon.scene.logic import FINAL as FINAL_STATES
    from DeepSegReconCommon.FinetuneSection import FinetuneSection, formatEta
except ImportError as _error:
    raise ImportError(f"Segment Brain Tumour cannot import its engine (the 'deepsegrecon' and 'DeepSegReconCommon' "
                      f"packages beside {MODULE_DIR}): {_error}. Reinstall the DeepSegRecon extension.") from _error


def pythonSlicerExecutable():
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidates = [shutil.which("PythonSlicer")]
    try:
        candidates.append(os.path.join(slicer.app.slicerHome, "bin", name))
    except AttributeError:
        pass
    candidates.append(os.path.join(os.path.dirname(sys.executable), name))
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise RuntimeError(f"{name} was not found next to the Slicer application; the segmentation worker needs it")


class SegmentBrainTumor(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment Brain Tumour"
        self.parent.categories = ["DeepSegRecon"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["DeepSegRecon maintainers"]
        self.parent.helpText = """
Segments a brain tumour in co-registered, skull-stripped MRI: <code>enhancing_tumor</code>, <code>tumor_core</code>
and <code>whole_tumor</code> (the BraTS regions, overlapping segments with BraTS colours), and a table of their
volumes in mL.
<ol>
<li>Choose the T1, T1c, T2 and FLAIR volumes (FLAIR and T1c are required; the others may be left empty), an output
segmentation, the model version and the device, and click <b>Segment Tumour</b>. Inputs on other grids are
resampled onto the first one. The panel says which inputs were used. <b>Cancel</b> leaves the scene as it was.</li>
<li><b>Improve the model</b>: add corrected cases to the training set and fine-tune a new model version.</li>
</ol>
<p><b>Honest status of the weights:</b> the shipped weights are a CPU-sized version of the network trained
<b>only on synthetic tumour phantoms</b> built on the MNI152 brain template, not on patient scans. Accuracy figures
are measured on held-out phantoms. Do not use them for diagnosis.</p>
"""
        self.parent.acknowledgementText = """
DeepSegRecon builds on 3D Slicer, PyTorch and MONAI. Network: A. Myronenko, "3D MRI brain tumor segmentation using
autoencoder regularization", BrainLes 2018 (BraTS 2018 winner). Phantom anatomy: the MNI152 2009 template (nilearn).
"""
        if self.parent.icon.isNull():
            icon = findResource("Icons/SegmentBrainTumor.png")
            if icon:
                self.parent.icon = qt.QIcon(icon)


class SegmentBrainTumorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: each button calls one logic method; a timer polls the running job."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.trainingLogic = None
        self.finetuneSection = None
        self._pollTimer = None
        self._running = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiPath = self.resourcePath("UI/SegmentBrainTumor.ui")
        if not os.path.isfile(uiPath):
            uiPath = findResource("UI/SegmentBrainTumor.ui")
        uiWidget = slicer.util.loadUI(uiPath)
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegmentBrainTumorLogic()
        self.trainingLogic = self.logic.createTrainingLogic()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        for selector in self._selectors().values():
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.fillModelComboBox()
        self.finetuneSection = FinetuneSection(self.trainingLogic, caseInputs=self.caseInputs,
                                               device=lambda: self.ui.deviceComboBox.currentText,
                                               onModelChange=self.onModelChange)
        self.finetuneSection.setup(self.ui.finetuneSectionPlaceholder.layout())
        self.updateButtons()

    def cleanup(self):
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None and self._running:
            self.logic.cancel()
        if self.finetuneSection is not None:
            self.finetuneSection.cleanup()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        if self._running:
            self.logic.cancel()
            self._finishRun({"state": "cancelled", "error": "the scene was closed"})

    def _selectors(self):
        return {"t1": self.ui.t1Selector, "t1c": self.ui.t1cSelector, "t2": self.ui.t2Selector,
                "flair": self.ui.flairSelector}

    def selectedInputs(self):
        return {m: s.currentNode() for m, s in self._selectors().items()}

    def updateButtons(self, *args):
        chosen = self.selectedInputs()
        ready = chosen["t1c"] is not None and chosen["flair"] is not None
        self.ui.applyButton.enabled = ready and not self._running
        self.ui.applyButton.toolTip = ("Segment the tumour." if ready else "Choose at least the FLAIR and T1c volumes.")
        self.ui.cancelButton.enabled = self._running

    def fillModelComboBox(self, select=None):
        combo = self.ui.modelComboBox
        try:
            versions = self.logic.model_versions()
        except Exception as e:  # a broken store must not break the panel
            logging.warning(f"Segment Brain Tumour: cannot list the model versions: {e}")
            versions = []
        combo.clear()
        for version in versions:
            combo.addItem(version)
        combo.enabled = bool(versions)
        if select:
            index = combo.findText(select)
            if index >= 0:
                combo.currentIndex = index
        if not versions:
            combo.addItem("(no model installed)")
            self.ui.statusLabel.text = "No brain-tumor model is installed (see the README)."

    def caseInputs(self):
        """What "Add to training set" saves: the chosen MRI volumes and the corrected segmentation."""
        return ({m: n for m, n in self.selectedInputs().items() if n is not None},
                self.ui.outputSegmentationSelector.currentNode())

    def onModelChange(self, activeVersion):
        self.fillModelComboBox(select=activeVersion)

    def onApplyButton(self):
        if self._running:
            return
        params = {"device": self.ui.deviceComboBox.currentText}
        if self.ui.modelComboBox.enabled and self.ui.modelComboBox.currentText:
            params["model"] = self.ui.modelComboBox.currentText
        with slicer.util.tryWithErrorDisplay("Segment Brain Tumour could not start.", waitCursor=True):
            self.logic.start(self.selectedInputs(), params, output_node=self.ui.outputSegmentationSelector.currentNode())
            self._running = True
            self.ui.progressBar.value = 0
            self.ui.etaLabel.text = ""
            self.ui.inputsUsedLabel.text = ""
            self.ui.volumesLabel.text = ""
            self.ui.statusLabel.text = "Starting the segmentation worker..."
            self.updateButtons()
            self._pollTimer.start()

    def onCancelButton(self):
        self.logic.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    def onPollTimer(self):
        try:
            status = self.logic.poll()
        except Exception as e:
            logging.exception("Segment Brain Tumour: polling the worker failed")
            self._finishRun({"state": "failed", "error": f"{type(e).__name__}: {e}"})
            return
        state = status.get("state")
        if state in FINAL_STATES or state == "idle":
            self._finishRun(status if state != "idle" else {"state": "cancelled"})
            return
        self.ui.progressBar.value = int(round(100 * float(status.get("fraction") or 0.0)))
        self.ui.etaLabel.text = formatEta(status.get("eta_s"))
        self.ui.statusLabel.text = status.get("message") or status.get("stage") or "Running..."

    def _finishRun(self, status):
        self._pollTimer.stop()
        self._running = False
        self.ui.etaLabel.text = ""
        state = status.get("state")
        if state == "succeeded":
            self.ui.progressBar.value = 100
            segNode = next((n for n in self.logic.output_nodes if n.IsA("vtkMRMLSegmentationNode")), None)
            if segNode is not None:
                self.ui.outputSegmentationSelector.setCurrentNode(segNode)
            vols = self.logic.volumes_ml()
            self.ui.volumesLabel.text = ", ".join(f"{k.replace('_', ' ')} {v:.1f} mL" for k, v in vols.items())
            self.ui.inputsUsedLabel.text = self.logic.inputs_message()
            self.ui.statusLabel.text = "Done."
        elif state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled; the scene was left unchanged."
        else:
            error = status.get("error") or "unknown error"
            self.ui.statusLabel.text = f"Failed: {error}"
            slicer.util.errorDisplay(f"Segment Brain Tumour failed:\n\n{error}", windowTitle="Segment Brain Tumour")
        self.updateButtons()


class SegmentBrainTumorLogic(SceneSegmentBrainTumorLogic, ScriptedLoadableModuleLogic):
    """The engine's headless scene logic with Slicer's module-logic base (scene logic first in the bases)."""

    def __init__(self, scene=None, python=None, job_root=None):
        if job_root is None:
            job_root = os.path.join(slicer.app.temporaryPath or tempfile.gettempdir(), "DeepSegRecon", "jobs")
        SceneSegmentBrainTumorLogic.__init__(self, scene if scene is not None else slicer.mrmlScene,
                                             python=python or pythonSlicerExecutable(), job_root=job_root)
        ScriptedLoadableModuleLogic.__init__(self)

    def createTrainingLogic(self, training_root=None):
        from deepsegrecon.scene.training import TrainingLogic

        return TrainingLogic(self.scene, self.model_task, training_root=training_root, python=self.python,
                             job_root=self.job_root, plugins=self.plugins, env=self.env)


class SegmentBrainTumorTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: phantom volumes -> worker -> three region segments and a volume table."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentBrainTumor_phantom()

    def test_SegmentBrainTumor_phantom(self):
        from deepsegrecon.brain.phantom import make_phantom
        from deepsegrecon.scene.volumes import image_to_volume_node

        p = make_phantom(100_005)
        nodes = {m: image_to_volume_node(slicer.mrmlScene, img, f"phantom {m}") for m, img in p["images"].items()}
        logic = SegmentBrainTumorLogic()
        seg, table = logic.run({"t1c": nodes["t1c"], "flair": nodes["flair"]}, {"device": "cpu"}, timeout=900)
        names = [seg.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(seg.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["enhancing_tumor", "tumor_core", "whole_tumor"])
        self.assertEqual(table.GetTable().GetNumberOfRows(), 3)
        self.delayDisplay("Segment Brain Tumour: phantom test passed")
