"""Segment Teeth: dental CBCT -> one segment per tooth (FDI numbering), maxilla and mandible.

Slicer module of the DeepSegRecon extension. This file is Qt wiring only: every button calls one method of
:class:`SegmentTeethLogic`, which is the headless scene logic of the engine
(``deepsegrecon.scene.logic.SegmentTeethLogic``) with Slicer's module-logic base added. The work runs in a
separate worker process (Slicer's ``PythonSlicer``) so the application stays responsive; a QTimer polls it.
The shared "Improve the model" section (``DeepSegReconCommon.FinetuneSection``, around
``deepsegrecon.scene.training.TrainingLogic``) adds corrected segmentations to the training set, fine-tunes the
model and switches model versions.
"""

import importlib
import importlib.util
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

# Python packages the worker needs beyond what Slicer ships (numpy, SimpleITK, VTK), pinned like
# requirements.in / requirements.lock. Import name -> pip requirement. torch is handled separately:
# the CPU build from the PyTorch wheel index (on macOS the regular wheel, which includes MPS).
TORCH_VERSION = "2.13.0"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PIP_REQUIREMENTS = {
    "monai": "monai==1.6.1",
    "nrrd": "pynrrd==1.1.3",
    "skimage": "scikit-image==0.26.0",
    "psutil": "psutil==7.2.2",
    "slicerio": "slicerio==1.4.0",
    "matplotlib": "matplotlib==3.11.2",
}
REQUIRED_IMPORTS = ("torch",) + tuple(PIP_REQUIREMENTS)


# ------------------------------------------------------------------------------------- engine location
def setUpEngine():
    """Make ``import deepsegrecon`` and ``import DeepSegReconCommon`` work: the installed extension
    (<qt-scripted-modules>/deepsegrecon) or the source tree (DeepSegRecon/deepsegrecon)."""
    for parent in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(parent, "deepsegrecon", "__init__.py")):
            if parent not in sys.path:
                sys.path.insert(0, parent)
            break


setUpEngine()

try:
    from deepsegrecon.scene.logic import SegmentTeethLogic as SceneSegmentTeethLogic
    from DeepSegReconCommon.FinetuneSection import FinetuneSection
    from DeepSegReconCommon.SelfTest import skipIfMissing, skipReason
    from DeepSegReconCommon.TaskWidget import (  # noqa: F401 (FINAL_STATES, formatEta: for the tests)
        FINAL_STATES,
        TaskWidgetMixin,
        defaultJobRoot,
        findResource,
        formatEta,
        newTrainingLogic,
        pythonSlicerExecutable,
        setModuleIcon,
        useBuiltinModels,
    )
except ImportError as _error:
    raise ImportError(
        f"Segment Teeth cannot find or import its engine (the 'deepsegrecon' and 'DeepSegReconCommon' packages "
        f"beside {MODULE_DIR}): {_error}. Reinstall the DeepSegRecon extension.") from _error

useBuiltinModels()


# ------------------------------------------------------------------------------------ Python packages
def missingPackages():
    """Import names of the required packages that this Python (Slicer's) cannot import."""
    importlib.invalidate_caches()
    return [name for name in REQUIRED_IMPORTS if importlib.util.find_spec(name) is None]


def torchRequirement():
    """pip arguments for the pinned CPU build of torch."""
    if sys.platform == "darwin":
        return [f"torch=={TORCH_VERSION}"]
    return [f"torch=={TORCH_VERSION}+cpu", "--extra-index-url", PYTORCH_CPU_INDEX]


# ------------------------------------------------------------------------------------------ the module
class SegmentTeeth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Segment Teeth"
        self.parent.categories = ["Segmentation.DeepSegRecon"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["DeepSegRecon maintainers"]
        self.parent.helpText = """
Segments a dental CBCT or CT volume into one segment per tooth, named <code>tooth_&lt;FDI&gt;</code> with the FDI
number as label value (11-48), plus <code>maxilla</code> and <code>mandible</code>. A tooth that is absent is
reported absent, never invented.
<ol>
<li>Choose the input volume, an output segmentation (or leave "Create new segmentation"), the model version and
the device, and click <b>Segment Teeth</b>. The work runs in a background process; <b>Cancel</b> stops it and
leaves the scene as it was.</li>
<li><b>Show 3D surfaces</b> builds smoothed closed surfaces; <b>Export</b> writes one STL or OBJ file per segment.</li>
<li><b>Improve the model</b>: correct the output segmentation in the Segment Editor, optionally choose the reviewed
region (an ROI box, labelmap or segmentation; voxels outside it do not count), and click <b>Add to training set</b>.
With a few cases, <b>Fine-tune</b> trains a new model version within the time budget (loss and validation Dice are
plotted as epochs finish). <b>Use this version</b> switches the model used for segmentation; older versions are
never removed, so you can always go back.</li>
</ol>
<p><b>Honest status of the weights:</b> the weights shipped with the extension are trained <b>only on synthetic
jaw phantoms</b>, not on patient scans. Every accuracy figure is measured on held-out phantoms. Expect to fine-tune
on corrected scans from your own scanner before relying on the results; do not use them for diagnosis.</p>
"""
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = """
DeepSegRecon builds on 3D Slicer, PyTorch and MONAI. The teeth network is a two-stage 3D U-Net built from MONAI
blocks, trained on synthetic phantoms generated by the extension itself.
"""
        setModuleIcon(self.parent, "Icons/SegmentTeeth.png")

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ('<p>For more information see the <a href="https://github.com/DeepSegRecon/SlicerDeepSegRecon#readme">'
                "DeepSegRecon documentation</a>.</p>")


# ------------------------------------------------------------------------------------------ the widget
class SegmentTeethWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: each button calls one logic method; a timer polls the running job."""

    taskTitle = "Segment Teeth"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.trainingLogic = None
        self.finetuneSection = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._fillingModelComboBox = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.panelUIPath("UI/SegmentTeeth.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegmentTeethLogic()
        self.trainingLogic = self.logic.createTrainingLogic()

        self.setUpPolling()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelComboBoxChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.smoothingSlider.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.exportFormatComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.exportDirectoryButton.connect("directoryChanged(QString)", self.updateParameterNodeFromGUI)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.surfacesButton.connect("clicked(bool)", self.onSurfacesButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)

        self.fillModelComboBox()
        self.finetuneSection = FinetuneSection(self.trainingLogic, caseInputs=self.caseInputs,
                                               device=lambda: self.ui.deviceComboBox.currentText,
                                               onModelChange=self.onModelChange)
        self.finetuneSection.setup(self.ui.finetuneSectionPlaceholder.layout())
        if not self.ui.exportDirectoryButton.directory:
            self.ui.exportDirectoryButton.directory = qt.QDir.homePath()
        self.initializeParameterNode()

        missing = missingPackages()
        if missing:
            self.ui.statusLabel.text = (
                f"Python packages needed for segmentation are missing: {', '.join(missing)}. "
                "Click Segment Teeth to install them.")

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        TaskWidgetMixin.onSceneStartClose(self, caller, event)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.fillModelComboBox()  # the model chosen in the closed scene is gone with it
        if self.finetuneSection is not None:
            self.finetuneSection.refresh()
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.SetNodeReferenceID("InputVolume", volume.GetID())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = self._parameterNode
            self.ui.inputVolumeSelector.setCurrentNode(p.GetNodeReference("InputVolume"))
            self.ui.outputSegmentationSelector.setCurrentNode(p.GetNodeReference("OutputSegmentation"))
            _setComboText(self.ui.deviceComboBox, p.GetParameter("Device") or "auto")
            if p.GetParameter("Model"):
                _setComboText(self.ui.modelComboBox, p.GetParameter("Model"))
            if p.GetParameter("Smoothing"):
                self.ui.smoothingSlider.value = float(p.GetParameter("Smoothing"))
            _setComboText(self.ui.exportFormatComboBox, p.GetParameter("ExportFormat") or "STL")
            if p.GetParameter("ExportDirectory"):
                self.ui.exportDirectoryButton.directory = p.GetParameter("ExportDirectory")
        finally:
            self._updatingGUIFromParameterNode = False
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        p = self._parameterNode
        p.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
        p.SetNodeReferenceID("OutputSegmentation", self.ui.outputSegmentationSelector.currentNodeID)
        p.SetParameter("Device", self.ui.deviceComboBox.currentText)
        p.SetParameter("Model", self.ui.modelComboBox.currentText)
        p.SetParameter("Smoothing", str(self.ui.smoothingSlider.value))
        p.SetParameter("ExportFormat", self.ui.exportFormatComboBox.currentText)
        p.SetParameter("ExportDirectory", self.ui.exportDirectoryButton.directory)
        p.EndModify(wasModified)
        self.updateButtons()

    def updateButtons(self):
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        hasSegmentation = self.ui.outputSegmentationSelector.currentNode() is not None
        self.ui.applyButton.enabled = hasInput and not self._running
        self.ui.applyButton.toolTip = ("Segment the teeth of the input volume." if hasInput
                                       else "Select an input volume first.")
        self.ui.cancelButton.enabled = self._running
        self.ui.surfacesButton.enabled = hasSegmentation and not self._running
        self.ui.exportButton.enabled = (hasSegmentation and not self._running
                                        and bool(self.ui.exportDirectoryButton.directory))

    def fillModelComboBox(self, select=None):
        """Model versions of the "teeth" task; the first entry is the store's default version. Selected: ``select``,
        else the version chosen in the scene ("Use this version"), else the default."""
        combo = self.ui.modelComboBox
        current = combo.currentText if combo.count else None
        try:
            versions = self.logic.model_versions()
            active = self.trainingLogic.active_version() if self.trainingLogic is not None else None
        except Exception as e:  # a broken store must not break the module panel
            logging.warning(f"Segment Teeth: cannot list the model versions: {e}")
            versions, active = [], None
        self._fillingModelComboBox = True
        try:
            combo.clear()
            combo.enabled = bool(versions)
            for version in versions:
                combo.addItem(version)
            _setComboText(combo, select or active or current or "")
            if not versions:
                combo.addItem("(no model installed)")
                combo.enabled = False
                self.ui.statusLabel.text = ("No teeth model is installed. Import one with "
                                            "'deepsegrecon models import' (see the README).")
        finally:
            self._fillingModelComboBox = False
        self.updateParameterNodeFromGUI()

    def caseInputs(self):
        """What "Add to training set" saves: the input volume and the (corrected) output segmentation."""
        return {"image": self.ui.inputVolumeSelector.currentNode()}, self.ui.outputSegmentationSelector.currentNode()

    def onModelChange(self, activeVersion):
        """A fine-tune added a version, or "Use this version" chose one: list them, select the one in use."""
        self.fillModelComboBox(select=activeVersion)

    def onModelComboBoxChanged(self, index=None):
        """The model chosen here is the one in use in this scene (the "Improve the model" section shows it)."""
        self.updateParameterNodeFromGUI()
        combo = self.ui.modelComboBox
        if self._fillingModelComboBox or self.trainingLogic is None or not combo.enabled or not combo.currentText:
            return
        try:
            if combo.currentText != self.trainingLogic.active_version():
                self.trainingLogic.set_active_version(combo.currentText)
        except Exception as e:
            logging.warning(f"Segment Teeth: cannot choose the model version {combo.currentText}: {e}")
        if self.finetuneSection is not None:
            self.finetuneSection.refresh()

    # ----------------------------------------------------------------------------------------- buttons
    def onApplyButton(self):
        if self._running:
            return
        if missingPackages() and not self.offerPackageInstall():
            return
        params = self.modelParams()
        with slicer.util.tryWithErrorDisplay("Segment Teeth could not start.", waitCursor=True):
            self.logic.start({"image": self.ui.inputVolumeSelector.currentNode()}, params,
                             output_node=self.ui.outputSegmentationSelector.currentNode())
            self.startedRun("Starting the segmentation worker...")

    def onCancelButton(self):
        self.logic.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    def onSurfacesButton(self):
        with slicer.util.tryWithErrorDisplay("Could not build the 3D surfaces.", waitCursor=True):
            self.logic.create_surfaces(self.ui.outputSegmentationSelector.currentNode(),
                                       self.ui.smoothingSlider.value)
            self.ui.statusLabel.text = "3D surfaces shown (smoothing %.2f)." % self.ui.smoothingSlider.value

    def onExportButton(self):
        folder = self.ui.exportDirectoryButton.directory
        fmt = self.ui.exportFormatComboBox.currentText.lower()
        with slicer.util.tryWithErrorDisplay("Could not export the surfaces.", waitCursor=True):
            files = self.logic.export_surfaces(self.ui.outputSegmentationSelector.currentNode(), folder, fmt)
            count = len(files) if files is not None else 0
            self.ui.statusLabel.text = f"Exported {count} {fmt.upper()} file{'s' if count != 1 else ''} to {folder}."

    # ------------------------------------------------------------------------------------------ polling
    def onPollTimer(self):
        with self.pollErrors():
            self.showRunStatus(self.logic.poll())

    def runStatusText(self, status):
        stage = status.get("stage") or ""
        message = status.get("message") or ""
        return f"{stage}: {message}" if stage and message else stage or message or "Running..."

    def onRunSucceeded(self):
        segNode = self.showOutputSegmentation()
        if segNode is not None:
            self.ui.statusLabel.text = f"Done: {describeSegmentation(segNode, self.logic.result)}"

    # -------------------------------------------------------------------------------- package install
    def offerPackageInstall(self):
        """Ask, then pip-install the missing packages into Slicer's Python; True when all are importable."""
        missing = missingPackages()
        if not missing:
            return True
        text = (f"Segment Teeth needs these Python packages, which are not installed in Slicer: {', '.join(missing)}."
                "\n\nInstall them now? This downloads several hundred MB "
                f"{'(PyTorch ' + TORCH_VERSION + ', CPU build) ' if 'torch' in missing else ''}"
                "and can take several minutes, during which Slicer does not respond."
                "\n\nFor NVIDIA GPUs, install PyTorch with the PyTorch extension (PyTorchUtils) instead, then retry.")
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="Segment Teeth: install packages"):
            self.ui.statusLabel.text = f"Cannot segment without: {', '.join(missing)}."
            return False
        self.ui.statusLabel.text = f"Installing {', '.join(missing)} (several minutes)..."
        slicer.app.processEvents()
        with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
            SegmentTeethLogic.installPackages(missing)
        still = missingPackages()
        self.ui.statusLabel.text = (f"Still missing: {', '.join(still)}." if still
                                    else "Packages installed. Click Segment Teeth to start.")
        return not still


# ------------------------------------------------------------------------------------------- the logic
class SegmentTeethLogic(SceneSegmentTeethLogic, ScriptedLoadableModuleLogic):
    """The engine's headless scene logic, run by Slicer's Python, with Slicer's module-logic base.

    From ``deepsegrecon.scene.logic.SegmentTeethLogic``: ``start(inputs, params, output_node)``, ``poll()``,
    ``cancel()``, ``wait()``, ``run()``, ``output_nodes``, ``result``, ``create_surfaces(seg_node, smoothing)``,
    ``create_models(seg_node)``, ``export_surfaces(seg_node, folder, fmt)``. The scene logic comes first in the
    bases: ``ScriptedLoadableModuleLogic.__init__`` calls ``super().__init__()`` without arguments.
    """

    def __init__(self, scene=None, python=None, job_root=None):
        SceneSegmentTeethLogic.__init__(self, scene if scene is not None else slicer.mrmlScene,
                                        python=python or pythonSlicerExecutable(),
                                        job_root=job_root if job_root is not None else defaultJobRoot())
        ScriptedLoadableModuleLogic.__init__(self)

    def createTrainingLogic(self, training_root=None):
        """The "Improve the model" logic for the teeth model: training set, fine-tuning jobs, model versions."""
        return newTrainingLogic(self, training_root)

    def model_versions(self):
        """Installed versions of the teeth model, the default one first."""
        base = getattr(super(), "model_versions", None)
        if base is not None:
            return list(base())
        from deepsegrecon.store import ModelStore

        store = ModelStore()
        entries = store.list(self.task_name)
        if not entries:
            return []
        default = store.get(self.task_name).version
        return [default] + [e.version for e in entries if e.version != default]

    @staticmethod
    def installPackages(importNames):
        """pip-install the packages behind ``importNames`` into Slicer's Python, keeping Slicer's numpy."""
        import numpy

        constraints = os.path.join(tempfile.mkdtemp(prefix="deepsegrecon-pip-"), "constraints.txt")
        with open(constraints, "w") as f:
            f.write(f"numpy=={numpy.__version__}\n")  # never replace the numpy Slicer is built against
        try:
            if "torch" in importNames:
                slicer.util.pip_install(torchRequirement() + ["-c", constraints])
            rest = [PIP_REQUIREMENTS[n] for n in importNames if n in PIP_REQUIREMENTS]
            if rest:
                slicer.util.pip_install(rest + ["-c", constraints])
        finally:
            shutil.rmtree(os.path.dirname(constraints), ignore_errors=True)
        importlib.invalidate_caches()


# --------------------------------------------------------------------------------------------- helpers
def _setComboText(combo, text):
    index = combo.findText(text)
    if index >= 0:
        combo.currentIndex = index


def describeSegmentation(segNode, result=None):
    names = [segNode.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segNode.GetSegmentation().GetNumberOfSegments())]
    teeth = [n for n in names if n.startswith("tooth_")]
    text = f"{len(teeth)} {'tooth' if len(teeth) == 1 else 'teeth'}" + (", maxilla" if "maxilla" in names else "") + (
        ", mandible" if "mandible" in names else "")
    absent = [a for a in (getattr(result, "absent", None) or []) if str(a).startswith("tooth_")]
    if absent:
        text += "; absent: " + " ".join(str(a).replace("tooth_", "") for a in absent)
    return text + "."


# ---------------------------------------------------------------------------------------------- tests
class SegmentTeethTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: phantom -> volume node -> worker -> segmentation node -> surfaces -> STL files."""

    def setUp(self):
        skipIfMissing("SegmentTeeth", "Segment Teeth")  # CTest: skipped, with the reason
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = skipReason("SegmentTeeth", "Segment Teeth")
        if reason:  # "Reload and Test": say why instead of failing
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_SegmentTeeth_phantom()
        self.setUp()
        self.test_SegmentTeeth_cancel()
        self.setUp()
        self.test_SegmentTeeth_training_set()

    def _phantomVolume(self, seed=11):
        from deepsegrecon.scene.volumes import image_to_volume_node
        from deepsegrecon.teeth.phantom import generate_teeth_phantom

        cbct, labels, info = generate_teeth_phantom(seed, shape=(128, 112, 80))
        volume = image_to_volume_node(slicer.mrmlScene, cbct, "TeethPhantom")
        return volume, labels

    def test_SegmentTeeth_phantom(self):
        import numpy

        self.delayDisplay("Generating a small teeth phantom")
        volume, labels = self._phantomVolume()

        logic = SegmentTeethLogic()
        self.assertTrue(os.path.isfile(logic.python), logic.python)
        self.delayDisplay("Segmenting (worker process)")
        progress = []
        logic.start({"image": volume}, {"device": "cpu"})
        status = logic.wait(timeout=900, on_progress=progress.append)
        self.assertEqual(status["state"], "succeeded", status.get("error"))
        self.assertTrue(progress and all(0.0 <= p["fraction"] <= 1.0 for p in progress))

        segNodes = [n for n in logic.output_nodes if n.IsA("vtkMRMLSegmentationNode")]
        self.assertEqual(len(segNodes), 1)
        segNode = segNodes[0]
        segmentation = segNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ids, "segment IDs equal segment names")
        teeth = [n for n in names if n.startswith("tooth_")]
        self.assertTrue(set(names) <= {f"tooth_{q}{p}" for q in (1, 2, 3, 4) for p in range(1, 9)}
                        | {"maxilla", "mandible"}, names)
        self.assertGreaterEqual(len(teeth), 8, f"too few teeth found: {names}")
        self.assertEqual(len(names), len(set(names)))

        # most of the phantom's teeth are found, and no tooth is invented where the phantom has none
        trueTeeth = {f"tooth_{v}" for v in numpy.unique(labels.array) if v >= 11}
        self.assertGreaterEqual(len(set(teeth) & trueTeeth), 0.75 * len(trueTeeth), (sorted(teeth), sorted(trueTeeth)))
        self.assertLessEqual(len(set(teeth) - trueTeeth), 2, (sorted(teeth), sorted(trueTeeth)))

        self.delayDisplay("Surfaces")
        surfaces = logic.create_surfaces(segNode, 0.5)
        self.assertEqual(sorted(surfaces), sorted(names))
        for name, poly in surfaces.items():
            self.assertIsNotNone(poly, name)
            self.assertGreater(poly.GetNumberOfPoints(), 0, name)

        folder = tempfile.mkdtemp(prefix="SegmentTeethTest-")
        try:
            files = logic.export_surfaces(segNode, folder, "stl")
            self.assertEqual(len(files), len(ids))
            for path in files:
                self.assertTrue(os.path.getsize(path) > 0, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Segment Teeth test passed")

    def test_SegmentTeeth_cancel(self):
        volume, _ = self._phantomVolume(seed=12)
        before = slicer.mrmlScene.GetNumberOfNodes()
        logic = SegmentTeethLogic()
        logic.start({"image": volume}, {"device": "cpu"})
        logic.cancel()
        self.assertEqual(logic.poll()["state"], "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before, "a cancelled run leaves the scene as it was")
        self.delayDisplay("Segment Teeth cancel test passed")

    def test_SegmentTeeth_training_set(self):
        """Improve the model: a corrected segmentation becomes a training case (in a temporary training folder)."""
        import numpy

        from deepsegrecon.scene.segmentations import result_to_segmentation_node
        from deepsegrecon.task import SegmentationResult
        from deepsegrecon.teeth import labels as L
        from deepsegrecon.training.cases import load_case

        volume, labels = self._phantomVolume(seed=13)
        present = [int(v) for v in numpy.unique(labels.array) if v]
        segNode = result_to_segmentation_node(slicer.mrmlScene, SegmentationResult(labels, L.segment_infos(present)),
                                              reference_volume_node=volume, name="Corrected teeth")
        folder = tempfile.mkdtemp(prefix="SegmentTeethTrainingSet-")
        try:
            training = SegmentTeethLogic().createTrainingLogic(training_root=os.path.join(folder, "teeth"))
            nodes = slicer.mrmlScene.GetNumberOfNodes()
            case = training.add_to_training_set({"image": volume}, segNode)
            self.assertEqual(training.case_count(), 1)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes, "adding a case adds no node")
            data = load_case(case).load()
            numpy.testing.assert_array_equal(data.label.array, labels.array)
            self.assertEqual(training.active_version(), SegmentTeethLogic().model_versions()[0])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Segment Teeth training-set test passed")
