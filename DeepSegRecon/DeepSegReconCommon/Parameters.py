"""The parameter node of a DeepSegRecon panel: typed values saved with the scene, kept in step with the widgets.

No Qt here, so it is tested outside Slicer.

* :func:`parameterNodeWrapper`: Slicer's own (``slicer.parameterNodeWrapper``, 3D Slicer 5.2+) inside Slicer. The
  ``slicer-core`` wheel the tests use does not ship it (it needs Qt and CTK), so there the small stand-in below is
  used: the same typed properties for ``str``, ``int``, ``float``, ``bool`` and MRML node types, stored in the
  ``vtkMRMLScriptedModuleNode`` in Slicer's format (numbers as ``str(value)``, booleans as "True"/"False", nodes as
  node references), defaults written on first use. :data:`WRAPPER` says which one is in use.
* :class:`WidgetBinding`: two-way link between a wrapped parameter node and the panel's widgets
  (``{parameter: widget}``). Slicer's own GUI connectors are not used: they refill a combo box from a ``Choice``
  annotation (the model list comes from the model store) and reset the range of every spin box that has no range
  annotation (the ranges live in the .ui files).
"""

import typing

import slicer
import vtk

try:
    from slicer.parameterNodeWrapper import parameterNodeWrapper
    WRAPPER = "slicer"
except ImportError:  # the slicer-core wheel (tests): no slicer.parameterNodeWrapper
    parameterNodeWrapper = None
    WRAPPER = "fallback"

# How a widget class is read and written, and the signal that says it changed: {class: (signal, property)}.
WIDGET_BINDINGS = {
    "qMRMLNodeComboBox": ("currentNodeChanged(vtkMRMLNode*)", "currentNode"),
    "QComboBox": ("currentIndexChanged(int)", "currentText"),
    "QSpinBox": ("valueChanged(int)", "value"),
    "QDoubleSpinBox": ("valueChanged(double)", "value"),
    "ctkSliderWidget": ("valueChanged(double)", "value"),
    "QCheckBox": ("toggled(bool)", "checked"),
    "QRadioButton": ("toggled(bool)", "checked"),
    "ctkDirectoryButton": ("directoryChanged(QString)", "directory"),
    "ctkPathLineEdit": ("currentPathChanged(QString)", "currentPath"),
}


def readWidget(widget):
    prop = WIDGET_BINDINGS[widget.className()][1]
    return widget.currentNode() if prop == "currentNode" else getattr(widget, prop)


def writeWidget(widget, value):
    prop = WIDGET_BINDINGS[widget.className()][1]
    if prop == "currentNode":
        widget.setCurrentNode(value)
    elif prop == "currentText":  # a value the list does not hold (yet) leaves the choice as it is
        index = widget.findText(str(value))
        if index >= 0:
            widget.currentIndex = index
    else:
        setattr(widget, prop, value)


class WidgetBinding:
    """Keeps ``widgets`` ({parameter name: widget}) and a wrapped parameter node in step: a widget change is
    written to the node, a node change (scene load, undo, another panel) to the widgets; ``onChange()`` after
    either."""

    def __init__(self, widgets, onChange=None):
        self.widgets = dict(widgets)
        self.onChange = onChange
        self.parameters = None
        self._observer = None
        self._updating = False
        for widget in self.widgets.values():
            widget.connect(WIDGET_BINDINGS[widget.className()][0], self.toNode)

    def setParameters(self, parameters):
        """Follow ``parameters`` (a wrapped parameter node, or None to stop) and show its values."""
        if self.parameters is not None and self._observer is not None:
            self.parameters.parameterNode.RemoveObserver(self._observer)
        self.parameters, self._observer = parameters, None
        if parameters is not None:
            self._observer = parameters.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, self.toWidgets)
            self.toWidgets()

    def toWidgets(self, *args):
        if self.parameters is None or self._updating:
            return
        self._updating = True
        try:
            for name, widget in self.widgets.items():
                writeWidget(widget, getattr(self.parameters, name))
        finally:
            self._updating = False
        self._changed()

    def toNode(self, *args):
        if self.parameters is None or self._updating:
            return
        self._updating = True
        node = self.parameters.parameterNode
        wasModifying = node.StartModify()
        try:
            for name, widget in self.widgets.items():
                setattr(self.parameters, name, readWidget(widget))
        finally:
            node.EndModify(wasModifying)
            self._updating = False
        self._changed()

    def _changed(self):
        if self.onChange is not None:
            self.onChange()


# ------------------------------------------------------------------------------ stand-in for slicer-core
class _Parameter:
    """One typed property of a wrapped parameter node, stored as Slicer's parameterNodeWrapper stores it."""

    def __init__(self, name, valueType, default):
        self.name, self.type, self.default = name, valueType, default
        self.isNode = isinstance(valueType, type) and issubclass(valueType, slicer.vtkMRMLNode)
        if not self.isNode and valueType not in (str, int, float, bool):
            raise TypeError(f"parameter '{name}': type {valueType} is not supported (str, int, float, bool, nodes)")

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self
        node = wrapper.parameterNode
        if self.isNode:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        return text == "True" if self.type is bool else self.type(text)

    def __set__(self, wrapper, value):
        allowed = (int, float) if self.type is float else self.type
        if (value is not None or not self.isNode) and not isinstance(value, allowed):
            raise ValueError(f"parameter '{self.name}' must be a {self.type.__name__}, not {value!r}")
        node = wrapper.parameterNode
        if self.isNode:
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(self.name, ("True" if value else "False") if self.type is bool else str(value))


def _standInWrapper(cls):
    emptyValues = {str: "", int: 0, float: 0.0, bool: False}
    parameters = {}
    for name, valueType in typing.get_type_hints(cls).items():
        parameters[name] = _Parameter(name, valueType, getattr(cls, name, emptyValues.get(valueType)))
    for name, parameter in parameters.items():
        setattr(cls, name, parameter)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for parameter in parameters.values():
            if not parameterNode.HasParameter(parameter.name):
                parameter.__set__(self, parameter.default)

    cls.__init__ = __init__
    cls.allParameters = parameters
    return cls


if parameterNodeWrapper is None:
    parameterNodeWrapper = _standInWrapper
