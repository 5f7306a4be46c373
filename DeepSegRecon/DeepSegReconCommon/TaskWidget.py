"""Wiring shared by the DeepSegRecon modules: resources, the worker interpreter, and the poll / cancel / progress /
ETA loop around a worker job (:class:`TaskWidgetMixin`).

Qt wiring only: the work is done by the module's logic (the engine's headless scene logic). A module widget
derives from ``TaskWidgetMixin`` first, sets ``taskTitle``, calls ``setUpPolling()`` in ``setup()`` and
``startedRun(text)`` after its logic started a job; its timer slot is::

    def onPollTimer(self):
        with self.pollErrors():
            self.showRunStatus(self.logic.poll())

and ``onRunSucceeded()`` shows the result. The widget has ``self.logic``, ``self.ui.progressBar``,
``self.ui.etaLabel``, ``self.ui.statusLabel`` and ``updateButtons()``. Its start button's slot begins with
``if self.busy or not self.ensureDependencies(): return`` (the module's Python packages, installed after asking),
and ``updateButtons()`` disables the start buttons while ``self.busy``.
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

POLL_INTERVAL_MS = 200
FINAL_STATES = ("succeeded", "failed", "cancelled")
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
    try:
        candidates.append(os.path.join(slicer.app.slicerHome, "bin", name))
    except AttributeError:
        pass
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


def newTrainingLogic(logic, training_root=None):
    """The "Improve the model" logic (training set, fine-tuning, model versions) of a segmentation logic's model."""
    from deepsegrecon.scene.training import TrainingLogic

    return TrainingLogic(logic.scene, logic.model_task, training_root=training_root, python=logic.python,
                         job_root=logic.job_root, plugins=logic.plugins, env=logic.env)


def formatEta(seconds):
    if seconds is None:
        return ""
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"about {seconds} s left"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"about {minutes} min {seconds:02d} s left"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes:02d} min left"


class TaskWidgetMixin:
    """A module panel that runs one worker job at a time: a QTimer polls it, the progress bar, ETA and status label
    follow it, and a cancelled, failed or closed run leaves the scene as it was."""

    taskTitle = ""  # e.g. "Segment Teeth": in logs and error dialogs
    logic = None
    _pollTimer = None
    _running = False

    @property
    def busy(self):
        """A job runs or Python packages are being installed: the start buttons are disabled."""
        return self._running or Dependencies.installing()

    def ensureDependencies(self):
        """True when the module's Python packages are installed, after asking and installing what is missing."""
        return Dependencies.ensureInstalled(self.moduleName, self.taskTitle, onBusyChange=self.updateButtons)

    def showMissingPackages(self, buttonText):
        """Say in the status label which packages the first run will install."""
        try:
            missing = Dependencies.Plan(self.moduleName).missing
        except Exception as e:  # a missing lock file must not break the panel; the run says it again
            logging.warning(f"{self.taskTitle}: cannot tell which Python packages are needed: {e}")
            return
        if missing:
            self.ui.statusLabel.text = (f"Python packages needed, not installed yet: {', '.join(missing)}. "
                                        f"Click {buttonText} to install them.")

    def panelUIPath(self, relativePath):
        """The module's .ui: beside the module (built extension), else the shared Resources (source tree)."""
        path = self.resourcePath(relativePath)
        return path if os.path.isfile(path) else findResource(relativePath)

    def setUpPolling(self):
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

    def cleanup(self):
        if getattr(self, "finetuneSection", None) is not None:
            self.finetuneSection.cleanup()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None and self._running:
            self.logic.cancel()  # never leave a worker process behind
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        if self._running:
            self.logic.cancel()
            self.finishRun({"state": "cancelled", "error": "the scene was closed"})
        if getattr(self, "finetuneSection", None) is not None:
            self.finetuneSection.onSceneStartClose()  # a running fine-tune stops with the scene

    def listModelVersions(self, select=None, noModelText=""):
        """Fill ``self.ui.modelComboBox`` with the logic's model versions (the default first) and select ``select``;
        with none, a disabled "(no model installed)" entry and ``noModelText`` in the status label."""
        combo = self.ui.modelComboBox
        try:
            versions = self.logic.model_versions()
        except Exception as e:  # a broken store must not break the panel
            logging.warning(f"{self.taskTitle}: cannot list the model versions: {e}")
            versions = []
        combo.clear()
        for version in versions:
            combo.addItem(version)
        combo.enabled = bool(versions)
        if select and combo.findText(select) >= 0:
            combo.currentIndex = combo.findText(select)
        if not versions:
            combo.addItem("(no model installed)")
            self.ui.statusLabel.text = noModelText

    def modelParams(self):
        """Run parameters from the panel: ``device``, and ``model`` unless no model is installed."""
        params = {"device": self.ui.deviceComboBox.currentText}
        if self.ui.modelComboBox.enabled and self.ui.modelComboBox.currentText:
            params["model"] = self.ui.modelComboBox.currentText
        return params

    # ------------------------------------------------------------------------------------------ the run
    def startedRun(self, statusText):
        """The logic started a job: show it and poll it."""
        self._running = True
        self.ui.progressBar.value = 0
        self.ui.etaLabel.text = ""
        self.ui.statusLabel.text = statusText
        self.updateButtons()
        self._pollTimer.start()

    @contextlib.contextmanager
    def pollErrors(self):
        """Around one timer tick: an error ends the run as failed (the timer must never keep firing on one)."""
        try:
            yield
        except Exception as e:
            logging.exception(f"{self.taskTitle}: polling the worker failed")
            self.finishRun({"state": "failed", "error": f"{type(e).__name__}: {e}"})

    def showRunStatus(self, status):
        """Progress, ETA and status text of a running job; the end of the run when it is over."""
        state = status.get("state")
        if state in FINAL_STATES or state == "idle":  # idle: cancelled from elsewhere (scene close, cleanup)
            self.finishRun(status if state != "idle" else {"state": "cancelled", "error": "cancelled"})
            return
        self.ui.progressBar.value = int(round(100 * float(status.get("fraction") or 0.0)))
        self.ui.etaLabel.text = self.etaText(status.get("eta_s"))
        self.ui.statusLabel.text = self.runStatusText(status)

    def runStatusText(self, status):
        return status.get("message") or status.get("stage") or "Running..."

    def etaText(self, seconds):
        return formatEta(seconds)

    def finishRun(self, status):
        self._pollTimer.stop()
        self._running = False
        self.ui.etaLabel.text = ""
        state = status.get("state")
        if state == "succeeded":
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = "Done."
            self.onRunSucceeded()
        elif state in ("cancelled", "idle"):
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled; the scene was left unchanged."
        else:
            error = status.get("error") or "unknown error"
            self.ui.statusLabel.text = f"Failed: {error}"
            slicer.util.errorDisplay(f"{self.taskTitle} failed:\n\n{error}", windowTitle=self.taskTitle)
        self.updateButtons()

    def showOutputSegmentation(self):
        """Select the run's segmentation node in ``self.ui.outputSegmentationSelector``; the node, or None."""
        segNode = next((n for n in self.logic.output_nodes if n.IsA("vtkMRMLSegmentationNode")), None)
        if segNode is not None:
            self.ui.outputSegmentationSelector.setCurrentNode(segNode)
        return segNode

    def onRunSucceeded(self):
        """Show the result of a finished run (the module's output nodes, a summary in the status label)."""
