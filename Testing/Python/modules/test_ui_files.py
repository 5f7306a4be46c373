"""Slicer-side files that cannot run without Slicer, checked without it.

- every ``Resources/UI/*.ui`` loads with PySide6's QUiLoader (offscreen); Slicer/CTK classes it declares in
  ``<customwidgets>`` are registered as placeholder QWidget subclasses carrying the signals and slots of the
  real classes that the .ui connects; a class that is neither Qt's nor declared fails the test;
- every ``self.ui.<name>`` used by a module exists in the module's .ui; the same for the panel sections shared by
  the modules (``DeepSegRecon/DeepSegReconCommon/<Section>.py`` with ``Resources/UI/<Section>.ui``);
- each module ``DeepSegRecon/<Module>/<Module>.py`` has the Slicer module structure (parsed with ``ast``);
- the CMake files list every module folder, script and resource that exists (and nothing that does not).
"""

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UI_DIR = ROOT / "Resources" / "UI"
ICON_DIR = ROOT / "Resources" / "Icons"
MODULES_DIR = ROOT / "DeepSegRecon"
COMMON_DIR = MODULES_DIR / "DeepSegReconCommon"
CATEGORY = "Segmentation.DeepSegRecon"  # the modules sit in the "DeepSegRecon" sub-menu of "Segmentation"

# Slicer and CTK widget classes a module .ui may use: {class: (signals, slots)} with the signatures of the real
# classes (only those a .ui may connect need listing). A declared class outside this table fails the test,
# which catches misspelt class names that Slicer would silently replace by a plain QWidget.
_MRML = ({"mrmlSceneChanged(vtkMRMLScene*)"}, {"setMRMLScene(vtkMRMLScene*)"})
_NODE_COMBO = ({"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)",
                "nodeAdded(vtkMRMLNode*)", "nodeAddedByUser(vtkMRMLNode*)", "mrmlSceneChanged(vtkMRMLScene*)"},
               {"setMRMLScene(vtkMRMLScene*)", "setCurrentNode(vtkMRMLNode*)", "setCurrentNodeID(QString)"})
_NONE = (set(), set())
SLICER_WIDGETS = {
    "qMRMLWidget": _MRML,
    "qSlicerWidget": _MRML,
    "qMRMLNodeComboBox": _NODE_COMBO,
    "qMRMLCheckableNodeComboBox": _NODE_COMBO,
    "qMRMLSegmentSelectorWidget": ({"currentNodeChanged(vtkMRMLNode*)", "currentSegmentChanged(QString)",
                                    "segmentSelectionChanged(QStringList)"},
                                   {"setMRMLScene(vtkMRMLScene*)", "setCurrentNode(vtkMRMLNode*)"}),
    "qMRMLSegmentsTableView": ({"selectionChanged(QItemSelection,QItemSelection)"},
                               {"setMRMLScene(vtkMRMLScene*)", "setSegmentationNode(vtkMRMLNode*)"}),
    "qMRMLSubjectHierarchyTreeView": ({"currentItemChanged(vtkIdType)"}, {"setMRMLScene(vtkMRMLScene*)"}),
    "qMRMLSliderWidget": ({"valueChanged(double)"}, {"setMRMLScene(vtkMRMLScene*)", "setValue(double)"}),
    "qMRMLSpinBox": ({"valueChanged(double)"}, {"setMRMLScene(vtkMRMLScene*)", "setValue(double)"}),
    "qMRMLRangeWidget": ({"valuesChanged(double,double)"}, {"setMRMLScene(vtkMRMLScene*)"}),
    "qMRMLTransformSliders": (set(), {"setMRMLScene(vtkMRMLScene*)", "setMRMLTransformNode(vtkMRMLNode*)"}),
    "qMRMLMatrixWidget": (set(), {"setMRMLScene(vtkMRMLScene*)", "setMRMLTransformNode(vtkMRMLNode*)"}),
    "qMRMLVolumeThresholdWidget": (set(), {"setMRMLScene(vtkMRMLScene*)"}),
    "qSlicerSimpleMarkupsWidget": (set(), {"setMRMLScene(vtkMRMLScene*)"}),
    "ctkCollapsibleButton": ({"contentsCollapsed(bool)"}, {"setCollapsed(bool)"}),
    "ctkCollapsibleGroupBox": ({"toggled(bool)"}, {"setCollapsed(bool)"}),
    "ctkSliderWidget": ({"valueChanged(double)", "valueIsChanging(double)"}, {"setValue(double)"}),
    "ctkRangeWidget": ({"valuesChanged(double,double)"}, {"setValues(double,double)"}),
    "ctkDoubleSpinBox": ({"valueChanged(double)"}, {"setValue(double)"}),
    "ctkDoubleRangeSlider": ({"valuesChanged(double,double)"}, {"setValues(double,double)"}),
    "ctkPathLineEdit": ({"currentPathChanged(QString)"}, {"setCurrentPath(QString)"}),
    "ctkDirectoryButton": ({"directoryChanged(QString)", "directorySelected(QString)"}, {"setDirectory(QString)"}),
    "ctkCheckBox": ({"toggled(bool)"}, {"setChecked(bool)"}),
    "ctkComboBox": ({"currentIndexChanged(int)"}, {"setCurrentIndex(int)"}),
    "ctkCheckablePushButton": ({"checkBoxToggled(bool)", "clicked(bool)"}, set()),
    "ctkMenuButton": ({"clicked(bool)"}, set()),
    "ctkColorPickerButton": ({"colorChanged(QColor)"}, {"setColor(QColor)"}),
    "ctkFittedTextBrowser": _NONE,
    "ctkExpandableWidget": _NONE,
}


# ----------------------------------------------------------------------------------------------- helpers
def module_names():
    return sorted(p.name for p in MODULES_DIR.iterdir()
                  if p.is_dir() and (p / f"{p.name}.py").is_file())


def section_names():
    """Shared panel sections: ``DeepSegReconCommon/<Section>.py`` defining class ``<Section>``."""
    if not COMMON_DIR.is_dir():
        return []
    out = []
    for py in sorted(COMMON_DIR.glob("*.py")):
        tree = ast.parse(py.read_text(encoding="utf-8"))
        if py.stem in {n.name for n in tree.body if isinstance(n, ast.ClassDef)}:
            out.append(py.stem)
    return out


def ui_files():
    return sorted(UI_DIR.glob("*.ui"))


def parse_ui(path: Path) -> dict:
    tree = ET.parse(path)
    root = tree.getroot()
    custom = {}
    for cw in root.iter("customwidget"):
        custom[cw.findtext("class")] = {"extends": cw.findtext("extends"), "header": cw.findtext("header"),
                                       "container": cw.findtext("container")}
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    layouts = {lay.get("name"): lay.get("class") for lay in root.iter("layout")}
    top = root.find("widget")
    connections = [{k: c.findtext(k) for k in ("sender", "signal", "receiver", "slot")}
                   for c in root.iter("connection")]
    return {"custom": custom, "widgets": widgets, "layouts": layouts, "top": top, "connections": connections}


@pytest.fixture(scope="module")
def qt():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6")
    from PySide6 import QtCore, QtUiTools, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    return {"app": app, "QtCore": QtCore, "QtUiTools": QtUiTools, "QtWidgets": QtWidgets}


def placeholder_class(qt, name: str, extends: str):
    """A Qt class named ``name`` deriving from ``extends``, with the real class's signals and slots."""
    QtCore, QtWidgets = qt["QtCore"], qt["QtWidgets"]
    base = getattr(QtWidgets, extends or "QWidget", QtWidgets.QWidget)
    signals, slots = SLICER_WIDGETS.get(name, _NONE)
    namespace = {}
    for sig in signals:
        sig_name, args = re.match(r"(\w+)\((.*)\)", sig).groups()
        if hasattr(base, sig_name):
            continue  # inherited from the Qt base class already
        namespace.setdefault(f"_sig_{sig_name}", []).append([a for a in args.split(",") if a])
    attrs = {}
    for key, arg_lists in namespace.items():
        sig_name = key[5:]
        # one attribute per overload (e.g. currentNodeChanged(vtkMRMLNode*) and currentNodeChanged(bool)),
        # all with the same Qt signal name
        for n, arg_types in enumerate(sorted(arg_lists)):
            attrs[sig_name if n == 0 else f"_{sig_name}_overload{n}"] = QtCore.Signal(*arg_types, name=sig_name)
    for slot in slots:
        slot_name, args = re.match(r"(\w+)\((.*)\)", slot).groups()
        if hasattr(base, slot_name):
            continue
        arg_types = [a for a in args.split(",") if a]

        def _slot(self, *a):
            pass

        attrs[slot_name] = QtCore.Slot(*arg_types, name=slot_name)(_slot)
    return type(name, (base,), attrs)


def load_ui(qt, path: Path):
    """Load ``path`` with QUiLoader; returns (root widget, Qt warnings emitted while loading)."""
    QtCore, QtUiTools = qt["QtCore"], qt["QtUiTools"]
    info = parse_ui(path)
    loader = QtUiTools.QUiLoader()
    classes = [placeholder_class(qt, name, spec["extends"]) for name, spec in info["custom"].items()]
    for cls in classes:
        loader.registerCustomWidget(cls)
    messages = []

    def handler(mode, context, message):
        if mode != QtCore.QtMsgType.QtDebugMsg:
            messages.append(message)

    previous = QtCore.qInstallMessageHandler(handler)
    try:
        f = QtCore.QFile(str(path))
        assert f.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
        widget = loader.load(f)
        f.close()
    finally:
        QtCore.qInstallMessageHandler(previous)
    error = loader.errorString()
    widget._keep_placeholder_classes = classes  # the loader needs them alive as long as the widget
    return widget, messages, error


# -------------------------------------------------------------------------------------------- .ui files
def test_there_are_ui_files_for_the_modules():
    assert ui_files(), "no Resources/UI/*.ui"
    for path in ui_files():
        assert path.stem in module_names() or path.stem in section_names(), (
            f"{path.name} belongs to no module folder DeepSegRecon/{path.stem}/ and no shared section "
            f"DeepSegRecon/DeepSegReconCommon/{path.stem}.py")


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.name)
def test_ui_uses_only_qt_or_declared_slicer_classes(qt, path):
    info = parse_ui(path)
    loader = qt["QtUiTools"].QUiLoader()
    qt_widgets = set(loader.availableWidgets())
    qt_layouts = set(loader.availableLayouts())
    assert info["top"].get("class") == "qMRMLWidget", "the root widget of a Slicer module .ui is a qMRMLWidget"
    assert info["top"].get("name") == path.stem
    for name, cls in info["widgets"].items():
        assert cls in qt_widgets or cls in info["custom"], (
            f"{path.name}: widget '{name}' has class {cls}, "
            "which is neither a Qt class nor declared in <customwidgets>")
    for name, cls in info["layouts"].items():
        assert cls in qt_layouts, f"{path.name}: layout '{name}' has unknown class {cls}"
    for cls, spec in info["custom"].items():
        assert cls in SLICER_WIDGETS, f"{path.name}: custom widget {cls} is not a known Slicer/CTK widget class"
        assert spec["extends"] in qt_widgets, f"{path.name}: {cls} extends {spec['extends']}, not a Qt class"
        assert spec["header"] == f"{cls}.h", f"{path.name}: {cls} needs <header>{cls}.h</header>"
    used = set(info["widgets"].values())
    unused = set(info["custom"]) - used
    assert not unused, f"{path.name}: declared but unused custom widgets {sorted(unused)}"


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.name)
def test_ui_loads_offscreen_and_connections_resolve(qt, path):
    info = parse_ui(path)
    widget, messages, error = load_ui(qt, path)
    assert widget is not None, f"QUiLoader could not load {path.name}: {error}"
    assert not messages, f"Qt warnings while loading {path.name}: {messages}"
    assert type(widget).__name__ == "qMRMLWidget"
    QtWidgets = qt["QtWidgets"]
    for name, cls in info["widgets"].items():
        if name == path.stem:
            continue
        child = widget.findChild(QtWidgets.QWidget, name)
        assert child is not None, f"{path.name}: widget {name} missing after loading"
        assert type(child).__name__ == cls or child.metaObject().className() == cls
    names = set(info["widgets"])
    for c in info["connections"]:
        assert c["sender"] in names and c["receiver"] in names, c
        for end, kind in (("sender", 0), ("receiver", 1)):
            cls = info["widgets"][c[end]]
            member = c["signal"] if end == "sender" else c["slot"]
            if cls in SLICER_WIDGETS:
                assert member in SLICER_WIDGETS[cls][kind] or member in SLICER_WIDGETS[cls][0], (
                    f"{path.name}: {cls} has no {'signal' if kind == 0 else 'slot'} {member}")
    widget.deleteLater()


def test_module_ui_has_the_expected_controls():
    """Segment Teeth's panel: the controls the README and the module promise."""
    info = parse_ui(UI_DIR / "SegmentTeeth.ui")
    w = info["widgets"]
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox", "outputSegmentationSelector": "qMRMLNodeComboBox",
        "modelComboBox": "QComboBox", "deviceComboBox": "QComboBox", "applyButton": "QPushButton",
        "progressBar": "QProgressBar", "etaLabel": "QLabel", "cancelButton": "QPushButton",
        "statusLabel": "QLabel", "smoothingSlider": "ctkSliderWidget", "surfacesButton": "QPushButton",
        "exportFormatComboBox": "QComboBox", "exportDirectoryButton": "ctkDirectoryButton",
        "exportButton": "QPushButton",
    }
    for name, cls in expected.items():
        assert w.get(name) == cls, (name, w.get(name))
    root = ET.parse(UI_DIR / "SegmentTeeth.ui").getroot()

    def widget(name):
        return next(x for x in root.iter("widget") if x.get("name") == name)

    def prop(name, prop_name):
        p = widget(name).find(f"property[@name='{prop_name}']")
        return None if p is None else "".join(p.itertext()).strip()

    def items(name):
        return ["".join(i.itertext()).strip() for i in widget(name).findall("item")]

    assert prop("inputVolumeSelector", "nodeTypes") == "vtkMRMLScalarVolumeNode"
    assert prop("outputSegmentationSelector", "nodeTypes") == "vtkMRMLSegmentationNode"
    for flag in ("addEnabled", "renameEnabled", "noneEnabled"):
        assert prop("outputSegmentationSelector", flag) == "true", flag
    assert items("deviceComboBox") == ["auto", "cpu", "cuda", "mps"]
    assert items("exportFormatComboBox") == ["STL", "OBJ"]
    assert float(prop("smoothingSlider", "minimum")) == 0.0 and float(prop("smoothingSlider", "maximum")) == 1.0
    assert prop("applyButton", "text") == "Segment Teeth"
    assert prop("surfacesButton", "text") == "Show 3D surfaces"
    assert "%p%" in prop("progressBar", "format")
    collapsibles = {prop(n, "text") for n, c in w.items() if c == "ctkCollapsibleButton"}
    assert "Surfaces and export" in collapsibles


# ----------------------------------------------------------------------------- module code vs its .ui
def ui_names_used(py: Path) -> set:
    return set(re.findall(r"\bself\.ui\.(\w+)", py.read_text(encoding="utf-8")))


@pytest.mark.parametrize("module", module_names())
def test_every_widget_the_module_uses_exists_in_its_ui(module):
    py = MODULES_DIR / module / f"{module}.py"
    used = ui_names_used(py)
    ui = UI_DIR / f"{module}.ui"
    if not used:
        return
    assert ui.is_file(), f"{module}.py uses self.ui but Resources/UI/{module}.ui does not exist"
    info = parse_ui(ui)
    known = set(info["widgets"]) | set(info["layouts"])
    missing = sorted(used - known)
    assert not missing, f"{module}.py uses widgets that {ui.name} does not have: {missing}"
    # the module loads its own .ui
    assert f'"UI/{module}.ui"' in py.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------- module structure (ast)
def _classes(tree) -> dict:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _base_names(cls: ast.ClassDef) -> list:
    out = []
    for b in cls.bases:
        out.append(b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", ""))
    return out


def _assigned(cls: ast.ClassDef, attr: str):
    """The value assigned to ``self.parent.<attr>`` in the class body (literal), or None."""
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if (isinstance(t, ast.Attribute) and t.attr == attr and isinstance(t.value, ast.Attribute)
                        and t.value.attr == "parent"):
                    try:
                        return ast.literal_eval(node.value)
                    except ValueError:
                        return ast.unparse(node.value)
    return None


def _method(cls: ast.ClassDef, name: str):
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


@pytest.mark.parametrize("module", module_names())
def test_module_has_the_slicer_module_structure(module):
    py = MODULES_DIR / module / f"{module}.py"
    tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
    classes = _classes(tree)
    expected = {module: "ScriptedLoadableModule", f"{module}Widget": "ScriptedLoadableModuleWidget",
                f"{module}Logic": "ScriptedLoadableModuleLogic", f"{module}Test": "ScriptedLoadableModuleTest"}
    for name, base in expected.items():
        assert name in classes, f"{py.name} lacks class {name}"
        assert base in _base_names(classes[name]), f"{name} must derive from {base}"
    assert "VTKObservationMixin" in _base_names(classes[f"{module}Widget"])

    mod = classes[module]
    assert _assigned(mod, "categories") == [CATEGORY]
    title = _assigned(mod, "title")
    assert isinstance(title, str) and title
    assert isinstance(_assigned(mod, "contributors"), list) and _assigned(mod, "contributors")
    help_text = _assigned(mod, "helpText")
    assert isinstance(help_text, str) and len(help_text) > 100
    assert isinstance(_assigned(mod, "acknowledgementText"), str)

    widget = classes[f"{module}Widget"]
    setup = _method(widget, "setup")
    assert setup is not None
    setup_src = ast.unparse(setup)
    for call in ("slicer.util.loadUI", "slicer.util.childWidgetVariables", "setMRMLScene"):
        assert call in setup_src, f"{module}Widget.setup() does not call {call}"
    test = classes[f"{module}Test"]
    assert _method(test, "runTest") is not None and _method(test, "setUp") is not None


def test_segment_teeth_help_states_the_weights_are_synthetic():
    tree = ast.parse((MODULES_DIR / "SegmentTeeth" / "SegmentTeeth.py").read_text(encoding="utf-8"))
    help_text = _assigned(_classes(tree)["SegmentTeeth"], "helpText").lower()
    assert "synthetic" in help_text and "phantom" in help_text


def _check_buttons_call_one_logic_method(py: Path, class_name: str, ui: Path) -> dict:
    """Every button of ``ui`` is connected in ``class_name.setup()`` to a slot that calls exactly one method of
    ``self.logic``; returns {button: slot}."""
    tree = ast.parse(py.read_text(encoding="utf-8"))
    widget = _classes(tree)[class_name]
    info = parse_ui(ui)
    buttons = {n for n, c in info["widgets"].items() if c in ("QPushButton", "QToolButton", "ctkCheckablePushButton",
                                                              "ctkMenuButton")}
    slots = {}
    for node in ast.walk(_method(widget, "setup")):
        # self.ui.<button>.connect("clicked(bool)", self.<slot>)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr in buttons
                and node.args and isinstance(node.args[0], ast.Constant) and "clicked" in str(node.args[0].value)):
            target = node.args[1]
            assert isinstance(target, ast.Attribute), ast.unparse(node)
            slots[node.func.value.attr] = target.attr
    assert set(slots) == buttons, f"buttons without a clicked() slot: {sorted(buttons - set(slots))}"
    for button, slot in slots.items():
        method = _method(widget, slot) or _method(_skeleton(), slot)  # e.g. onCancelButton, shared by the panels
        assert method is not None, slot
        calls = {n.func.attr for n in ast.walk(method)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Attribute) and n.func.value.attr == "logic"
                 and isinstance(n.func.value.value, ast.Name) and n.func.value.value.id == "self"}
        assert len(calls) == 1, f"{button} -> {slot}() calls logic methods {sorted(calls)}; it should call exactly one"
    return slots


def _skeleton() -> ast.ClassDef:
    """The module skeleton every panel derives from (``DeepSegReconCommon/TaskWidget.py``)."""
    return _classes(ast.parse((COMMON_DIR / "TaskWidget.py").read_text(encoding="utf-8")))["TaskWidgetMixin"]


@pytest.mark.parametrize("module", module_names())
def test_every_button_calls_exactly_one_logic_method(module):
    """A button's slot calls one method of ``self.logic`` (the one the headless tests call too)."""
    _check_buttons_call_one_logic_method(MODULES_DIR / module / f"{module}.py", f"{module}Widget",
                                         UI_DIR / f"{module}.ui")


def test_segment_teeth_buttons_call_the_scene_logic_api():
    tree = ast.parse((MODULES_DIR / "SegmentTeeth" / "SegmentTeeth.py").read_text(encoding="utf-8"))
    widget = _classes(tree)["SegmentTeethWidget"]
    expected = {"onApplyButton": "start", "onCancelButton": "cancel", "onSurfacesButton": "create_surfaces",
                "onExportButton": "export_surfaces"}
    for slot, logic_method in expected.items():
        src = ast.unparse(_method(widget, slot) or _method(_skeleton(), slot))
        assert f"self.logic.{logic_method}(" in src, (slot, logic_method)
    # the panel's job controller polls the logic the run was started with
    controller = _classes(ast.parse((COMMON_DIR / "Jobs.py").read_text(encoding="utf-8")))["JobController"]
    assert ".logic.poll()" in ast.unparse(_method(controller, "tick"))
    assert "self.jobs.started(RUN, self.logic" in ast.unparse(_method(_skeleton(), "startedRun"))
    # the scene logic provides what the widget calls
    from deepsegrecon.scene.logic import SegmentTeethLogic

    for name in ("start", "poll", "cancel", "wait", "run", "create_surfaces", "create_models", "export_surfaces"):
        assert callable(getattr(SegmentTeethLogic, name, None)), name


# ------------------------------------------------------------------------------------------- CMake lists
def _cmake(path: Path) -> str:
    """The file without comments (a '#' outside a quoted argument starts one)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        quoted = False
        for n, ch in enumerate(line):
            if ch == '"' and (n == 0 or line[n - 1] != "\\"):
                quoted = not quoted
            elif ch == "#" and not quoted:
                line = line[:n]
                break
        out.append(line)
    return "\n".join(out)


def _cmake_list(text: str, var: str) -> list:
    m = re.search(r"set\(\s*" + re.escape(var) + r"\b(.*?)\)", text, re.S)
    assert m, f"set({var} ...) not found"
    return m.group(1).split()


def test_top_level_cmake_is_a_slicer_extension():
    text = _cmake(ROOT / "CMakeLists.txt")
    for pattern in (r"cmake_minimum_required\(VERSION", r"project\(DeepSegRecon\)",
                    r"set\(EXTENSION_HOMEPAGE\s+\"\S+\"", r"set\(EXTENSION_CATEGORY\s+\"Segmentation\"\)",
                    r"set\(EXTENSION_CONTRIBUTORS\s+\"", r"set\(EXTENSION_DESCRIPTION\s+\"",
                    r"set\(EXTENSION_ICONURL\s+\"\S+\.png\"", r"set\(EXTENSION_SCREENSHOTURLS\s+\"",
                    r"set\(EXTENSION_DEPENDS\s+\"PyTorch\"\)", r"find_package\(Slicer REQUIRED\)",
                    r"include\(\$\{Slicer_USE_FILE\}\)", r"add_subdirectory\(DeepSegRecon\)",
                    r"include\(\$\{Slicer_EXTENSION_GENERATE_CONFIG\}\)", r"include\(\$\{Slicer_EXTENSION_CPACK\}\)"):
        assert re.search(pattern, text), f"top-level CMakeLists.txt lacks {pattern}"
    order = [text.index(s) for s in ("project(DeepSegRecon)", "find_package(Slicer REQUIRED)",
                                     "include(${Slicer_USE_FILE})", "add_subdirectory(DeepSegRecon)",
                                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)
    assert "Icons/DeepSegRecon.png" in text and (ICON_DIR / "DeepSegRecon.png").is_file()


def test_top_level_layout():
    for name in ("CMakeLists.txt", "DeepSegRecon", "Resources", "Testing", "README.md"):
        assert (ROOT / name).exists(), name


def test_extension_cmake_lists_every_module_and_the_engine():
    text = _cmake(MODULES_DIR / "CMakeLists.txt")
    listed = re.findall(r"add_subdirectory\((\w+)\)", text)
    assert sorted(listed) == module_names(), "DeepSegRecon/CMakeLists.txt must add every module folder, once"
    for module in listed:
        assert (MODULES_DIR / module / "CMakeLists.txt").is_file(), module
    # the engine package: every .py below deepsegrecon/ (globbed), installed beside the modules
    assert re.search(r'deepsegrecon_glob_files\(DeepSegRecon_ENGINE_SCRIPTS\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}\s+'
                     r'"deepsegrecon/\*\.py"\)', text)
    assert re.search(r'SCRIPTS\s+"\$\{DeepSegRecon_ENGINE_SCRIPTS\}"', text)
    assert "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    # shared resources: model store and data
    assert re.search(r'"Resources/Models"', text) and re.search(r'"Resources/Data"', text)


@pytest.mark.parametrize("module", module_names())
def test_module_cmake_lists_its_scripts_and_resources(module):
    folder = MODULES_DIR / module
    text = _cmake(folder / "CMakeLists.txt")
    assert re.search(r"set\(MODULE_NAME\s+" + module + r"\)", text)

    def expand(items):
        return [i.replace("${MODULE_NAME}", module) for i in items]

    scripts = expand(_cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk, "MODULE_PYTHON_SCRIPTS must list exactly the module's .py files"
    local = expand(_cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    for item in local:
        assert (folder / item).is_file(), f"{module}: listed resource {item} does not exist"
    res_dir = folder / "Resources"
    if res_dir.is_dir():
        present = sorted(str(p.relative_to(folder)) for p in res_dir.rglob("*") if p.is_file())
        assert sorted(local) == present, "MODULE_PYTHON_RESOURCES must list every file of the module's Resources/"

    shared = expand(_cmake_list(text, "MODULE_SHARED_RESOURCES"))
    for item in shared:
        assert (ROOT / "Resources" / item).is_file(), f"{module}: listed shared resource Resources/{item} is missing"
    for required in (f"UI/{module}.ui", f"Icons/{module}.png"):
        if (ROOT / "Resources" / required).is_file():
            assert required in shared, f"{module}/CMakeLists.txt must list Resources/{required}"
    assert f"Icons/{module}.png" in shared, f"module {module} has no icon Resources/Icons/{module}.png"

    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    for word in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}",
                 "WITH_GENERIC_TESTS"):
        assert word in " ".join(build.split()), f"slicerMacroBuildScriptedModule lacks {word}"
    assert re.search(r"deepsegrecon_copy_files\(\s*\S+\s+\$\{DeepSegRecon_RESOURCES_SOURCE_DIR\}\s+\"Resources\"\s+"
                     r"\$\{MODULE_SHARED_RESOURCES\}\)", text)
    testing = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", text, re.S)
    assert testing and re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", testing.group(1))


def test_every_icon_and_ui_is_installed_by_some_module():
    listed = set()
    for module in module_names():
        text = _cmake(MODULES_DIR / module / "CMakeLists.txt")
        listed |= {i.replace("${MODULE_NAME}", module) for i in _cmake_list(text, "MODULE_SHARED_RESOURCES")}
    shared = _cmake_list(_cmake(MODULES_DIR / "CMakeLists.txt"), "DeepSegRecon_COMMON_UI")
    for path in ui_files():
        if path.stem in section_names():
            assert f"UI/{path.name}" in shared, f"DeepSegRecon/CMakeLists.txt must list Resources/UI/{path.name}"
            assert f"UI/{path.name}" not in listed, f"the shared {path.name} is installed once, not by a module"
        else:
            assert f"UI/{path.name}" in listed, f"Resources/UI/{path.name} is not installed by any module"
    for item in shared:
        assert (ROOT / "Resources" / item).is_file(), f"DeepSegRecon_COMMON_UI lists a missing Resources/{item}"
    for path in ICON_DIR.glob("*.png"):
        if path.stem == "DeepSegRecon":
            assert "Icons/DeepSegRecon.png" in _cmake(MODULES_DIR / "CMakeLists.txt")
        else:
            assert f"Icons/{path.name}" in listed, f"Resources/Icons/{path.name} is not installed by any module"


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for name in ("DeepSegRecon.png", "SegmentTeeth.png"):
        with Image.open(ICON_DIR / name) as im:
            assert im.format == "PNG" and im.size == (128, 128), name
            assert im.mode in ("RGBA", "LA", "P"), f"{name} should have a transparent background"


# ------------------------------------------------------------------------------ shared panel sections
@pytest.mark.parametrize("section", section_names())
def test_every_widget_a_section_uses_exists_in_its_ui(section):
    py = COMMON_DIR / f"{section}.py"
    ui = UI_DIR / f"{section}.ui"
    assert ui.is_file(), f"the shared section {section}.py has no Resources/UI/{section}.ui"
    info = parse_ui(ui)
    missing = sorted(ui_names_used(py) - set(info["widgets"]) - set(info["layouts"]))
    assert not missing, f"{section}.py uses widgets that {ui.name} does not have: {missing}"
    assert f'"{section}.ui"' in py.read_text(encoding="utf-8")


@pytest.mark.parametrize("section", section_names())
def test_every_section_button_calls_exactly_one_logic_method(section):
    _check_buttons_call_one_logic_method(COMMON_DIR / f"{section}.py", section, UI_DIR / f"{section}.ui")


def test_shared_helpers_import_no_engine_internals_and_the_engine_imports_no_qt():
    """The Qt side lives in module folders and DeepSegReconCommon; the engine (incl. its scene adapter) has none."""
    qt_modules = {"qt", "ctk", "PythonQt", "PySide2", "PySide6", "PyQt5", "PyQt6", "slicer.util",
                  "slicer.ScriptedLoadableModule"}
    for py in (MODULES_DIR / "deepsegrecon").rglob("*.py"):
        tree = ast.parse(py.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name not in qt_modules and name.split(".")[0] not in {"qt", "ctk", "PySide6", "PyQt5"}, (
                    f"{py.relative_to(ROOT)} imports {name}: the engine must not use Qt")


def test_finetune_section_ui_has_the_expected_controls():
    info = parse_ui(UI_DIR / "FinetuneSection.ui")
    w = info["widgets"]
    expected = {
        "finetuneCollapsibleButton": "ctkCollapsibleButton", "caseCountLabel": "QLabel",
        "roiSelector": "qMRMLNodeComboBox", "addCaseButton": "QPushButton", "budgetSpinBox": "QSpinBox",
        "finetuneButton": "QPushButton", "finetuneProgressBar": "QProgressBar", "finetuneEtaLabel": "QLabel",
        "finetuneCancelButton": "QPushButton", "finetuneStatusLabel": "QLabel", "versionComboBox": "QComboBox",
        "useVersionButton": "QPushButton",
    }
    for name, cls in expected.items():
        assert w.get(name) == cls, (name, w.get(name))
    root = ET.parse(UI_DIR / "FinetuneSection.ui").getroot()

    def prop(name, prop_name):
        widget = next(x for x in root.iter("widget") if x.get("name") == name)
        p = widget.find(f"property[@name='{prop_name}']")
        return None if p is None else " ".join(t.strip() for t in p.itertext() if t.strip())

    assert prop("finetuneCollapsibleButton", "text") == "Improve the model"
    assert prop("finetuneCollapsibleButton", "collapsed") == "true"
    assert prop("roiSelector", "nodeTypes").split() == ["vtkMRMLMarkupsROINode", "vtkMRMLLabelMapVolumeNode",
                                                        "vtkMRMLSegmentationNode"]
    assert prop("roiSelector", "noneEnabled") == "true"
    assert prop("addCaseButton", "text") == "Add to training set"
    assert prop("finetuneButton", "text") == "Fine-tune" and prop("useVersionButton", "text") == "Use this version"
    assert prop("budgetSpinBox", "suffix") == "min" and int(prop("budgetSpinBox", "minimum")) >= 1
    assert "%p%" in prop("finetuneProgressBar", "format")
    # the node selector gets the scene from the section's root widget
    assert {"sender": "FinetuneSection", "signal": "mrmlSceneChanged(vtkMRMLScene*)", "receiver": "roiSelector",
            "slot": "setMRMLScene(vtkMRMLScene*)"} in info["connections"]


def test_finetune_section_buttons_call_the_training_logic_api():
    slots = _check_buttons_call_one_logic_method(COMMON_DIR / "FinetuneSection.py", "FinetuneSection",
                                                 UI_DIR / "FinetuneSection.ui")
    assert slots == {"addCaseButton": "onAddCaseButton", "finetuneButton": "onFinetuneButton",
                     "finetuneCancelButton": "onCancelButton", "useVersionButton": "onUseVersionButton"}
    tree = ast.parse((COMMON_DIR / "FinetuneSection.py").read_text(encoding="utf-8"))
    section = _classes(tree)["FinetuneSection"]
    expected = {"onAddCaseButton": "add_to_training_set", "onFinetuneButton": "start_finetune",
                "onCancelButton": "cancel", "onUseVersionButton": "set_active_version"}
    for slot, logic_method in expected.items():
        assert f"self.logic.{logic_method}(" in ast.unparse(_method(section, slot)), (slot, logic_method)
    setup = ast.unparse(_method(section, "setup"))
    for call in ("slicer.util.loadUI", "slicer.util.childWidgetVariables", "setMRMLScene"):
        assert call in setup, f"FinetuneSection.setup() does not call {call}"
    # no timer of its own: the panel's job controller polls the fine-tuning job
    assert "self.jobs.started(JOB, self.logic" in ast.unparse(_method(section, "onFinetuneButton"))
    from deepsegrecon.scene.training import TrainingLogic

    for name in ("add_to_training_set", "start_finetune", "poll", "cancel", "wait", "model_versions",
                 "set_active_version", "active_version", "case_count"):
        assert callable(getattr(TrainingLogic, name, None)), name


def test_segmentation_panels_have_the_finetune_section():
    info = parse_ui(UI_DIR / "SegmentTeeth.ui")
    assert info["widgets"].get("finetuneSectionPlaceholder") == "QWidget"
    # the skeleton adds the section to a panel that has a training logic, and stops its job with the panel's
    skeleton = _skeleton()
    set_up = ast.unparse(_method(skeleton, "setUpPanel"))
    assert "FinetuneSection(self.trainingLogic, self.jobs" in set_up and "moduleName=self.moduleName" in set_up
    assert "self.finetuneSection.setup(self.ui.finetuneSectionPlaceholder.layout())" in set_up
    for name in ("cleanup", "onSceneStartClose"):
        assert "self.jobs.cancelAll(" in ast.unparse(_method(skeleton, name)), name
    for module in ("SegmentTeeth", "SegmentBrainTumor", "SegmentSlices"):
        classes = _classes(ast.parse((MODULES_DIR / module / f"{module}.py").read_text(encoding="utf-8")))
        assert "self.trainingLogic = self.logic.createTrainingLogic()" in ast.unparse(
            _method(classes[f"{module}Widget"], "setup")), module
        assert _method(classes[f"{module}Logic"], "createTrainingLogic") is not None, module
        assert info["widgets"].get("finetuneSectionPlaceholder") == "QWidget"


@pytest.mark.parametrize("module", module_names())
def test_every_panel_uses_the_module_skeleton(module):
    """The panel derives from the skeleton and sets it up (one job controller with one timer, the parameter node,
    the weights import section); it has no poll loop or timer of its own and does not override the skeleton's
    cleanup."""
    text = (MODULES_DIR / module / f"{module}.py").read_text(encoding="utf-8")
    classes = _classes(ast.parse(text))
    widget = classes[f"{module}Widget"]
    assert "TaskWidgetMixin" == ast.unparse(widget.bases[0]), module
    assert ast.unparse(_method(widget, "setup")).rstrip().endswith("self.setUpPanel()")
    assert "QTimer" not in text and "onPollTimer" not in text and "poll()" not in ast.unparse(widget)
    for name in ("cleanup", "onSceneStartClose", "enter", "exit"):
        assert _method(widget, name) is None, f"{module}Widget overrides the skeleton's {name}()"
    # its logic wraps Slicer's parameter node with the module's parameterNodeWrapper class
    get = ast.unparse(_method(classes[f"{module}Logic"], "getParameterNode"))
    assert f"{module}ParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))" in get
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in classes[f"{module}ParameterNode"].decorator_list)
    set_up = ast.unparse(_method(_skeleton(), "setUpPanel"))
    assert "qt.QTimer()" in set_up and "JobController(self._timer" in set_up
    assert "ModelImportSection(self.logic" in set_up and "self.importSection.setup(self.layout)" in set_up
    common = "".join(p.read_text(encoding="utf-8") for p in COMMON_DIR.glob("*.py") if p.name != "TaskWidget.py")
    assert "QTimer(" not in common, "one timer per panel: the skeleton's"


# widget class -> the parameter type it holds (DeepSegReconCommon/Parameters.py WIDGET_BINDINGS)
_BINDABLE = {"qMRMLNodeComboBox": "node", "QComboBox": "str", "ctkDirectoryButton": "str", "ctkPathLineEdit": "str",
             "QSpinBox": "int", "QDoubleSpinBox": "float", "ctkSliderWidget": "float", "QCheckBox": "bool",
             "QRadioButton": "bool"}


@pytest.mark.parametrize("module", module_names())
def test_every_parameter_is_bound_to_a_widget_of_its_type(module):
    """``parameterWidgets`` maps each field of the module's parameter node to a widget of its .ui whose class the
    skeleton can read and write, holding that field's type."""
    from DeepSegReconCommon.Parameters import WIDGET_BINDINGS

    assert set(_BINDABLE) == set(WIDGET_BINDINGS)
    classes = _classes(ast.parse((MODULES_DIR / module / f"{module}.py").read_text(encoding="utf-8")))
    fields = {n.target.id: ast.unparse(n.annotation) for n in classes[f"{module}ParameterNode"].body
              if isinstance(n, ast.AnnAssign)}
    assign = next(n for n in classes[f"{module}Widget"].body if isinstance(n, ast.Assign)
                  and ast.unparse(n.targets[0]) == "parameterWidgets")
    bound = ast.literal_eval(assign.value)
    assert set(bound) == set(fields), module
    widgets = parse_ui(UI_DIR / f"{module}.ui")["widgets"]
    for name, widget in bound.items():
        cls = widgets.get(widget)
        assert cls in _BINDABLE, f"{module}: {name} -> {widget} ({cls}) cannot be bound"
        kind = _BINDABLE[cls]
        assert (fields[name].startswith("slicer.vtkMRML") if kind == "node" else fields[name] == kind), (
            f"{module}: {name} is a {fields[name]}, its widget {widget} holds a {kind}")



@pytest.mark.parametrize("module", module_names())
def test_parameter_defaults_match_the_ui(module):
    """A number or check box field of the parameter node defaults to the value its widget shows in the .ui (a
    missing ``value`` / ``checked`` property is Qt's 0 / false)."""
    classes = _classes(ast.parse((MODULES_DIR / module / f"{module}.py").read_text(encoding="utf-8")))
    defaults = {n.target.id: n.value for n in classes[f"{module}ParameterNode"].body if isinstance(n, ast.AnnAssign)}
    assign = next(n for n in classes[f"{module}Widget"].body if isinstance(n, ast.Assign)
                  and ast.unparse(n.targets[0]) == "parameterWidgets")
    widgets = {w.get("name"): w for w in ET.parse(UI_DIR / f"{module}.ui").getroot().iter("widget")}
    for name, widget in ast.literal_eval(assign.value).items():
        w = widgets[widget]
        kind = _BINDABLE.get(w.get("class"))
        if kind not in ("int", "float", "bool") or defaults[name] is None:
            continue
        prop = {p.get("name"): p[0].text for p in w.findall("property")}.get("checked" if kind == "bool" else "value")
        shown = (prop == "true") if kind == "bool" else float(prop or 0)
        assert ast.literal_eval(defaults[name]) == shown, f"{module}: {name} defaults to " \
            f"{ast.unparse(defaults[name])}, its widget {widget} shows {prop}"

def test_model_import_section_ui_has_the_expected_controls():
    info = parse_ui(UI_DIR / "ModelImportSection.ui")
    w = info["widgets"]
    expected = {"importCollapsibleButton": "ctkCollapsibleButton", "importSourceComboBox": "QComboBox",
                "importPathLineEdit": "ctkPathLineEdit", "importUrlLineEdit": "QLineEdit",
                "importSha256LineEdit": "QLineEdit", "importDefaultCheckBox": "QCheckBox",
                "importButton": "QPushButton", "importStatusLabel": "QLabel"}
    for name, cls in expected.items():
        assert w.get(name) == cls, (name, w.get(name))
    slots = _check_buttons_call_one_logic_method(COMMON_DIR / "ModelImportSection.py", "ModelImportSection",
                                                 UI_DIR / "ModelImportSection.ui")
    assert slots == {"importButton": "onImportButton"}
    section = _classes(ast.parse((COMMON_DIR / "ModelImportSection.py").read_text(encoding="utf-8")))
    assert "self.logic.import_model(" in ast.unparse(_method(section["ModelImportSection"], "onImportButton"))
    from deepsegrecon.scene.logic import TaskLogic

    assert callable(TaskLogic.import_model) and callable(TaskLogic.needs_overwrite_confirmation)



def test_batch_section_runs_the_modules_task_through_the_batch_job():
    """The "Batch" section: input and output folders, Run / Cancel calling ``BatchLogic.start`` / ``cancel``
    (``batch_job.start_batch``), progress shown by the panel's job controller; Segment Teeth has it for "teeth"."""
    info = parse_ui(UI_DIR / "BatchSection.ui")
    expected = {"batchCollapsibleButton": "ctkCollapsibleButton", "batchInputPathLineEdit": "ctkPathLineEdit",
                "batchOutputPathLineEdit": "ctkPathLineEdit", "batchRunButton": "QPushButton",
                "batchCancelButton": "QPushButton", "batchProgressBar": "QProgressBar", "batchEtaLabel": "QLabel",
                "batchStatusLabel": "QLabel"}
    for name, cls in expected.items():
        assert info["widgets"].get(name) == cls, (name, info["widgets"].get(name))
    slots = _check_buttons_call_one_logic_method(COMMON_DIR / "BatchSection.py", "BatchSection",
                                                 UI_DIR / "BatchSection.ui")
    assert slots == {"batchRunButton": "onRunButton", "batchCancelButton": "onCancelButton"}
    section = _classes(ast.parse((COMMON_DIR / "BatchSection.py").read_text(encoding="utf-8")))["BatchSection"]
    run = ast.unparse(_method(section, "onRunButton"))
    assert "self.logic.start(" in run and "self.jobs.started(JOB, self.logic, self.view" in run
    assert "self.logic.cancel()" in ast.unparse(_method(section, "onCancelButton"))
    set_up = ast.unparse(_method(_skeleton(), "setUpPanel"))
    assert "BatchLogic(self.batchTask" in set_up and "self.batchSection.setup(self.layout)" in set_up
    teeth = _classes(ast.parse((MODULES_DIR / "SegmentTeeth" / "SegmentTeeth.py").read_text(encoding="utf-8")))
    assigns = {ast.unparse(n.targets[0]): ast.literal_eval(n.value) for n in teeth["SegmentTeethWidget"].body
               if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "batchTask"}
    assert assigns == {"batchTask": "teeth"}
    from deepsegrecon.batch_job import BatchLogic
    from deepsegrecon.capability import batch_tasks

    assert "teeth" in batch_tasks() and all(callable(getattr(BatchLogic, n)) for n in ("start", "poll", "cancel"))

def test_start_buttons_ask_before_overwriting_a_segmentation():
    for module in ("SegmentTeeth", "SegmentBrainTumor", "SegmentSlices"):
        widget = _classes(ast.parse((MODULES_DIR / module / f"{module}.py").read_text(encoding="utf-8")))[
            f"{module}Widget"]
        apply = ast.unparse(_method(widget, "onApplyButton"))
        assert "self.confirmOverwrite(output)" in apply and "output_node=output" in apply, module
    assert "self.logic.needs_overwrite_confirmation(node)" in ast.unparse(_method(_skeleton(), "confirmOverwrite"))


def test_extension_cmake_installs_the_shared_helpers():
    text = _cmake(MODULES_DIR / "CMakeLists.txt")
    assert re.search(r'deepsegrecon_glob_files\(DeepSegRecon_COMMON_SCRIPTS\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}\s+'
                     r'"DeepSegReconCommon/\*\.py"\)', text)
    assert re.search(r'SCRIPTS\s+"\$\{DeepSegRecon_COMMON_SCRIPTS\}"', text)
    assert re.search(r"deepsegrecon_copy_files\(\s*\S+\s+\$\{DeepSegRecon_RESOURCES_SOURCE_DIR\}\s+\"Resources\"\s+"
                     r"\$\{DeepSegRecon_COMMON_UI\}\)", text)
    assert not (COMMON_DIR / "DeepSegReconCommon.py").exists(), "DeepSegReconCommon is a package, not a module"
    assert (COMMON_DIR / "__init__.py").is_file()
