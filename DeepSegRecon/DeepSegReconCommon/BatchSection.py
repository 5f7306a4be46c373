"""The "Batch" panel section: run the module's task on every study of a folder in a background process
(``deepsegrecon batch``), with progress, ETA and Cancel.

Qt wiring only, around :class:`deepsegrecon.batch_job.BatchLogic` (``self.logic``, its task fixed by the module):
"Run batch" calls its ``start`` (``batch_job.start_batch``), "Cancel" its ``cancel``; the panel's job controller
(``DeepSegReconCommon.Jobs``, one timer for the panel) polls it. ``TaskWidgetMixin.setUpPanel()`` adds the section
to a module that sets ``batchTask``.
"""

import types

import ctk
import slicer

from DeepSegReconCommon.TaskWidget import loadSectionUI

JOB = "batch"  # the section's job in the panel's job controller
UI_NAME = "BatchSection.ui"


def describeBatch(status):
    return status.get("message") or "Running..."


class BatchSection:
    def __init__(self, logic, jobs, title="Batch", params=None, ensureReady=None):
        self.logic = logic
        self.jobs = jobs
        self.title = title
        self.params = params or dict  # run parameters from the panel (device, model)
        self.ensureReady = ensureReady or (lambda: True)  # the module's Python packages, installed after asking
        self.widget = None
        self.ui = None
        self.view = None

    def setup(self, parentLayout):
        self.widget, self.ui = loadSectionUI(UI_NAME, parentLayout)
        for edit in (self.ui.batchInputPathLineEdit, self.ui.batchOutputPathLineEdit):
            edit.filters = ctk.ctkPathLineEdit.Dirs
        self.view = types.SimpleNamespace(progressBar=self.ui.batchProgressBar, etaLabel=self.ui.batchEtaLabel,
                                          statusLabel=self.ui.batchStatusLabel)
        self.ui.batchRunButton.connect("clicked(bool)", self.onRunButton)
        self.ui.batchCancelButton.connect("clicked(bool)", self.onCancelButton)
        self.updateButtons()

    def updateButtons(self, *args):
        running = self.jobs.running(JOB)
        self.ui.batchRunButton.enabled = not running
        self.ui.batchCancelButton.enabled = running

    def onRunButton(self):
        if self.jobs.running(JOB) or not self.ensureReady():
            return
        output = self.ui.batchOutputPathLineEdit.currentPath
        with slicer.util.tryWithErrorDisplay("The batch could not start.", waitCursor=True):
            self.logic.start(self.ui.batchInputPathLineEdit.currentPath, output, self.params())
            self.jobs.started(JOB, self.logic, self.view, f"{self.title} batch", "Starting the batch...",
                              describe=describeBatch, onEnded=self.updateButtons,
                              onSucceeded=lambda status: f"Finished: {describeBatch(status)}. See {output}.",
                              cancelledText="Cancelled; the finished cases are kept, a rerun resumes.")
        self.updateButtons()

    def onCancelButton(self):
        self.logic.cancel()  # the next timer tick shows the cancelled state
        self.ui.batchStatusLabel.text = "Cancelling..."
