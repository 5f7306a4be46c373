"""The module skeleton shared by the five DeepSegRecon panels: resources, the worker interpreter, and
:class:`TaskWidgetMixin` (parameter node, job controller, model list, weights import, "Improve the model").

Qt wiring only: the work is done by the module's logic (the engine's headless scene logic), and each button's slot
makes one logic call, the one the tests make. A module widget derives from ``TaskWidgetMixin`` first and sets
``taskTitle``, ``startButtonText`` and ``parameterWidgets`` ({parameter of its parameter node: ``self.ui`` widget
name}); its ``setup()`` loads its .ui, makes ``self.logic`` (and ``self.trainingLogic`` for a segmentation module
with an "Improve the model" section), connects its buttons and calls ``self.setUpPanel()``. Its start button's slot
is::

    def onApplyButton(self):
        if self.busy or not self.ensureDependencies():  # the module's Python packages, installed after asking
            return
        with slicer.util.tryWithErrorDisplay("... could not start.", waitCursor=True):
            self.logic.start(...)
            self.startedRun("Starting the ... worker...")

and ``onRunSucceeded(status)`` shows the result. ``self.jobs`` (``DeepSegReconCommon.Jobs``, one QTimer)
polls the run and the section's fine-tuning job, shows progress, ETA and errors, and cancels them when the scene
closes or the panel goes away.
"""

import contextlib
import logging
import os
import shutil
import sys
import tempfile

import qt
import slicer

from DeepSegReconCommon import Dependencies
from DeepSegReconCommon.Jobs import FINAL_STATES, POLL_INTERVAL_MS, JobController, formatEta  # noqa: F401
from DeepSegReconCommon.Parameters import WidgetBinding

RUN = "run"  # the module's own job in the job controller (the fine-tune section's is "finetune")
_HERE = os.path.dirname(os.path.abspath(__file__))


def findResource(relativePath):
    """Absolute path of a shared resource (e.g. "UI/SegmentTeeth.ui"): <qt-scripted-modules>/Resources (installed
    extension) or <repo>/Resources (source tree); None if there is none."""
    for folder in (os.path.join(os.path.dirname(_HERE), "Resources"),
                   os.path.join(os.path.dirname(os.path.dirname(_HERE)), "Resources")):
        path = os.path.join(folder, relativePath)
        if os.path.exists(path):
            return path
    return None


def loadSectionUI(name, parentLayout):
    """A panel section's .ui (``Resources/UI/<name>``) loaded and added to ``parentLayout``: (widget, its child
    widgets by object name)."""
    path = findResource(f"UI/{name}")
    if path is None:
        raise RuntimeError(f"{name} was not found; reinstall the DeepSegRecon extension")
    widget = slicer.util.loadUI(path)
    parentLayout.addWidget(widget)
    return widget, slicer.util.childWidgetVariables(widget)


def setModuleIcon(parent, relativePath):
    """Source-tree use (module path added without building): the icon lives in the top-level Resources."""
    if parent.icon.isNull():
        icon = findResource(relativePath)
        if icon:
            parent.icon = qt.QIcon(icon)


def useBuiltinModels():
    """Point the engine at the extension's built-in model store (inherited by the worker process too)."""
    models = findResource("Models")
    if models and "DEEPSEGRECON_BUILTIN_MODELS" not in os.environ:
        os.environ["DEEPSEGRECON_BUILTIN_MODELS"] = models


def pythonSlicerExecutable(fallback=None):
    """The ``PythonSlicer`` interpreter next to the Slicer launcher: Slicer's Python, with its packages.
    None found: ``fallback`` if given, else RuntimeError."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidates = [shutil.which("PythonSlicer")]
    with contextlib.suppress(AttributeError):
        candidates.append(os.path.join(slicer.app.slicerHome, "bin", name))
    candidates.append(os.path.join(os.path.dirname(sys.executable), name))
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    if fallback is not None:
        return fallback
    raise RuntimeError(f"{name} was not found next to the Slicer application ({candidates}); "
                       "the worker process needs it")


def defaultJobRoot():
    """Where the worker jobs of a module logic go: Slicer's temporary folder."""
    return os.path.join(slicer.app.temporaryPath or tempfile.gettempdir(), "DeepSegRecon", "jobs")


def sceneLogicArguments(scene=None, python=None, job_root=None, fallbackPython=None):
    """(scene, python, job_root) of a module's scene logic: Slicer's scene, ``PythonSlicer`` and Slicer's
    temporary folder unless given."""
    return (scene if scene is not None else slicer.mrmlScene,
            python or pythonSlicerExecutable(fallback=fallbackPython),
            job_root if job_root is not None else defaultJobRoot())


def newTrainingLogic(logic, training_root=None):
    """The "Improve the model" logic (training set, fine-tuning, model versions) of a segmentation logic's model."""
    from deepsegrecon.scene.training import TrainingLogic

    return TrainingLogic(logic.scene, logic.model_task, training_root=training_root, python=logic.python,
                         job_root=logic.job_root, plugins=logic.plugins, env=logic.env)


def _errorDisplay(text, title):
    slicer.util.errorDisplay(text, windowTitle=title)


class TaskWidgetMixin:
    """A module panel that runs one worker job at a time, keeps its values in a parameter node, lists and imports
    model weights, and (segmentation modules) has the "Improve the model" section."""

    taskTitle = ""  # e.g. "Segment Teeth": in logs and dialogs
    startButtonText = ""  # the start button, named in the "packages needed" hint
    parameterWidgets = {}  # {parameter name: self.ui widget name}
    autoModelText = None  # a first model-list entry that sends no version (the worker chooses)
    batchTask = None  # the task of the "Batch" section (none: no section)
    logic = None
    trainingLogic = None
    finetuneSection = None
    batchSection = None
    importSection = None
    jobs = None
    binding = None
    _timer = None
    _fillingModels = False

    # ------------------------------------------------------------------------------------------ set-up
    def setUpPanel(self):
        """After the module's ``self.ui`` and ``self.logic`` exist: job controller, parameter node, model list,
        "Improve the model" (with ``self.trainingLogic``), "Batch" (with ``batchTask``), "Model weights", scene
        observers."""
        from DeepSegReconCommon.BatchSection import BatchSection
        from DeepSegReconCommon.FinetuneSection import FinetuneSection
        from DeepSegReconCommon.ModelImportSection import ModelImportSection

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self.jobs = JobController(self._timer, _errorDisplay)
        self._timer.connect("timeout()", self.jobs.tick)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.binding = WidgetBinding({name: getattr(self.ui, widget) for name, widget in self.parameterWidgets.items()},
                                     onChange=self.updateButtons)
        if hasattr(self.ui, "modelComboBox"):
            self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
            self.fillModelComboBox()
        if self.trainingLogic is not None:
            self.finetuneSection = FinetuneSection(self.trainingLogic, self.jobs, caseInputs=self.caseInputs,
                                                   device=self.currentDevice, onModelChange=self.fillModelComboBox,
                                                   moduleName=self.moduleName)
            self.finetuneSection.setup(self.ui.finetuneSectionPlaceholder.layout())
        if self.batchTask:
            from deepsegrecon.batch_job import BatchLogic

            batchLogic = BatchLogic(self.batchTask, python=self.logic.python, job_root=self.logic.job_root,
                                    plugins=self.logic.plugins)
            self.batchSection = BatchSection(batchLogic, self.jobs, title=self.taskTitle, params=self.modelParams,
                                             ensureReady=self.ensureDependencies)
            self.batchSection.setup(self.layout)
        self.importSection = ModelImportSection(self.logic, onImported=self.onModelImported)
        self.importSection.setup(self.layout)
        self.initializeParameterNode()
        self.showMissingPackages()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def cleanup(self):
        if self.jobs is not None:
            self.jobs.cancelAll("the module was closed")  # never leave a worker process behind
        self.setParameterNode(None)
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        self.jobs.cancelAll("the scene was closed")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.fillModelComboBox()  # the version chosen in the closed scene is gone with it
        if self.finetuneSection is not None:
            self.finetuneSection.refresh()
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        """Show the module's parameter node; an empty ``inputVolume`` gets the scene's first volume."""
        parameters = self.logic.getParameterNode()
        if "inputVolume" in self.parameterWidgets and parameters.inputVolume is None:
            parameters.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.setParameterNode(parameters)

    def setParameterNode(self, parameters):
        if self.binding is None:
            return
        self.binding.setParameters(parameters)
        if self.finetuneSection is not None:
            self.finetuneSection.setParameterNode(parameters.parameterNode if parameters is not None else None)
        self.updateButtons()

    # ------------------------------------------------------------------------------------------ state
    @property
    def busy(self):
        """A job runs or Python packages are being installed: the start buttons are disabled."""
        return self.running or Dependencies.installing()

    @property
    def running(self):
        return self.jobs is not None and self.jobs.running(RUN)

    def ensureDependencies(self):
        """True when the module's Python packages are installed, after asking and installing what is missing."""
        return Dependencies.ensureInstalled(self.moduleName, self.taskTitle, onBusyChange=self.updateButtons)

    def showMissingPackages(self):
        """Say in the status label which packages the first run will install."""
        try:
            missing = Dependencies.Plan(self.moduleName).missing
        except Exception as e:  # a missing lock file must not break the panel; the run says it again
            logging.warning(f"{self.taskTitle}: cannot tell which Python packages are needed: {e}")
            return
        if missing:
            self.ui.statusLabel.text = (f"Python packages needed, not installed yet: {', '.join(missing)}. "
                                        f"Click {self.startButtonText or self.taskTitle} to install them.")

    def panelUIPath(self, relativePath):
        """The module's .ui: beside the module (built extension), else the shared Resources (source tree)."""
        path = self.resourcePath(relativePath)
        return path if os.path.isfile(path) else findResource(relativePath)

    def confirmOverwrite(self, node):
        """True to go on: ``node`` is None (a new node) or empty, or the user agreed to replace its segments."""
        if not self.logic.needs_overwrite_confirmation(node):
            return True
        return slicer.util.confirmYesNoDisplay(
            f"The segmentation '{node.GetName()}' already has segments. Replace them with the result?\n\n"
            "To keep them, choose No and select \"Create new segmentation\" as the output.",
            windowTitle=self.taskTitle)

    # ------------------------------------------------------------------------------------------ models
    def fillModelComboBox(self, select=None):
        """The logic's model versions, the default first (after ``autoModelText``); selected: ``select``, else the
        version chosen in the scene ("Use this version"), else the one shown before."""
        if not hasattr(self.ui, "modelComboBox"):
            return
        combo = self.ui.modelComboBox
        current = combo.currentText if combo.count else None
        try:
            versions = self.logic.model_versions()
            active = self.trainingLogic.active_version() if self.trainingLogic is not None else None
        except Exception as e:  # a broken store must not break the panel
            logging.warning(f"{self.taskTitle}: cannot list the model versions: {e}")
            versions, active = [], None
        self._fillingModels = True
        try:
            combo.clear()
            for text in ([self.autoModelText] if self.autoModelText and versions else []) + list(versions):
                combo.addItem(text)
            combo.enabled = bool(versions)
            for text in (select, active, current):
                if text and combo.findText(text) >= 0:
                    combo.currentIndex = combo.findText(text)
                    break
            if not versions:
                combo.addItem("(no model installed)")
                self.ui.statusLabel.text = (f"No {self.logic.model_task} model is installed. Import one under "
                                            "\"Model weights\" below.")
        finally:
            self._fillingModels = False

    def onModelChosen(self, index=None):
        """The version chosen in the model list is the one in use in this scene (the "Improve the model" section
        shows it)."""
        combo = self.ui.modelComboBox
        version = combo.currentText
        if self._fillingModels or self.trainingLogic is None or not combo.enabled or not version:
            return
        try:
            if version != self.trainingLogic.active_version():
                self.trainingLogic.set_active_version(version)
        except Exception as e:
            logging.warning(f"{self.taskTitle}: cannot choose the model version {version}: {e}")
        if self.finetuneSection is not None:
            self.finetuneSection.refresh()

    def onModelImported(self, version):
        """The weights import installed ``version``: list it, selected."""
        self.fillModelComboBox(select=version)
        if self.finetuneSection is not None:
            self.finetuneSection.refresh()

    def currentDevice(self):
        return self.ui.deviceComboBox.currentText if hasattr(self.ui, "deviceComboBox") else "auto"

    def modelParams(self):
        """Run parameters from the panel: ``device``, and ``model`` unless none is installed or chosen."""
        params = {"device": self.currentDevice()}
        combo = getattr(self.ui, "modelComboBox", None)
        if combo is not None and combo.enabled and combo.currentText and combo.currentText != self.autoModelText:
            params["model"] = combo.currentText
        return params

    # ------------------------------------------------------------------------------------------ the run
    def startedRun(self, statusText):
        """The logic started a job: the job controller shows and polls it."""
        self.jobs.started(RUN, self.logic, self.ui, self.taskTitle, statusText, onSucceeded=self.onRunSucceeded,
                          onEnded=self.updateButtons)
        self.updateButtons()

    def onCancelButton(self):
        self.logic.cancel()  # the next timer tick shows the cancelled state
        self.ui.statusLabel.text = "Cancelling..."

    def showOutputSegmentation(self):
        """Select the run's segmentation node in ``self.ui.outputSegmentationSelector``; the node, or None."""
        segNode = next((n for n in self.logic.output_nodes if n.IsA("vtkMRMLSegmentationNode")), None)
        if segNode is not None:
            self.ui.outputSegmentationSelector.setCurrentNode(segNode)
        return segNode

    def caseInputs(self):
        """What "Add to training set" saves: the input volume and the (corrected) output segmentation."""
        return {"image": self.ui.inputVolumeSelector.currentNode()}, self.ui.outputSegmentationSelector.currentNode()

    def onRunSucceeded(self, status):
        """Show the result of a finished run (the module's output nodes); may return the status line."""

    def updateButtons(self, *args):
        """Enable the buttons that can be used now (``self.busy``: no second run)."""
