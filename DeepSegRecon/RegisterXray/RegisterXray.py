"""Register X-ray: intraoperative X-ray <-> preoperative CT (DiffPose with DiffDRR).

Slicer module of the DeepSegRecon extension. Qt wiring only: every button calls one method of
:class:`RegisterXrayLogic` (the engine's headless ``deepsegrecon.scene.xray.RegisterXrayLogic`` with Slicer's
module-logic base). The work runs in a worker process (``PythonSlicer``); the panel's job controller polls it.
"""

import json
import os
import sys

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _setUpEngine():
    """Make ``import deepsegrecon`` work from the installed extension or the source tree."""
    for parent in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(parent, "deepsegrecon", "__init__.py")):
            if parent not in sys.path:
                sys.path.insert(0, parent)
            return


_setUpEngine()

try:
    from deepsegrecon.scene.xray import RegisterXrayLogic as SceneRegisterXrayLogic
    from DeepSegReconCommon.Parameters import parameterNodeWrapper
    from DeepSegReconCommon.SelfTest import skipIfMissing, skipReason
    from DeepSegReconCommon.TaskWidget import TaskWidgetMixin, sceneLogicArguments, setModuleIcon
except ImportError as _error:
    raise ImportError(f"Register X-ray cannot import its engine (the 'deepsegrecon' and 'DeepSegReconCommon' packages "
                      f"beside {MODULE_DIR}): {_error}. Reinstall the DeepSegRecon extension.") from _error


class RegisterXray(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Register X-ray"
        self.parent.categories = ["Segmentation.DeepSegRecon"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepSegRecon maintainers"]
        self.parent.helpText = """
Registers an intraoperative X-ray to the patient's preoperative CT (DiffPose: a patient-specific pose regressor
trained on digitally reconstructed radiographs of the CT, then refinement by maximising the multiscale normalised
cross-correlation between the X-ray and DRRs rendered with DiffDRR).
<ol>
<li>Choose the CT and the X-ray. Check the C-arm geometry: source-to-detector distance and pixel spacing (taken from
the DICOM tags where present; a file with pixel spacing 0 needs the value here), the view (AP/PA) and whether the
X-ray holds raw detector intensities (log-inverted) or attenuation.</li>
<li>Click <b>Register</b>. The first time for a CT, the pose regressor trains for the given minutes (0: refinement
from the start pose only); it is stored per patient and reused. <b>Cancel</b> stops the work and leaves the scene
unchanged.</li>
<li>The result is a linear transform that places the CT in the X-ray's frame (the CT is put under it) and the DRR
at that pose as a volume on the X-ray's plane, shown over the X-ray; the report gives NCC, iterations and time.</li>
</ol>
"""
        self.parent.helpText += ('<p>For more information see the <a href="https://github.com/DeepSegRecon/'
                                 'SlicerDeepSegRecon#readme">DeepSegRecon documentation</a>.</p>')
        self.parent.acknowledgementText = """
Built on 3D Slicer, PyTorch, MONAI and DiffDRR (Gopalakrishnan and Golland); the method follows DiffPose
(Gopalakrishnan, Dey and Golland, CVPR 2024).
"""
        setModuleIcon(self.parent, "Icons/RegisterXray.png")


@parameterNodeWrapper
class RegisterXrayParameterNode:
    """The panel's values, saved with the scene."""

    ctVolume: slicer.vtkMRMLScalarVolumeNode
    xrayVolume: slicer.vtkMRMLScalarVolumeNode
    sdd: float = 1020.0
    pixelSpacing: float = 0.0
    sid: float = 0.0
    view: str = "AP"
    values: str = "auto"
    boneAttenuation: float = 1.0
    trainMinutes: float = 10.0
    initialPose: str = ""


class RegisterXrayWidget(TaskWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: each button calls one logic method; the panel's job controller polls the running job."""

    taskTitle = "Register X-ray"
    startButtonText = "Register"
    # the X-ray before its geometry: choosing an X-ray fills SDD and spacing in, a saved scene's values come after
    parameterWidgets = {"ctVolume": "ctVolumeSelector", "xrayVolume": "xrayVolumeSelector", "sdd": "sddSpinBox",
                        "pixelSpacing": "pixelSpacingSpinBox", "sid": "sidSpinBox", "view": "viewComboBox",
                        "values": "valuesComboBox", "boneAttenuation": "boneAttenuationSpinBox",
                        "trainMinutes": "trainMinutesSpinBox", "initialPose": "initPosePathLineEdit"}

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._xrayNode = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.panelUIPath("UI/RegisterXray.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RegisterXrayLogic()
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.xrayVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onXrayChanged)
        self.setUpPanel()

    def onXrayChanged(self, node=None):
        """Show the spacing the X-ray node carries (the user corrects it where the file had none)."""
        if node is not None and node is not self._xrayNode:
            spacing = node.GetSpacing()
            self.ui.pixelSpacingSpinBox.value = spacing[0] if spacing[0] != 1.0 else 0.0
            sdd = node.GetAttribute("DICOM.DistanceSourceToDetector")
            if sdd:
                self.ui.sddSpinBox.value = float(sdd)
        self._xrayNode = node

    def updateButtons(self, *args):
        ready = self.ui.ctVolumeSelector.currentNode() is not None and \
            self.ui.xrayVolumeSelector.currentNode() is not None
        self.ui.registerButton.enabled = ready and not self.busy
        self.ui.cancelButton.enabled = self.running

    def parameters(self):
        params = {"sdd": self.ui.sddSpinBox.value, "pixel_spacing": [self.ui.pixelSpacingSpinBox.value] * 2,
                  "view": self.ui.viewComboBox.currentText, "values": self.ui.valuesComboBox.currentText,
                  "bone_attenuation": self.ui.boneAttenuationSpinBox.value,
                  "train_minutes": self.ui.trainMinutesSpinBox.value}
        if self.ui.sidSpinBox.value > 0:
            params["sid"] = self.ui.sidSpinBox.value
        path = self.ui.initPosePathLineEdit.currentPath
        if path:
            with open(path) as f:
                params["init_pose"] = json.load(f)
        return params

    def onRegisterButton(self):
        if self.busy or not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay("Register X-ray could not start.", waitCursor=True):
            self.logic.register(self.ui.ctVolumeSelector.currentNode(), self.ui.xrayVolumeSelector.currentNode(),
                                self.parameters())
            self.ui.reportLabel.text = ""
            self.startedRun("Starting the registration worker...")

    def onRunSucceeded(self, status):
        rep = self.logic.result.report
        self.ui.reportLabel.text = (f"NCC {rep['ncc']:.4f}, {rep['iterations']} iterations, "
                                    f"{rep['seconds']:.0f} s; regressor: {rep.get('regressor')}")
        drr = self.logic.output_nodes[1] if len(self.logic.output_nodes) > 1 else None
        slicer.util.setSliceViewerLayers(background=self.ui.xrayVolumeSelector.currentNode(), foreground=drr,
                                         foregroundOpacity=0.5, fit=True)


class RegisterXrayLogic(SceneRegisterXrayLogic, ScriptedLoadableModuleLogic):
    """The engine's headless scene logic with Slicer's module-logic base: ``register(ct, xray, params)``,
    ``poll()``, ``cancel()``, ``wait()``, ``output_nodes`` (transform, DRR volume), ``result``."""

    def __init__(self, scene=None, python=None, job_root=None):
        SceneRegisterXrayLogic.__init__(self, *sceneLogicArguments(scene, python, job_root,
                                                                   fallbackPython=sys.executable))
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return RegisterXrayParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))


class RegisterXrayTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: a DRR of a small CT at a known pose is registered back."""

    def setUp(self):
        skipIfMissing("RegisterXray", "Register X-ray")  # CTest: skipped, with the reason
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = skipReason("RegisterXray", "Register X-ray")
        if reason:  # "Reload and Test": say why instead of failing
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_RegisterXray_synthetic()

    def test_RegisterXray_synthetic(self):
        import numpy as np

        from deepsegrecon.image import Image
        from deepsegrecon.scene.volumes import image_to_volume_node
        from deepsegrecon.task import TaskContext, get_task

        k, j, i = np.meshgrid(np.arange(36), np.arange(30), np.arange(34), indexing="ij")
        a = np.where(((i - 17) / 15.0) ** 2 + ((j - 15) / 12.0) ** 2 < 1, 20.0, -1000.0).astype(np.float32)
        for z in range(4, 32, 5):
            a[z:z + 3, 17:22, 13:19] = 1000.0
        ct = Image(a, spacing=(6.0, 7.0, 6.5), origin=(-90.0, -80.0, -100.0))
        pose = {"parameterization": "euler_angles", "convention": "ZXY", "rotation": [0.05, 0.0, 0.03],
                "translation": [5.0, 855.0, -5.0]}
        drr = get_task("drr").run({"ct": ct}, {**get_task("drr").default_params(), "pose": pose, "height": 64,
                                                "width": 64, "pixel_spacing": [4.5, 4.5]}, TaskContext())
        ctNode = image_to_volume_node(slicer.mrmlScene, ct, "CT")
        xrayNode = image_to_volume_node(slicer.mrmlScene, drr.volumes["drr"], "X-ray")
        logic = RegisterXrayLogic()
        logic.register(ctNode, xrayNode, {"sdd": 1020, "pixel_spacing": [4.5, 4.5], "train_minutes": 0,
                                          "size": 64, "ct_spacing_mm": 0, "truth_pose": pose})
        status = logic.wait(timeout=600)
        self.assertEqual(status["state"], "succeeded", status.get("error"))
        self.assertTrue(logic.output_nodes[0].IsA("vtkMRMLLinearTransformNode"))
        self.assertLess(logic.result.report["mtre_mm"], 5.0)
        self.delayDisplay("Register X-ray test passed")
