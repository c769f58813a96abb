"""What only the 3D Slicer application provides, so that pytest can drive the SegLens panel without Slicer.

Everything else is real: the panel's ``.ui`` file is loaded by PySide6's ``QUiLoader`` (offscreen), MRML nodes,
scenes, slice and composite nodes come from the ``slicer-core`` wheel, and ``slicer.util``'s own ``loadUI``,
``childWidgetVariables``, ``findChildren``, ``settingsValue``, ``NodeModify`` and ``VTKObservationMixin`` run
unchanged. The stand-in supplies:

- ``qt`` and ``ctk`` modules with PythonQt's way of using Qt objects: Qt properties read and written as attributes
  (``button.enabled = False``, ``combo.currentText``, ``table.rowCount``), ``obj.connect("clicked(bool)", slot)``
  with the C++ signature (checked against the object's signals), slots called with as many arguments as they take,
  ``objectName`` as ``name``. Exceptions raised in slots are printed and recorded (``app.slotErrors``), as PythonQt
  prints them, so a test can assert that none happened.
- Qt stand-ins for the Slicer/CTK widgets of the ``.ui`` (``qMRMLWidget``, ``qMRMLNodeComboBox``,
  ``qMRMLColorTableComboBox``, ``ctkSliderWidget``, ``ctkRangeWidget``, ``ctkPathLineEdit``, ``ctkDirectoryButton``,
  ``ctkCollapsibleButton``), with the properties, slots and signal signatures of their C++ headers; node selectors
  list the scene's nodes and follow it.
- ``slicer.app`` (versions, ``processEvents``, a layout manager whose slice widgets hold the scene's real Red /
  Yellow / Green slice nodes, ``restart``), ``slicer.ScriptedLoadableModule`` (the four base classes, with the real
  ``getParameterNode`` logic), ``slicer.parameterNodeWrapper`` (typed attributes stored in a
  ``vtkMRMLScriptedModuleNode`` exactly as Slicer's serializers store them, so scenes save and restore them), and
  message boxes that record what they would show (answers to confirmations are set by the test), and
  ``slicer.i18n`` (``tr``, ``translate``) recording each string sent for translation.
- The Slicer/CTK widgets are drawn roughly as their originals (a collapsible button's header and frame, a slider
  and spin box, a path's line edit and browse button, a folder button), so a screenshot of the panel shows them.

Use :func:`installed` as a context manager: it patches ``sys.modules`` and ``slicer`` and restores both afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
import sys
import traceback
import types
import typing
import xml.etree.ElementTree as ET

import slicer
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets
from PySide6.QtCore import Property, Signal

# -- PythonQt-style access -----------------------------------------------------------------------------------------------
SLOT_ERRORS: list[str] = []


def unwrap(value):
    if isinstance(value, PythonQtObject):
        return value._obj
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()  # PythonQt converts numpy scalars to the C++ number types
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(unwrap(v) for v in value)
    return value


def wrap(value):
    if isinstance(value, PythonQtObject):
        return value
    if isinstance(value, QtCore.QObject):
        return PythonQtObject(value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


def _positional_capacity(function) -> int:
    """How many positional arguments a slot takes (PythonQt passes only those)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 99
    count = 0
    for parameter in parameters:
        if parameter.kind == parameter.VAR_POSITIONAL:
            return 99
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def _guarded(slot):
    capacity = _positional_capacity(slot)

    def call(*args):
        try:
            slot(*[wrap(a) for a in args][:capacity])
        except Exception:  # PythonQt prints a slot's exception and goes on; we also record it
            text = traceback.format_exc()
            SLOT_ERRORS.append(text)
            sys.stderr.write(text)

    return call


def _normalise(signature: str) -> str:
    return QtCore.QMetaObject.normalizedSignature(signature).data().decode()


class SignalProxy:
    def __init__(self, signal):
        self._signal = signal

    def connect(self, slot):
        return self._signal.connect(_guarded(slot))

    def disconnect(self, *args):
        return self._signal.disconnect(*args)

    def emit(self, *args):
        return self._signal.emit(*[unwrap(a) for a in args])


class PythonQtObject:
    """A Qt object as PythonQt shows it to Python (see the module docstring)."""

    __slots__ = ("_obj", "_slots")

    def __init__(self, obj):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_slots", [])

    def __getattr__(self, name):
        obj = self._obj
        if name == "name":
            return obj.objectName()
        meta = obj.metaObject()
        index = meta.indexOfProperty(name)
        if index >= 0:
            return wrap(obj.property(name))
        attribute = getattr(obj, name)
        if isinstance(attribute, QtCore.SignalInstance):
            return SignalProxy(attribute)
        if callable(attribute):
            def method(*args, **kwargs):
                return wrap(attribute(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))

            return method
        return wrap(attribute)

    def __setattr__(self, name, value):
        obj = self._obj
        if name == "name":
            obj.setObjectName(value)
            return
        if obj.metaObject().indexOfProperty(name) < 0:
            raise AttributeError(f"{type(obj).__name__} has no Qt property '{name}' (PythonQt would refuse to set it)")
        if not obj.setProperty(name, unwrap(value)):
            raise TypeError(f"{type(obj).__name__}.{name} cannot be set to {value!r}")

    def connect(self, signature, slot):
        """``obj.connect("clicked(bool)", slot)``: the signature must be one of the object's signals."""
        obj = self._obj
        normalised = _normalise(signature)
        name = normalised.split("(", 1)[0]
        custom = getattr(type(obj), "CPP_SIGNALS", {})
        if normalised not in custom and obj.metaObject().indexOfSignal(normalised) < 0:
            raise ValueError(f"{type(obj).__name__} has no signal {signature}")
        signal = getattr(obj, custom.get(normalised, name))
        wrapper = _guarded(slot)
        self._slots.append((normalised, slot, wrapper))
        signal.connect(wrapper)
        return True

    def disconnect(self, signature, slot=None):
        normalised = _normalise(signature)
        custom = getattr(type(self._obj), "CPP_SIGNALS", {})
        signal = getattr(self._obj, custom.get(normalised, normalised.split("(", 1)[0]))
        for entry in [e for e in self._slots if e[0] == normalised and (slot is None or e[1] == slot)]:
            signal.disconnect(entry[2])
            self._slots.remove(entry)
        return True

    def __eq__(self, other):
        return isinstance(other, PythonQtObject) and other._obj is self._obj

    def __hash__(self):
        return hash(id(self._obj))

    def __bool__(self):
        return True

    def __repr__(self):
        return f"<PythonQt {type(self._obj).__name__} '{self._obj.objectName()}'>"


class PythonQtClass:
    """``qt.QTimer``: calling it makes a wrapped instance; class attributes (enums, static methods) pass through."""

    def __init__(self, cls, factory=None):
        self._cls = cls
        self._factory = factory or cls

    def __call__(self, *args, **kwargs):
        return wrap(self._factory(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))

    def __getattr__(self, name):
        attribute = getattr(self._cls, name)
        if callable(attribute) and not isinstance(attribute, type) and not hasattr(attribute, "__members__"):
            def static(*args, **kwargs):
                return wrap(attribute(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))

            return static
        return attribute


# -- Slicer / CTK widgets --------------------------------------------------------------------------------------------------
def _property(kind, attribute, notify=None, setter=None):
    def get(self):
        return getattr(self, attribute)

    def put(self, value):
        if setter is not None:
            getattr(self, setter)(value)
        else:
            setattr(self, attribute, value)

    return Property(kind, get, put)


class qMRMLWidget(QtWidgets.QWidget):
    """``qMRMLWidget``: a widget with a scene, and the signal the .ui connects to every selector."""

    mrmlSceneChanged = Signal(object)
    CPP_SIGNALS = {"mrmlSceneChanged(vtkMRMLScene*)": "mrmlSceneChanged"}
    CPP_SLOTS = {"setMRMLScene(vtkMRMLScene*)": "setMRMLScene"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qSlicerWidget(qMRMLWidget):
    pass


class qMRMLNodeComboBox(QtWidgets.QWidget):
    """``qMRMLNodeComboBox``: lists the scene's nodes of ``nodeTypes`` and follows the scene (added, removed,
    renamed, closed); ``noneEnabled`` adds a "None" item; without it the first node is selected."""

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)
    nodeAdded = Signal(object)
    CPP_SIGNALS = {"currentNodeChanged(vtkMRMLNode*)": "currentNodeChanged", "currentNodeIDChanged(QString)": "currentNodeIDChanged",
                   "nodeAdded(vtkMRMLNode*)": "nodeAdded"}  # fmt: skip
    CPP_SLOTS = {"setMRMLScene(vtkMRMLScene*)": "setMRMLScene", "setCurrentNode(vtkMRMLNode*)": "setCurrentNode",
                 "setCurrentNodeID(QString)": "setCurrentNodeID"}  # fmt: skip

    def __init__(self, parent=None):
        super().__init__(parent)
        self._combo = QtWidgets.QComboBox(self)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._combo)
        self._nodeTypes, self._showHidden, self._showChildNodeTypes = [], False, True
        self._noneEnabled, self._addEnabled, self._removeEnabled = False, True, True
        self._editEnabled, self._renameEnabled, self._selectNodeUponCreation = False, False, True
        self._noneDisplay = "None"
        self._scene, self._observations, self._ids, self._current = None, [], [], None
        self._combo.currentIndexChanged.connect(self._onIndexChanged)

    nodeTypes = _property("QStringList", "_nodeTypes", setter="setNodeTypes")
    showHidden = _property(bool, "_showHidden", setter="setShowHidden")
    showChildNodeTypes = _property(bool, "_showChildNodeTypes", setter="setShowChildNodeTypes")
    noneEnabled = _property(bool, "_noneEnabled", setter="setNoneEnabled")
    addEnabled = _property(bool, "_addEnabled")
    removeEnabled = _property(bool, "_removeEnabled")
    editEnabled = _property(bool, "_editEnabled")
    renameEnabled = _property(bool, "_renameEnabled")
    selectNodeUponCreation = _property(bool, "_selectNodeUponCreation")
    noneDisplay = _property(str, "_noneDisplay")

    def _getCurrentNodeID(self):
        return self._current or ""

    currentNodeID = Property(str, _getCurrentNodeID, lambda self, value: self.setCurrentNodeID(value))

    def setNodeTypes(self, types_):
        self._nodeTypes = list(types_)
        self._refresh()

    def setShowHidden(self, value):
        self._showHidden = bool(value)
        self._refresh()

    def setShowChildNodeTypes(self, value):
        self._showChildNodeTypes = bool(value)
        self._refresh()

    def setNoneEnabled(self, value):
        self._noneEnabled = bool(value)
        self._refresh()

    def setMRMLScene(self, scene):
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations = []
        self._scene = scene
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent, scene.EndImportEvent):
                self._observations.append((scene, scene.AddObserver(event, lambda caller, e: self._refresh())))
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node):
        if node.GetHideFromEditors() and not self._showHidden:
            return False
        if self._showChildNodeTypes:
            return any(node.IsA(t) for t in self._nodeTypes)
        return node.GetClassName() in self._nodeTypes

    def nodes(self):
        if self._scene is None:
            return []
        found = []
        for index in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(index)
            if node is not None and self._accepts(node):
                found.append(node)
        return found

    def nodeCount(self):
        return len(self.nodes())

    def _refresh(self):
        found = self.nodes()
        self._ids = ([None] if self._noneEnabled else []) + [n.GetID() for n in found]
        current = self._current if self._current in self._ids else None
        if current is None and not self._noneEnabled and found:
            current = found[0].GetID()
        self._combo.blockSignals(True)
        self._combo.clear()
        self._combo.addItems([self._noneDisplay if i is None else self._scene.GetNodeByID(i).GetName() for i in self._ids])
        self._combo.setCurrentIndex(self._ids.index(current) if current in self._ids else -1)
        self._combo.blockSignals(False)
        self._setCurrent(current)

    def _onIndexChanged(self, index):
        self._setCurrent(self._ids[index] if 0 <= index < len(self._ids) else None)

    def _setCurrent(self, nodeID):
        if nodeID == self._current:
            return
        self._current = nodeID
        if nodeID in self._ids:
            self._combo.blockSignals(True)
            self._combo.setCurrentIndex(self._ids.index(nodeID))
            self._combo.blockSignals(False)
        self.currentNodeIDChanged.emit(nodeID or "")
        self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        return self._scene.GetNodeByID(self._current) if self._scene is not None and self._current else None

    def currentNodeId(self):
        return self._current or ""

    def setCurrentNode(self, node):
        if isinstance(node, str):
            return self.setCurrentNodeID(node)
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeID):
        nodeID = nodeID or None
        if nodeID is not None and nodeID not in self._ids:
            nodeID = None  # "If nodeID is invalid (or can't be found in the scene), the current node becomes 0"
        if nodeID is None and not self._noneEnabled and self._ids:
            return
        self._setCurrent(nodeID)

    def setCurrentNodeIndex(self, index):
        found = self.nodes()
        self.setCurrentNodeID(found[index].GetID() if 0 <= index < len(found) else "")

    def nodeFromIndex(self, index):
        found = self.nodes()
        return found[index] if 0 <= index < len(found) else None

    def addNode(self, nodeType=None):
        node = self._scene.AddNewNodeByClass(nodeType or self._nodeTypes[0])
        if self._selectNodeUponCreation:
            self.setCurrentNode(node)
        return node


class qMRMLColorTableComboBox(qMRMLNodeComboBox):
    """``qMRMLColorTableComboBox``: colour tables and procedural colour maps (hidden ones too), no add/remove."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._showHidden = True
        self._nodeTypes = ["vtkMRMLColorTableNode", "vtkMRMLProceduralColorNode"]
        self._addEnabled = self._removeEnabled = False


# -- how the stand-ins look: as their Slicer/CTK originals do, closely enough for a screenshot of the panel -------------
HEADER_HEIGHT = 24


class ctkCollapsibleButton(QtWidgets.QWidget):
    """Drawn as CTK draws it: a button-like header (arrow and title) above a framed area for the contents."""

    contentsCollapsed = Signal(bool)
    CPP_SIGNALS = {"contentsCollapsed(bool)": "contentsCollapsed"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text, self._collapsed = "", False
        self.setContentsMargins(2, HEADER_HEIGHT + 2, 2, 2)  # the .ui's layout fills the area below the header

    def _setText(self, text):
        self._text = str(text)
        self.update()

    text = _property(str, "_text", setter="_setText")
    collapsed = _property(bool, "_collapsed")

    def paintEvent(self, event):
        painter = QtWidgets.QStylePainter(self)
        frame = QtWidgets.QStyleOptionFrame()
        frame.initFrom(self)
        frame.rect = self.rect().adjusted(0, HEADER_HEIGHT // 2, 0, 0)
        frame.frameShape = QtWidgets.QFrame.StyledPanel
        frame.lineWidth = 1
        painter.drawPrimitive(QtWidgets.QStyle.PE_Frame, frame)
        button = QtWidgets.QStyleOptionButton()
        button.initFrom(self)
        button.rect = QtCore.QRect(0, 0, self.width(), HEADER_HEIGHT)
        painter.drawControl(QtWidgets.QStyle.CE_PushButtonBevel, button)
        arrow = QtWidgets.QStyleOption()
        arrow.initFrom(self)
        arrow.rect = QtCore.QRect(6, (HEADER_HEIGHT - 10) // 2, 10, 10)
        painter.drawPrimitive(QtWidgets.QStyle.PE_IndicatorArrowRight if self._collapsed else QtWidgets.QStyle.PE_IndicatorArrowDown, arrow)
        painter.drawText(QtCore.QRect(22, 0, self.width() - 26, HEADER_HEIGHT), int(QtCore.Qt.AlignVCenter | QtCore.Qt.AlignLeft), self._text)


class ctkSliderWidget(QtWidgets.QWidget):
    """``ctkSliderWidget``: a double value clamped to [minimum, maximum] and rounded to ``decimals``;
    ``valueChanged(double)`` only when the value changes."""

    valueChanged = Signal(float)
    valueIsChanging = Signal(float)
    CPP_SIGNALS = {"valueChanged(double)": "valueChanged", "valueIsChanging(double)": "valueIsChanging"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self._value, self._minimum, self._maximum, self._singleStep, self._decimals, self._tracking = 0.0, 0.0, 99.0, 1.0, 2, True
        self._slider, self._spinBox = _value_display(self, 1)

    def _round(self, value):
        return round(min(max(float(value), self._minimum), self._maximum), self._decimals)

    def _show(self):
        _show_value(self._slider, self._spinBox, self._value, self._minimum, self._maximum, self._decimals)

    def setValue(self, value):
        value = self._round(value)
        if value != self._value:
            self._value = value
            self._show()
            self.valueChanged.emit(value)

    def setMinimum(self, value):
        self._minimum = float(value)
        self._maximum = max(self._maximum, self._minimum)
        self._show()
        self.setValue(self._value)

    def setMaximum(self, value):
        self._maximum = float(value)
        self._minimum = min(self._minimum, self._maximum)
        self._show()
        self.setValue(self._value)

    def setDecimals(self, value):
        self._decimals = int(value)
        self._show()
        self.setValue(self._value)

    value = _property(float, "_value", setter="setValue")
    minimum = _property(float, "_minimum", setter="setMinimum")
    maximum = _property(float, "_maximum", setter="setMaximum")
    singleStep = _property(float, "_singleStep")
    decimals = _property(int, "_decimals", setter="setDecimals")
    tracking = _property(bool, "_tracking")


class ctkRangeWidget(QtWidgets.QWidget):
    valuesChanged = Signal(float, float)
    minimumValueChanged = Signal(float)
    maximumValueChanged = Signal(float)
    CPP_SIGNALS = {"valuesChanged(double,double)": "valuesChanged", "minimumValueChanged(double)": "minimumValueChanged",
                   "maximumValueChanged(double)": "maximumValueChanged"}  # fmt: skip

    def __init__(self, parent=None):
        super().__init__(parent)
        self._minimum, self._maximum, self._low, self._high, self._singleStep, self._decimals = 0.0, 99.0, 0.0, 99.0, 1.0, 2
        self._lowBox, self._bar, self._highBox = _range_display(self)
        self._show()

    def _show(self):
        for box, value in ((self._lowBox, self._low), (self._highBox, self._high)):
            _show_value(None, box, value, self._minimum, self._maximum, self._decimals)
        self._bar.span = (self._minimum, self._maximum, self._low, self._high)
        self._bar.update()

    def setValues(self, low, high):
        low, high = sorted((float(low), float(high)))
        low = round(min(max(low, self._minimum), self._maximum), self._decimals)
        high = round(min(max(high, self._minimum), self._maximum), self._decimals)
        changed = (low, high) != (self._low, self._high)
        lowChanged, highChanged = low != self._low, high != self._high
        self._low, self._high = low, high
        self._show()
        if lowChanged:
            self.minimumValueChanged.emit(low)
        if highChanged:
            self.maximumValueChanged.emit(high)
        if changed:
            self.valuesChanged.emit(low, high)

    def setRange(self, minimum, maximum):
        self._minimum, self._maximum = float(minimum), max(float(minimum), float(maximum))
        self._show()
        self.setValues(self._low, self._high)

    minimum = Property(float, lambda self: self._minimum, lambda self, v: self.setRange(v, max(v, self._maximum)))
    maximum = Property(float, lambda self: self._maximum, lambda self, v: self.setRange(min(self._minimum, v), v))
    minimumValue = Property(float, lambda self: self._low, lambda self, v: self.setValues(v, max(v, self._high)))
    maximumValue = Property(float, lambda self: self._high, lambda self, v: self.setValues(min(self._low, v), v))
    singleStep = _property(float, "_singleStep")
    decimals = _property(int, "_decimals", setter="_setDecimals")

    def _setDecimals(self, value):
        self._decimals = int(value)
        self._show()


class ctkPathLineEdit(QtWidgets.QWidget):
    currentPathChanged = Signal(str)
    validInputChanged = Signal(bool)
    CPP_SIGNALS = {"currentPathChanged(QString)": "currentPathChanged", "validInputChanged(bool)": "validInputChanged"}
    # ctkPathLineEdit::Filter (ctkPathLineEdit.h)
    FLAGS = {"Dirs": 0x001, "Files": 0x002, "Drives": 0x004, "NoSymLinks": 0x008, "NoDotAndDotDot": 0x1000, "NoDot": 0x2000,
             "NoDotDot": 0x4000, "AllEntries": 0x007, "Readable": 0x010, "Writable": 0x020, "Executable": 0x040,
             "Modified": 0x080, "Hidden": 0x100, "System": 0x200, "CaseSensitive": 0x800}  # fmt: skip

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path, self._filters, self._nameFilters, self._settingKey = "", 0, [], ""
        self._lineEdit = QtWidgets.QLineEdit(self)  # what the user sees; the path is set through the property
        self._lineEdit.setReadOnly(True)
        browse = QtWidgets.QToolButton(self)
        browse.setText("...")
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._lineEdit)
        layout.addWidget(browse)

    def setCurrentPath(self, path):
        path = str(path or "")
        if path != self._path:
            self._path = path
            self._lineEdit.setText(path)
            self._lineEdit.setCursorPosition(0)
            self.currentPathChanged.emit(path)

    currentPath = _property(str, "_path", setter="setCurrentPath")
    filters = _property(int, "_filters")
    nameFilters = _property("QStringList", "_nameFilters")
    settingKey = _property(str, "_settingKey")


class ctkDirectoryButton(QtWidgets.QWidget):
    directoryChanged = Signal(str)
    directorySelected = Signal(str)
    CPP_SIGNALS = {"directoryChanged(QString)": "directoryChanged", "directorySelected(QString)": "directorySelected"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self._directory = str(pathlib.Path.cwd())
        self._button = QtWidgets.QPushButton(self)  # the folder, as CTK shows it
        self._button.setIcon(self.style().standardIcon(QtWidgets.QStyle.SP_DirIcon))
        self._button.setStyleSheet("text-align: left; padding: 3px")
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._button)
        self._button.setText(self._directory)

    def setDirectory(self, directory):
        directory = str(directory or "")
        if directory != self._directory:
            self._directory = directory
            self._button.setText(directory)
            self.directoryChanged.emit(directory)

    directory = _property(str, "_directory", setter="setDirectory")


def _value_display(parent, stretch):
    """A slider and a spin box in a row (what ``ctkSliderWidget`` shows); they show the value, nothing more."""
    slider = QtWidgets.QSlider(QtCore.Qt.Horizontal, parent)
    slider.setRange(0, 1000)
    spinBox = QtWidgets.QDoubleSpinBox(parent)
    spinBox.setReadOnly(True)
    spinBox.setButtonSymbols(QtWidgets.QAbstractSpinBox.NoButtons)
    layout = QtWidgets.QHBoxLayout(parent)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(slider, stretch)
    layout.addWidget(spinBox)
    return slider, spinBox


def _show_value(slider, spinBox, value, minimum, maximum, decimals):
    spinBox.blockSignals(True)
    spinBox.setDecimals(int(decimals))
    spinBox.setRange(float(minimum), float(maximum))
    spinBox.setValue(float(value))
    spinBox.blockSignals(False)
    if slider is not None:
        slider.blockSignals(True)
        slider.setValue(int(round(1000.0 * (value - minimum) / (maximum - minimum))) if maximum > minimum else 0)
        slider.blockSignals(False)


class _RangeBar(QtWidgets.QWidget):
    """The groove of ``ctkRangeWidget``'s double slider: the chosen span highlighted, a handle at each end."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.span = (0.0, 1.0, 0.0, 1.0)
        self.setMinimumSize(60, 18)

    def paintEvent(self, event):
        minimum, maximum, low, high = self.span
        width = max(self.width() - 12, 1)

        def x(value):
            return 6 + int(round(width * ((value - minimum) / (maximum - minimum) if maximum > minimum else 0.0)))

        painter = QtGui.QPainter(self)
        palette = self.palette()
        middle = self.height() // 2
        painter.fillRect(QtCore.QRect(6, middle - 2, width, 4), palette.mid())
        painter.fillRect(QtCore.QRect(x(low), middle - 2, max(x(high) - x(low), 1), 4), palette.highlight())
        for value in (low, high):
            painter.fillRect(QtCore.QRect(x(value) - 4, middle - 7, 8, 14), palette.button())
            painter.setPen(palette.dark().color())
            painter.drawRect(QtCore.QRect(x(value) - 4, middle - 7, 8, 14))


def _range_display(parent):
    low, high = QtWidgets.QDoubleSpinBox(parent), QtWidgets.QDoubleSpinBox(parent)
    for box in (low, high):
        box.setReadOnly(True)
        box.setButtonSymbols(QtWidgets.QAbstractSpinBox.NoButtons)
    bar = _RangeBar(parent)
    layout = QtWidgets.QHBoxLayout(parent)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(low)
    layout.addWidget(bar, 1)
    layout.addWidget(high)
    return low, bar, high


CUSTOM_WIDGETS = {cls.__name__: cls for cls in (qMRMLWidget, qSlicerWidget, qMRMLNodeComboBox, qMRMLColorTableComboBox,
                                                ctkCollapsibleButton, ctkSliderWidget, ctkRangeWidget, ctkPathLineEdit,
                                                ctkDirectoryButton)}  # fmt: skip


# -- loading .ui files ----------------------------------------------------------------------------------------------------
def _xml_value(element, cls):
    kind = element.tag
    if kind == "bool":
        return element.text == "true"
    if kind == "double":
        return float(element.text)
    if kind == "number":
        return int(element.text)
    if kind == "string":
        return element.text or ""
    if kind == "stringlist":
        return [s.text or "" for s in element.findall("string")]
    if kind == "set":
        flags = 0
        for name in (element.text or "").split("|"):
            name = name.strip().split("::")[-1]
            if name not in cls.FLAGS:
                raise ValueError(f"{cls.__name__} has no flag {name}")
            flags |= cls.FLAGS[name]
        return flags
    raise ValueError(f"property type <{kind}> is not handled for {cls.__name__}")


class UiLoader:
    """``qt.QUiLoader``: Qt's own loader for the Qt widgets; the Slicer/CTK widgets are the stand-ins above, whose
    properties from the .ui are set here and whose ``<connections>`` (C++ signatures) are made here, each checked."""

    def load(self, qfile, parent=None):
        path = unwrap(qfile).fileName()
        tree = ET.parse(path)
        root = tree.getroot()
        customs = {c.findtext("class") for c in root.iter("customwidget")}
        unknown = customs - set(CUSTOM_WIDGETS)
        if unknown:
            raise RuntimeError(f"{path}: no stand-in for {sorted(unknown)}")
        deferred = []  # (object name, class, property name, xml value)
        for widget in root.iter("widget"):
            cls = CUSTOM_WIDGETS.get(widget.get("class"))
            if cls is None:
                continue
            qt_base = next(c for c in cls.__mro__ if c.__module__.startswith("PySide6"))
            for prop in list(widget.findall("property")):
                name = prop.get("name")
                if any(isinstance(c.__dict__.get(name), Property) for c in cls.__mro__ if c in CUSTOM_WIDGETS.values()):
                    deferred.append((widget.get("name"), cls, name, list(prop)[0]))
                    widget.remove(prop)
                elif qt_base.staticMetaObject.indexOfProperty(name) < 0:
                    raise RuntimeError(f"{path}: {cls.__name__} '{widget.get('name')}' has no property '{name}'")
        connections = root.find("connections")
        links = []
        if connections is not None:
            for c in connections.findall("connection"):
                links.append(tuple(c.findtext(k) for k in ("sender", "signal", "receiver", "slot")))
            root.remove(connections)
        loader = QtUiTools.QUiLoader()
        for cls in CUSTOM_WIDGETS.values():
            loader.registerCustomWidget(cls)
        buffer = QtCore.QBuffer()
        buffer.setData(ET.tostring(root))
        buffer.open(QtCore.QIODevice.ReadOnly)
        widget = loader.load(buffer, unwrap(parent))
        if widget is None:
            raise RuntimeError(f"{path}: {loader.errorString()}")
        widget._loaded_from = path

        def find(name):
            found = widget if widget.objectName() == name else widget.findChild(QtCore.QObject, name)
            if found is None:
                raise RuntimeError(f"{path}: no object named {name}")
            return found

        for name, cls, prop, value in deferred:
            target = find(name)
            if target.metaObject().indexOfProperty(prop) < 0:
                raise RuntimeError(f"{path}: {cls.__name__} has no property '{prop}'")
            if not target.setProperty(prop, _xml_value(value, cls)):
                raise RuntimeError(f"{path}: could not set {name}.{prop}")
        for sender, signal, receiver, slot in links:
            source, target = find(sender), find(receiver)
            signals = getattr(type(source), "CPP_SIGNALS", {})
            slots = getattr(type(target), "CPP_SLOTS", {})
            if _normalise(signal) not in signals or _normalise(slot) not in slots:
                raise RuntimeError(f"{path}: cannot connect {sender}.{signal} to {receiver}.{slot}")
            getattr(source, signals[_normalise(signal)]).connect(getattr(target, slots[_normalise(slot)]))
        return wrap(widget)


# -- the application ----------------------------------------------------------------------------------------------------
class SliceWidget:
    """``qMRMLSliceWidget`` as the module uses it: its slice node."""

    def __init__(self, sliceNode):
        self._sliceNode = sliceNode

    def mrmlSliceNode(self):
        return self._sliceNode


class LayoutManager:
    """``qMRMLLayoutManager``: slice widgets for the scene's Red, Yellow and Green slice nodes."""

    def __init__(self, app):
        self._app = app

    def sliceViewNames(self):
        return ["Red", "Yellow", "Green"]

    def sliceWidget(self, name):
        scene = slicer.mrmlScene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
            if node.GetLayoutName() == name:
                return SliceWidget(node)
        return None


class Application:
    """``slicer.app`` (a ``qSlicerApplication``) as far as the module and ``slicer.util`` use it."""

    def __init__(self, qapp, version=(5, 10)):
        self._qapp = qapp
        self.majorVersion, self.minorVersion = version
        self.applicationName = "Slicer"
        self.restarts = 0
        self._layoutManager = LayoutManager(self)

    def processEvents(self):
        self._qapp.processEvents()

    def layoutManager(self):
        return self._layoutManager

    def testingEnabled(self):
        return False  # message boxes are "shown" (recorded), as for a user

    def setOverrideCursor(self, cursor):
        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        QtWidgets.QApplication.restoreOverrideCursor()

    def restart(self):
        self.restarts += 1

    def settings(self):
        return wrap(QtCore.QSettings())

    @property
    def slotErrors(self):
        return SLOT_ERRORS


def add_slice_views(scene) -> dict:
    """The Red (axial), Yellow (sagittal) and Green (coronal) slice nodes and their composite nodes, as Slicer's
    layout makes them (singletons, so they survive closing the scene)."""
    import numpy as np

    orientations = {"Red": [[-1, 0, 0], [0, 1, 0], [0, 0, 1]], "Yellow": [[0, 0, 1], [-1, 0, 0], [0, 1, 0]],
                    "Green": [[-1, 0, 0], [0, 0, 1], [0, 1, 0]]}  # fmt: skip
    views = {}
    for name, rotation in orientations.items():
        node = slicer.vtkMRMLSliceNode()
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetSingletonTag(name)
        matrix = np.eye(4)
        matrix[:3, :3] = rotation
        node.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(matrix))
        node.UpdateMatrices()
        scene.AddNode(node)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        composite.SetSingletonTag(name)
        scene.AddNode(composite)
        views[name] = node
    return views


def move_slice(slice_node, offset=None, pan=None):
    """What scrolling (``offset``: mm along the view's normal, absolute) and panning (``pan``: mm in the view's
    plane, added) do to a slice node: its SliceToRAS changes and it fires Modified."""
    import numpy as np

    matrix = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    if offset is not None:
        normal = matrix[:3, 2]
        matrix[:3, 3] += (float(offset) - float(np.dot(matrix[:3, 3], normal))) * normal
    if pan is not None:
        matrix[:3, 3] += matrix[:3, 0] * float(pan[0]) + matrix[:3, 1] * float(pan[1])
    slice_node.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(matrix))
    slice_node.UpdateMatrices()


def module_panel(widget_class):
    """Create a module's widget as Slicer does: inside a panel widget, then ``setup()`` and ``enter()``."""
    parent = wrap(qMRMLWidget())
    parent.setLayout(QtWidgets.QVBoxLayout())
    parent.setMRMLScene(slicer.mrmlScene)
    widget = widget_class(parent)
    widget.setup()
    widget.enter()
    parent.show()
    return widget


# -- slicer.ScriptedLoadableModule ------------------------------------------------------------------------------------------
def _scripted_loadable_module():
    import unittest

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            super().__init__()
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title, parent.categories, parent.dependencies = "", [], []
            parent.contributors, parent.helpText, parent.acknowledgementText = [], "", ""
            if not hasattr(slicer, "selfTests"):
                slicer.selfTests = {}
            slicer.selfTests[self.moduleName] = self.runTest

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def runTest(self, msec=100, **kwargs):
            import importlib

            testCase = getattr(importlib.import_module(self.__module__), self.moduleName + "Test")()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[:-6]
            self.developerMode = False
            if not parent:
                self.parent = wrap(qMRMLWidget())
                self.parent.setLayout(QtWidgets.QVBoxLayout())
                self.parent.setMRMLScene(slicer.mrmlScene)
            else:
                self.parent = parent
            self.layout = self.parent.layout()
            if not parent:
                self.setup()
                self.parent.show()

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

        def enter(self):
            pass

        def exit(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            if self.isSingletonParameterNode:
                parameterNode = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if parameterNode:
                    if parameterNode.GetAttribute("ModuleName") != self.moduleName:
                        parameterNode.SetAttribute("ModuleName", self.moduleName)
                    return parameterNode
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    module.__all__ = [c for c in dir(module) if c.startswith("Scripted")]
    return module


# -- slicer.parameterNodeWrapper ------------------------------------------------------------------------------------------
class _Serializer:
    """One parameter's storage in the scripted module node, as Slicer's serializers.py stores it."""

    def __init__(self, type_):
        self.type = type_
        origin = typing.get_origin(type_)
        if origin is list:
            (element,) = typing.get_args(type_)
            self.element = _Serializer(element)
            self.kind = "list"
        elif isinstance(type_, type) and issubclass(type_, slicer.vtkMRMLNode):
            self.kind = "node"
        elif type_ in (int, float, str, bool, pathlib.Path):
            self.kind = type_.__name__
        else:
            raise TypeError(f"the parameterNodeWrapper stand-in does not serialize {type_}")

    def default(self):
        return {"list": [], "node": None, "int": 0, "float": 0.0, "str": "", "bool": False, "Path": pathlib.Path()}[self.kind]

    def validate(self, value):
        if self.kind == "node":
            if value is not None and not isinstance(value, self.type):
                raise TypeError(f"Value must be of type '{self.type}', is type '{type(value)}'")
        elif self.kind == "list":
            for v in value:
                self.element.validate(v)
        elif value is None:
            raise ValueError("Value must not be None")
        elif self.kind == "float" and not isinstance(value, (int, float)) or self.kind != "float" and not isinstance(value, self.type):
            raise TypeError(f"Value must be of type '{self.type}', is type '{type(value)}' value '{value}'")

    def isIn(self, node, name):
        return node.HasParameter(f"{name}_len" if self.kind == "list" else name)

    def write(self, node, name, value):
        self.validate(value)
        if self.kind == "list":
            old = int(node.GetParameter(f"{name}_len")) if node.HasParameter(f"{name}_len") else 0
            for index, v in enumerate(value):
                self.element.write(node, f"{name}_{index}", v)
            node.SetParameter(f"{name}_len", str(len(value)))
            for index in range(len(value), old):
                node.UnsetParameter(f"{name}_{index}")
        elif self.kind == "node":
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif self.kind == "bool":
            node.SetParameter(name, "True" if value else "False")
        else:
            node.SetParameter(name, str(value))

    def read(self, node, name):
        if self.kind == "list":
            return [self.element.read(node, f"{name}_{i}") for i in range(int(node.GetParameter(f"{name}_len") or 0))]
        if self.kind == "node":
            return node.GetNodeReference(name)
        if self.kind == "bool":
            return node.GetParameter(name) == "True"
        return self.type(node.GetParameter(name))


def _parameter_node_wrapper_module():
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(classtype=None):
        def wrap_class(cls):
            hints = typing.get_type_hints(cls)
            parameters = {}
            for name, type_ in hints.items():
                serializer = _Serializer(type_)
                default = getattr(cls, name) if hasattr(cls, name) else serializer.default()
                parameters[name] = (serializer, default)

                def get(self, name=name):
                    serializer, default = self.allParameters[name]
                    if not serializer.isIn(self.parameterNode, name):
                        serializer.write(self.parameterNode, name, default)
                    return serializer.read(self.parameterNode, name)

                def put(self, value, name=name):
                    with slicer.util.NodeModify(self.parameterNode):
                        self.allParameters[name][0].write(self.parameterNode, name, value)

                setattr(cls, name, property(get, put))

            def __init__(self, parameterNode, prefix=None):
                self.parameterNode = parameterNode
                for name, (serializer, default) in self.allParameters.items():
                    if not serializer.isIn(parameterNode, name):
                        serializer.write(parameterNode, name, default)

            def connectGui(self, gui):
                raise NotImplementedError("the parameterNodeWrapper stand-in binds no GUI (SegLens syncs its GUI itself)")

            cls.allParameters = parameters
            cls.__init__ = __init__
            cls.getValue = lambda self, name: getattr(self, name)
            cls.setValue = lambda self, name, value: setattr(self, name, value)
            cls.connectGui = connectGui
            cls.disconnectGui = lambda self, tag: None
            cls.StartModify = lambda self: self.parameterNode.StartModify()
            cls.EndModify = lambda self, wasModified: self.parameterNode.EndModify(wasModified)
            cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority)
            cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
            cls.Modified = lambda self: self.parameterNode.Modified()
            cls._is_parameter_node_wrapper = True
            return cls

        return wrap_class if classtype is None else wrap_class(classtype)

    module.parameterNodeWrapper = parameterNodeWrapper
    return module


# -- installing it ----------------------------------------------------------------------------------------------------------
class Recorder:
    """Message boxes the panel would show, and the answers to its questions."""

    def __init__(self):
        self.messages: list[tuple[str, str, dict]] = []  # (level, text, keyword arguments)
        self.questions: list[str] = []
        self.answer = True
        self.translated: list[tuple[str, str]] = []  # (context, source text) of every string sent to the translator

    def display(self, level):
        def show(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
            self.messages.append((level, text, kwargs))

        return show

    def ask(self, text, windowTitle=None, parent=None, **kwargs):
        self.questions.append(text)
        return self.answer(text) if callable(self.answer) else self.answer

    def errors(self):
        return [text for level, text, _ in self.messages if level == "error"]


def _qt_module():
    qt = types.ModuleType("qt")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if name.startswith("Q") and not hasattr(qt, name):
                attribute = getattr(module, name)
                setattr(qt, name, PythonQtClass(attribute) if isinstance(attribute, type) else attribute)
    qt.Qt = QtCore.Qt
    qt.QUiLoader = PythonQtClass(QtUiTools.QUiLoader, UiLoader)
    return qt


def _i18n_module(recorder):
    """``slicer.i18n`` (Slicer 5.3+): ``tr(text)`` translates in the calling file's context, ``translate(context,
    text)`` in a given one. No translation is loaded here: the English text comes back, and the request is recorded."""
    i18n = types.ModuleType("slicer.i18n")

    def translate(context, text):
        recorder.translated.append((context, text))
        return text

    def tr(text):
        caller = sys._getframe(1).f_code.co_filename
        return translate(os.path.splitext(os.path.basename(caller))[0], text)  # a module file without a package

    i18n.translate, i18n.tr = translate, tr
    return i18n


def _ctk_module():
    ctk = types.ModuleType("ctk")
    for name, cls in CUSTOM_WIDGETS.items():
        if name.startswith("ctk"):
            setattr(ctk, name, PythonQtClass(cls))
    return ctk


@contextlib.contextmanager
def installed(scene, module_file: str | os.PathLike, settings_folder: str | os.PathLike, version=(5, 10)):
    """Make ``import qt``, ``import ctk``, ``slicer.app``, ``slicer.ScriptedLoadableModule`` and
    ``slicer.parameterNodeWrapper`` work, with ``scene`` as ``slicer.mrmlScene``; yields ``(app, recorder)``.

    Everything patched is restored on exit (``sys.modules`` entries, ``slicer`` and ``slicer.util`` attributes).
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    qapp = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    QtCore.QCoreApplication.setOrganizationName("SegLensTests")
    QtCore.QCoreApplication.setApplicationName("SlicerStandIn")
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, str(settings_folder))
    app = Application(qapp, version)
    recorder = Recorder()
    module_file = os.fspath(module_file)
    modules = {"qt": _qt_module(), "ctk": _ctk_module(), "slicer.ScriptedLoadableModule": _scripted_loadable_module(),
               "slicer.parameterNodeWrapper": _parameter_node_wrapper_module(), "slicer.i18n": _i18n_module(recorder)}  # fmt: skip
    util_patches = {
        "errorDisplay": recorder.display("error"), "warningDisplay": recorder.display("warning"),
        "infoDisplay": recorder.display("info"), "confirmOkCancelDisplay": recorder.ask, "confirmYesNoDisplay": recorder.ask,
        "delayDisplay": lambda *a, **k: None, "mainWindow": lambda: None, "restart": app.restart,
        "modulePath": lambda name: module_file,
    }  # fmt: skip
    slicer_patches = {"app": app, "mrmlScene": scene, "ScriptedLoadableModule": modules["slicer.ScriptedLoadableModule"],
                      "parameterNodeWrapper": modules["slicer.parameterNodeWrapper"], "i18n": modules["slicer.i18n"],
                      **{name: PythonQtClass(cls) for name, cls in CUSTOM_WIDGETS.items() if name.startswith("q")}}  # fmt: skip
    saved_modules = {name: sys.modules.get(name) for name in modules}
    missing = object()
    slicer_patches["selfTests"] = {}
    saved_slicer = {name: getattr(slicer, name, missing) for name in slicer_patches}
    saved_util = {name: getattr(slicer.util, name, missing) for name in util_patches}
    sys.modules.update(modules)
    for name, value in slicer_patches.items():
        setattr(slicer, name, value)
    for name, value in util_patches.items():
        setattr(slicer.util, name, value)
    SLOT_ERRORS.clear()
    try:
        yield app, recorder
    finally:
        for name, value in saved_modules.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        for target, saved in ((slicer, saved_slicer), (slicer.util, saved_util)):
            for name, value in saved.items():
                if value is missing:
                    delattr(target, name)
                else:
                    setattr(target, name, value)
