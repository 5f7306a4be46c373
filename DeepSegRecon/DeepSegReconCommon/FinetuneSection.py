"""The "Improve the model" panel section, shared by every segmentation module.

Qt wiring only, around :class:`deepsegrecon.scene.training.TrainingLogic` (``self.logic``): each button calls one
logic method; the panel's job controller (``DeepSegReconCommon.Jobs``, one timer for the panel) polls the
fine-tuning job. ``TaskWidgetMixin.setUpPanel()`` adds the section to a module that has a training logic::

    self.finetuneSection = FinetuneSection(trainingLogic, self.jobs, caseInputs=self.caseInputs,
                                           device=self.currentDevice, onModelChange=self.onModelChange,
                                           moduleName=self.moduleName)
    self.finetuneSection.setup(someLayout)

``caseInputs()`` returns ``({modality: volume node}, corrected segmentation node)``: what "Add to training set"
saves. ``onModelChange(activeVersion)`` is called when the installed or the active model versions change (a
fine-tune succeeded, "Use this version" was clicked), so the module can update its own model selector.
``moduleName``: whose Python packages "Fine-tune" installs first, after asking (``DeepSegReconCommon.Dependencies``).
The section's reviewed region and time budget are kept in the module's parameter node
(:meth:`FinetuneSection.setParameterNode`).
"""

import logging
import os
import types

import qt
import slicer

from DeepSegReconCommon import Dependencies
from DeepSegReconCommon.Jobs import formatEta  # noqa: F401 (re-export)
from DeepSegReconCommon.Parameters import WidgetBinding, parameterNodeWrapper
from DeepSegReconCommon.TaskWidget import findResource

JOB = "finetune"  # the section's job in the panel's job controller
UI_NAME = "FinetuneSection.ui"


def findSectionUI(name=UI_NAME):
    """The section's .ui: <qt-scripted-modules>/Resources/UI (installed) or <repo>/Resources/UI (source tree)."""
    path = findResource(f"UI/{name}")
    if path is None or not os.path.isfile(path):
        raise RuntimeError(f"{name} was not found beside {os.path.dirname(os.path.abspath(__file__))}; "
                           "reinstall the DeepSegRecon extension")
    return path


def describeProgress(status):
    """One line about a running or finished training job, from ``TrainingLogic.poll()``."""
    parts = []
    if status.get("epoch"):
        epochs = status.get("epochs")
        part = f"{status['part']} " if status.get("part") else ""
        parts.append(f"{part}epoch {status['epoch']}" + (f"/{epochs}" if epochs else ""))
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    if status.get("val_dice") is not None:
        parts.append(f"validation Dice {status['val_dice']:.3f}")
    if status.get("best_val_dice") is not None and status.get("best_val_dice") != status.get("val_dice"):
        parts.append(f"best {status['best_val_dice']:.3f}")
    if not parts:
        return status.get("message") or status.get("stage") or "Starting the training worker..."
    return ", ".join(parts)


@parameterNodeWrapper
class FinetuneParameters:
    """The section's values, in the module's parameter node beside the module's own."""

    finetuneRegion: slicer.vtkMRMLNode
    finetuneMinutes: int = 10


class FinetuneSection:
    """Collapsible "Improve the model" section: training set, fine-tuning with progress, model versions."""

    def __init__(self, logic, jobs, caseInputs, device=None, onModelChange=None, moduleName=None):
        self.logic = logic
        self.jobs = jobs
        self.moduleName = moduleName
        self.caseInputs = caseInputs
        self.device = device or (lambda: "auto")
        self.onModelChange = onModelChange
        self.widget = None
        self.ui = None
        self.binding = None

    def setup(self, parentLayout):
        self.widget = slicer.util.loadUI(findSectionUI())
        parentLayout.addWidget(self.widget)
        self.ui = slicer.util.childWidgetVariables(self.widget)
        self.widget.setMRMLScene(self.logic.scene)
        self.view = types.SimpleNamespace(progressBar=self.ui.finetuneProgressBar, etaLabel=self.ui.finetuneEtaLabel,
                                          statusLabel=self.ui.finetuneStatusLabel)
        self.binding = WidgetBinding({"finetuneRegion": self.ui.roiSelector, "finetuneMinutes": self.ui.budgetSpinBox})

        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCaseButton)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.finetuneCancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.useVersionButton.connect("clicked(bool)", self.onUseVersionButton)
        self.ui.versionComboBox.connect("currentIndexChanged(int)", self.updateButtons)
        self.refresh()

    def setParameterNode(self, parameterNode):
        """Follow the module's parameter node (a vtkMRMLScriptedModuleNode; None: stop following)."""
        self.binding.setParameters(FinetuneParameters(parameterNode) if parameterNode is not None else None)

    # ----------------------------------------------------------------------------------------- state
    def refresh(self, selectVersion=None):
        """Case count and model versions from the logic (the training folder and the model store)."""
        try:
            count = self.logic.case_count()
        except Exception as e:  # an unreadable training folder must not break the panel
            logging.warning(f"DeepSegRecon: cannot read the training set: {e}")
            count = 0
        folder = str(self.logic.training_folder)
        self.ui.caseCountLabel.text = ("no cases yet" if count == 0 else f"{count} case{'s' if count != 1 else ''}")
        self.ui.caseCountLabel.toolTip = f"Training cases are saved in {folder}"
        try:
            versions = self.logic.model_versions()
            active = self.logic.active_version()
        except Exception as e:
            logging.warning(f"DeepSegRecon: cannot list the model versions: {e}")
            versions, active = [], None
        combo = self.ui.versionComboBox
        current = selectVersion or combo.itemData(combo.currentIndex) or active
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            for version, description in versions:
                text = version + (" (in use)" if version == active else "")
                combo.addItem(text, version)
                combo.setItemData(combo.count - 1, description or version, qt.Qt.ToolTipRole)
            for index in range(combo.count):
                if combo.itemData(index) == current:
                    combo.currentIndex = index
        finally:
            combo.blockSignals(wasBlocked)
        self._caseCount = count
        self.updateButtons()

    def updateButtons(self, *args):
        running = self.jobs.running(JOB)
        installing = Dependencies.installing()
        hasCases = getattr(self, "_caseCount", 0) > 0
        self.ui.addCaseButton.enabled = not running
        self.ui.finetuneButton.enabled = hasCases and not running and not installing
        self.ui.finetuneButton.toolTip = ("Fine-tune the model version in use on the training set." if hasCases
                                          else "Add corrected cases to the training set first.")
        self.ui.finetuneCancelButton.enabled = running
        self.ui.budgetSpinBox.enabled = not running
        self.ui.useVersionButton.enabled = self.ui.versionComboBox.count > 0

    # --------------------------------------------------------------------------------------- buttons
    def onAddCaseButton(self):
        inputs, segmentation = self.caseInputs()
        with slicer.util.tryWithErrorDisplay("Could not add the case to the training set.", waitCursor=True):
            folder = self.logic.add_to_training_set(inputs, segmentation, roi=self.ui.roiSelector.currentNode())
            self.ui.finetuneStatusLabel.text = f"Added the case {os.path.basename(str(folder))} to the training set."
        self.refresh()

    def onFinetuneButton(self):
        if self.jobs.running(JOB) or Dependencies.installing():
            return
        if self.moduleName and not Dependencies.ensureInstalled(self.moduleName, "Fine-tuning",
                                                                onBusyChange=self.updateButtons):
            return
        with slicer.util.tryWithErrorDisplay("Fine-tuning could not start.", waitCursor=True):
            version = self.logic.start_finetune(None, None, minutes=self.ui.budgetSpinBox.value, device=self.device())
            self.jobs.started(JOB, self.logic, self.view, "Fine-tuning",
                              f"Fine-tuning into the new version {version}...", describe=describeProgress,
                              onSucceeded=self.onFinetuneSucceeded, onEnded=self.refresh,
                              cancelledText="Fine-tuning cancelled; no model version was written.")
            self.showCurves()
        self.updateButtons()

    def onCancelButton(self):
        self.logic.cancel()  # the next timer tick shows the cancelled state
        self.ui.finetuneStatusLabel.text = "Cancelling..."

    def onUseVersionButton(self):
        combo = self.ui.versionComboBox
        version = combo.itemData(combo.currentIndex)
        with slicer.util.tryWithErrorDisplay("Could not choose the model version.", waitCursor=True):
            active = self.logic.set_active_version(version)
            self.ui.finetuneStatusLabel.text = f"The next segmentation uses the model version {active}."
            self._notifyModelChange(active)
        self.refresh(selectVersion=version)

    def onFinetuneSucceeded(self, status):
        """The job controller's end of a fine-tune: list the new version; the status line."""
        version, dice = status.get("version"), status.get("best_val_dice")
        self.refresh(selectVersion=version)
        self._notifyModelChange(None)
        return (f"New model version {version}" + (f" (best validation Dice {dice:.3f})" if dice is not None else "")
                + ". Choose it below and click \"Use this version\" to segment with it.")

    # --------------------------------------------------------------------------------------- helpers
    def _notifyModelChange(self, active):
        if self.onModelChange is not None:
            try:
                self.onModelChange(active)
            except Exception:
                logging.exception("DeepSegRecon: updating the module after a model change failed")

    def showCurves(self):
        """Show the loss / validation Dice chart in the layout's plot view (Slicer's Plots module)."""
        chart = getattr(self.logic, "chart_node", None)
        if chart is None:
            return
        try:
            slicer.modules.plots.logic().ShowChartInLayout(chart)
        except Exception as e:  # no Plots module or no plot view: the chart is still in the scene
            logging.info(f"DeepSegRecon: cannot show the training curves ({e})")
