"""The "Model weights" panel section, on every module: install a model version from a folder, a zip file or a URL
(with its sha256) into the user model store, as the command-line ``models import`` does outside Slicer.

Qt wiring only: "Import weights" calls the module logic's ``import_model`` (``deepsegrecon.scene.logic.TaskLogic``),
which the tests call too; then ``onImported(version)`` lets the module refresh its model list. A module's panel
gets the section from ``TaskWidgetMixin.setUpPanel()``.
"""

import ctk
import slicer

from DeepSegReconCommon.TaskWidget import loadSectionUI

UI_NAME = "ModelImportSection.ui"


class ModelImportSection:
    def __init__(self, logic, onImported=None):
        self.logic = logic
        self.onImported = onImported
        self.widget = None
        self.ui = None

    def setup(self, parentLayout):
        self.widget, self.ui = loadSectionUI(UI_NAME, parentLayout)
        self.widget.setMRMLScene(self.logic.scene)
        self.ui.importSourceComboBox.connect("currentIndexChanged(int)", self.showSource)
        self.ui.importButton.connect("clicked(bool)", self.onImportButton)
        self.showSource()

    def showSource(self, *args):
        """Folder: the path field browses folders; zip file: files; URL: the URL field instead."""
        kind = self.ui.importSourceComboBox.currentText
        for widget in (self.ui.importPathLabel, self.ui.importPathLineEdit):
            widget.visible = kind != "URL"
        for widget in (self.ui.importUrlLabel, self.ui.importUrlLineEdit):
            widget.visible = kind == "URL"
        entries = ctk.ctkPathLineEdit.Dirs if kind == "Folder" else ctk.ctkPathLineEdit.Files
        self.ui.importPathLineEdit.filters = entries | ctk.ctkPathLineEdit.Readable
        self.ui.importPathLineEdit.nameFilters = ([] if kind == "Folder" else
                                                  ["Model archive (*.zip *.tar.gz *.tgz)", "Weights (*.pt *.pth)",
                                                   "All files (*)"])

    def source(self):
        if self.ui.importSourceComboBox.currentText == "URL":
            return self.ui.importUrlLineEdit.text.strip()
        return self.ui.importPathLineEdit.currentPath

    def onImportButton(self):
        default = self.ui.importDefaultCheckBox.checked
        with slicer.util.tryWithErrorDisplay("Could not import the model weights; nothing was installed.",
                                             waitCursor=True):
            entry = self.logic.import_model(self.source(), sha256=self.ui.importSha256LineEdit.text.strip() or None,
                                            default=default)
            self.ui.importStatusLabel.text = (f"Imported {entry.task} {entry.version}"
                                              + (" as the default version." if default else "."))
            if self.onImported is not None:
                self.onImported(entry.version)
