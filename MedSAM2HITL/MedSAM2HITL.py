"""3D Slicer module MedSAM2HITL: the panel, its parameter node, and a thin adapter over MedSAM2HITLLib.

Everything that computes lives in the Qt-free `MedSAM2HITLLib` package (tested without Slicer); this file only
binds widgets, turns clicks into logic calls and shows results. torch and sam2 are never imported here: the
model runs in a background PythonSlicer process.
"""

import enum
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

README_URL = "https://github.com/medsam2hitl/SlicerMedSAM2HITL#readme"


class MedSAM2HITL(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSAM2 HITL")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAM2HITL developers (MedSAM2HITL project)"]
        self.parent.helpText = _(
            "Human-in-the-loop 3D segmentation with MedSAM2. Place a box ROI around an object on one slice, "
            "<b>Segment slice</b>, then <b>Propagate</b> through the volume; correct any slice with the Segment "
            "Editor and <b>Propagate from this slice</b>. Every result can be undone. Shortcuts: Shift+S segment "
            "slice, Shift+P propagate, Shift+F propagate from this slice. "
            'See the <a href="{url}">README</a> for installation, shortcuts and limitations.'
        ).format(url=README_URL)
        self.parent.acknowledgementText = _(
            "MedSAM2: Ma J, Yang Z, Kim S, Chen B, Baharoon M, Fallahpour A, Asakereh R, Lyu H, Wang B. "
            "MedSAM2: Segment Anything in 3D Medical Images and Videos. arXiv:2504.03600, 2025. "
            "MedSAM2 weights (wanglab/MedSAM2) are licensed CC-BY-SA-4.0; the MedSAM2 and SAM 2 code is Apache-2.0 "
            "(SAM 2: Meta AI). This extension is MIT-licensed."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A synthetic CT phantom in the Sample Data module, to try the module in one click."""
    import SampleData

    from MedSAM2HITLLib.sample_data import sample_source

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**sample_source())


class Choice(enum.Enum):
    """A combo-box option: `value` is what the library takes, `label()` what the user reads."""

    def __new__(cls, value, label):
        member = object.__new__(cls)
        member._value_ = value
        member._label = label
        return member

    def label(self):
        return self._label


class Axis(Choice):
    AXIAL = ("axial", _("Axial"))
    CORONAL = ("coronal", _("Coronal"))
    SAGITTAL = ("sagittal", _("Sagittal"))


class RangeMode(Choice):
    WHOLE = ("whole", _("Whole volume"))
    ROI = ("roi", _("ROI extent"))
    CUSTOM = ("custom", _("Slices below"))


def _ct_preset(name: str, label: str) -> tuple[str, str]:
    """A CT preset's option: the translated label, then the width and level of the library's one table."""
    from MedSAM2HITLLib.preprocessing import CT_PRESETS

    width, level = CT_PRESETS[name]
    return name, f"{label} (W{width:g} L{level:g})"


class Intensity(Choice):
    MR = ("mr", _("MR / other: automatic (0.5-99.5 percentile)"))
    ABDOMEN = _ct_preset("abdomen", _("CT abdomen"))
    LUNG = _ct_preset("lung", _("CT lung"))
    BRAIN = _ct_preset("brain", _("CT brain"))
    MEDIASTINUM = _ct_preset("mediastinum", _("CT mediastinum"))
    BONE = _ct_preset("bone", _("CT bone"))
    DISPLAY = ("display", _("Current display window/level"))


class Device(Choice):
    AUTO = ("auto", _("Auto (CUDA, MPS, CPU)"))
    CUDA = ("cuda", "CUDA")
    MPS = ("mps", "Apple MPS")
    CPU = ("cpu", "CPU")


class Precision(Choice):
    AUTO = ("auto", _("Auto (bfloat16 where as accurate and faster)"))
    FP32 = ("fp32", "float32")
    BF16 = ("bf16", "bfloat16")
    INT8 = ("int8", _("int8 image encoder (CPU)"))


@parameterNodeWrapper
class MedSAM2HITLParameterNode:
    """The panel's state, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    segmentId: str = ""
    roiNode: vtkMRMLMarkupsROINode
    pointsNode: vtkMRMLMarkupsFiducialNode
    axis: Axis = Axis.AXIAL
    rangeMode: RangeMode = RangeMode.WHOLE
    rangeStart: Annotated[int, Minimum(0)] = 0
    rangeEnd: Annotated[int, Minimum(0)] = 0
    intensity: Intensity = Intensity.MR
    checkpoint: str = "MedSAM2_latest"
    device: Device = Device.AUTO
    precision: Precision = Precision.AUTO
    largestComponent: bool = False
    earlyStop: bool = True


class MedSAM2HITLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Qt signals, timers and shortcuts bound to a `PanelController`, which decides what may run,
    which answers count and where the model runs (MedSAM2HITLLib/panel_controller.py, tested without Qt)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastSliceNode = None
        self._roiId = None  # the ROI the panel last showed: switching ROIs switches objects (segments)
        self._segmentationId = None  # the segmentation the panel last showed: another one starts a new history
        self._clickIsPositive = True  # the sign of the click being placed
        self._shortcuts = []
        self._timers = []
        self._watch = None
        self.segmentEditorWidget = None

    def setup(self) -> None:
        from MedSAM2HITLLib import compute_backend
        from MedSAM2HITLLib.checkpoints import REGISTRY
        from MedSAM2HITLLib.panel_controller import HISTORY_NOTICE, PanelController, SegmentationWatch, make_client
        from MedSAM2HITLLib.slicer_transport import slicer_transport_factory

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM2HITL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self._setupSegmentEditor()
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAM2HITLLogic()
        editor = self.segmentEditorWidget
        self.controller = PanelController(
            client_factory=lambda where, url, token: make_client(where, url, token, slicer_transport_factory()),
            editor_for=lambda segmentation: EmbeddedEditorHistory(editor, segmentation))
        self._watch = SegmentationWatch(self._updateButtons)  # results, paint strokes, the editor's undo/redo

        self.ui.checkpointComboBox.addItems(list(REGISTRY))
        self.ui.computeComboBox.addItem(_("This computer"), compute_backend.LOCAL)
        self.ui.computeComboBox.addItem(_("Server (inference service)"), compute_backend.SERVER)
        for widget in (self.ui.segmentSelector, self.ui.undoButton, self.ui.redoButton):
            widget.toolTip = HISTORY_NOTICE
        self._loadComputeSettings()
        self._updateCacheLabel()
        self.ui.progressBar.hide()
        self.ui.downloadProgressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair:
            self.addObserver(crosshair, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent, self.onCursorMoved)

        self.ui.placeRoiButton.clicked.connect(self.onPlaceRoi)
        for button, action in self._actionButtons():
            button.clicked.connect(lambda checked=False, action=action: self.onAction(action))
        self.ui.addPositiveClickButton.clicked.connect(lambda: self.onPlaceClick(True))
        self.ui.addNegativeClickButton.clicked.connect(lambda: self.onPlaceClick(False))
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.undoButton.clicked.connect(lambda: self.onHistory(self.controller.undo))
        self.ui.redoButton.clicked.connect(lambda: self.onHistory(self.controller.redo))
        self.ui.downloadButton.clicked.connect(self.onDownload)
        self.ui.removeCheckpointButton.clicked.connect(self.onRemoveCheckpoint)
        self.ui.browseCheckpointButton.clicked.connect(self.onBrowseCheckpoint)
        self.ui.stopWorkerButton.clicked.connect(self.onStopWorker)
        self.ui.checkpointComboBox.currentTextChanged.connect(self.onCheckpointEdited)
        self.ui.segmentSelector.currentSegmentChanged.connect(self.onSegmentSelected)
        self.ui.computeComboBox.currentIndexChanged.connect(self.onComputeEdited)
        self.ui.serverUrlLineEdit.editingFinished.connect(self.onComputeEdited)
        self.ui.serverTokenLineEdit.editingFinished.connect(self.onComputeEdited)
        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)

        # The service's replies wait in a queue until the main thread takes them; the tick polls the rest.
        for interval, slot in ((50, self.controller.pump), (250, self.onTick)):
            timer = qt.QTimer()
            timer.setInterval(interval)
            timer.timeout.connect(slot)
            timer.start()
            self._timers.append(timer)
        self.initializeParameterNode()
        if self.parent.isEntered:  # Reload calls setup() but not enter(): the shortcuts would be missing
            self.enter()

    def _actionButtons(self) -> list:
        """(button, the model action it starts)."""
        from MedSAM2HITLLib.panel_controller import Action

        return [(self.ui.segmentSliceButton, Action.SEGMENT), (self.ui.propagateButton, Action.PROPAGATE),
                (self.ui.propagateFromSliceButton, Action.PROPAGATE_FROM_SLICE),
                (self.ui.propagateAllButton, Action.PROPAGATE_ALL)]

    def cleanup(self) -> None:
        """Reload or exit: the request and worker first (late answers are dropped), then the embedded editor,
        whose shortcuts and view observations would otherwise outlive this panel."""
        if self.controller:
            self.controller.close()
        for timer in self._timers:
            timer.stop()
        self.removeObservers()
        self._removeShortcuts()
        if self._watch:
            self._watch.release()
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        editor = self.segmentEditorWidget
        if editor:
            editor.uninstallKeyboardShortcuts()
            editor.removeViewObservations()
            editor.setActiveEffect(None)
            editor.setMRMLSegmentEditorNode(None)
            editor.setMRMLScene(None)

    def onReload(self) -> None:
        """Reload re-imports MedSAM2HITLLib too: Slicer's Reload re-runs only this file."""
        for name in [n for n in sys.modules if n == "MedSAM2HITLLib" or n.startswith("MedSAM2HITLLib.")]:
            del sys.modules[name]
        super().onReload()

    def enter(self) -> None:
        self._selectSegmentEditorNode()
        self.initializeParameterNode()
        self._installShortcuts()
        self.segmentEditorWidget.installKeyboardShortcuts()
        self.segmentEditorWidget.setupViewObservations()

    def exit(self) -> None:
        self._removeShortcuts()
        self.segmentEditorWidget.setActiveEffect(None)
        self.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.segmentEditorWidget.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        """Stop what runs on the closing scene while its nodes still exist; the undo histories go."""
        self.controller.scene_closing()
        self.setParameterNode(None)
        self._watch.release()
        self.segmentEditorWidget.setSegmentationNode(None)
        self.ui.progressBar.hide()

    def onSceneEndClose(self, caller, event) -> None:
        self._selectSegmentEditorNode()
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- the embedded Segment Editor -------------------------------------------------------------------------

    def _setupSegmentEditor(self) -> None:
        """Corrections without leaving the module; its parameter node is set before the scene, as Slicer asks."""
        import qSlicerSegmentationsModuleWidgetsPythonQt

        self.segmentEditorWidget = qSlicerSegmentationsModuleWidgetsPythonQt.qMRMLSegmentEditorWidget()
        self.segmentEditorWidget.setMaximumNumberOfUndoStates(30)
        self.segmentEditorWidget.setSegmentationNodeSelectorVisible(False)  # the panel's Inputs choose them
        self.segmentEditorWidget.setSourceVolumeNodeSelectorVisible(False)
        self._selectSegmentEditorNode()
        self.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.correctCollapsibleButton.layout().addWidget(self.segmentEditorWidget)

    def _selectSegmentEditorNode(self) -> None:
        tag = "MedSAM2HITL"
        node = slicer.mrmlScene.GetSingletonNode(tag, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(tag)
            node = slicer.mrmlScene.AddNode(node)
        if self.segmentEditorWidget.mrmlSegmentEditorNode() != node:
            self.segmentEditorWidget.setMRMLSegmentEditorNode(node)

    def _showInSegmentEditor(self, p) -> None:
        if self.segmentEditorWidget.segmentationNode() != p.segmentationNode:
            self.segmentEditorWidget.setSegmentationNode(p.segmentationNode)
        if p.inputVolume and self.segmentEditorWidget.sourceVolumeNode() != p.inputVolume:
            self.segmentEditorWidget.setSourceVolumeNode(p.inputVolume)
        if p.segmentId and self.segmentEditorWidget.currentSegmentID() != p.segmentId:
            self.segmentEditorWidget.setCurrentSegmentID(p.segmentId)

    # --- parameter node -------------------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        """The parts the wrapper cannot bind: segment selector, free-text checkpoint, enabled states."""
        p = self._parameterNode
        if not p:
            return
        roiId = p.roiNode.GetID() if p.roiNode else None
        if roiId != self._roiId:
            switched = self._roiId is not None
            self._roiId = roiId
            if switched and p.segmentationNode:  # one object per ROI: its segment is the one named after it
                segmentation = p.segmentationNode.GetSegmentation()
                p.segmentId = segmentation.GetSegmentIdBySegmentName(p.roiNode.GetName()) if p.roiNode else ""
            if switched:  # ... and its clicks the point list named after it
                name = f"{p.roiNode.GetName()} clicks" if p.roiNode else None
                p.pointsNode = slicer.mrmlScene.GetFirstNode(name, "vtkMRMLMarkupsFiducialNode") if name else None
        segmentationId = p.segmentationNode.GetID() if p.segmentationNode else None
        if segmentationId != self._segmentationId:
            from MedSAM2HITLLib.panel_controller import HISTORY_CLEARED

            if self._segmentationId is not None and self.controller.can_undo(self._watch.node):
                self._setStatus(HISTORY_CLEARED)
            self._segmentationId = segmentationId
        self._watch.watch(p.segmentationNode)
        self.ui.segmentSelector.setCurrentNode(p.segmentationNode)
        self._showInSegmentEditor(p)
        if p.segmentId and self.ui.segmentSelector.currentSegmentID() != p.segmentId:
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        if self.ui.checkpointComboBox.currentText != p.checkpoint:
            self.ui.checkpointComboBox.setCurrentText(p.checkpoint)
        custom = p.rangeMode == RangeMode.CUSTOM
        self.ui.rangeStartSpinBox.enabled = custom
        self.ui.rangeEndSpinBox.enabled = custom
        self.ui.earlyStopCheckBox.enabled = not custom  # a custom range is followed exactly
        self._updateButtons()

    def _updateButtons(self) -> None:
        """Enabled states from the controller's one rule (the shortcuts ask the same); never starts anything."""
        from MedSAM2HITLLib.panel_controller import Action

        p, allowed = self._parameterNode, self.controller.allowed
        for button, action in self._actionButtons():
            button.enabled = allowed(action, p)
        self.ui.placeRoiButton.enabled = allowed(Action.PLACE_ROI, p)
        self.ui.addPositiveClickButton.enabled = self.ui.addNegativeClickButton.enabled = allowed(Action.CLICK, p)
        self.ui.cancelButton.enabled = allowed(Action.CANCEL, p)
        self.ui.undoButton.enabled = allowed(Action.UNDO, p)
        self.ui.redoButton.enabled = allowed(Action.REDO, p)
        self.ui.computeCollapsibleButton.enabled = allowed(Action.COMPUTE, p)  # switching waits for the result
        self.ui.testConnectionButton.text = (_("Test connection") if allowed(Action.TEST_CONNECTION, p)
                                             else _("Testing..."))
        self.ui.downloadButton.text = _("Cancel download") if self.controller.download else _("Download")
        self.ui.sliceSourcesLabel.text = self.controller.describe_slice_sources(p)

    def onSegmentSelected(self, segmentId) -> None:
        if self._parameterNode and self._parameterNode.segmentId != (segmentId or ""):
            self._parameterNode.segmentId = segmentId or ""

    def onCheckpointEdited(self, text) -> None:
        if self._parameterNode and text and self._parameterNode.checkpoint != text:
            self._parameterNode.checkpoint = text

    # --- compute: this computer or the service ---------------------------------------------------------------

    def _loadComputeSettings(self) -> None:
        """Compute choice, URL and token come from Slicer's settings (per user and computer), never the scene."""
        from MedSAM2HITLLib.compute_backend import LOCAL, SETTINGS_KEYS

        settings = qt.QSettings()
        index = self.ui.computeComboBox.findData(settings.value(SETTINGS_KEYS["compute"], LOCAL))
        self.ui.computeComboBox.setCurrentIndex(max(index, 0))
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS_KEYS["url"], "")
        self.ui.serverTokenLineEdit.text = settings.value(SETTINGS_KEYS["token"], "")
        self._applyCompute()

    def onComputeEdited(self, *unused) -> None:
        from MedSAM2HITLLib.compute_backend import SETTINGS_KEYS

        settings = qt.QSettings()
        settings.setValue(SETTINGS_KEYS["compute"], self.ui.computeComboBox.currentData)
        settings.setValue(SETTINGS_KEYS["url"], self.ui.serverUrlLineEdit.text.strip())
        settings.setValue(SETTINGS_KEYS["token"], self.ui.serverTokenLineEdit.text.strip())
        self._applyCompute()

    def _applyCompute(self) -> None:
        """Switch where the next request runs (a URL that cannot work is reported in the status line and the
        current client stays); settings that only apply locally grey out."""
        from MedSAM2HITLLib.compute_backend import SERVER

        server = self.ui.computeComboBox.currentData == SERVER
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.testConnectionButton):
            widget.enabled = server
        for widget in (self.ui.checkpointRow, self.ui.deviceComboBox, self.ui.precisionComboBox):
            widget.enabled = not server
        self.ui.serverInfoLabel.text = ""
        try:
            self.controller.set_compute(self.ui.computeComboBox.currentData, self.ui.serverUrlLineEdit.text.strip(),
                                        self.ui.serverTokenLineEdit.text.strip())
        except ValueError as error:  # BadInputError: said where the user looks, without a dialog per keystroke
            self._setStatus(_("Failed: {message}").format(message=error))

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to reach the inference service.")):
            self.ui.serverInfoLabel.text = ""
            if self.controller.test_connection(self.ui.serverUrlLineEdit.text.strip(),
                                               self.ui.serverTokenLineEdit.text.strip()):
                self._setStatus(_("Asking the inference service..."))
            self._updateButtons()

    def _showConnection(self, answer) -> None:
        if answer.error:
            self.ui.serverInfoLabel.text = answer.error
            self._setStatus(_("Failed to reach the inference service: {message}").format(message=answer.error))
            return
        warning = [_("Warning: {text}").format(text=answer.warning)] if answer.warning else []
        self.ui.serverInfoLabel.text = "\n".join(answer.lines + warning)
        self._setStatus(_("Connected: {line}").format(line=answer.lines[0]))

    # --- slice views ----------------------------------------------------------------------------------------

    def onCursorMoved(self, crosshair, event) -> None:
        """Remember the slice view under the mouse: it decides the axis and the current slice."""
        sliceNode = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0])
        if sliceNode:
            self._lastSliceNode = sliceNode

    def _followView(self) -> None:
        """Set the axis to the orientation of the slice view the user works in (reformatted views: unchanged)."""
        orientation = self._lastSliceNode.GetOrientation().lower() if self._lastSliceNode else ""
        if self._parameterNode and orientation in {a.value for a in Axis}:
            self._parameterNode.axis = Axis(orientation)

    def _sliceNodeForAxis(self):
        """The slice view showing the current axis: the one last used if it matches, else the first such view."""
        wanted = self._parameterNode.axis.value
        if self._lastSliceNode and self._lastSliceNode.GetOrientation().lower() == wanted:
            return self._lastSliceNode
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            if sliceNode.GetOrientation().lower() == wanted:
                return sliceNode
        raise ValueError(_("No slice view shows the {axis} orientation: set a view to it first.").format(axis=wanted))

    def _shownSliceNode(self):
        """The view of the current axis, whose slice is encoded while the user places a prompt; None without one
        (encoding ahead only saves time, it is never a reason to fail)."""
        try:
            return self._sliceNodeForAxis()
        except ValueError:
            return None

    # --- shortcuts ------------------------------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        from MedSAM2HITLLib.panel_controller import Action

        mainWindow = slicer.util.mainWindow()
        if self._shortcuts or not mainWindow:
            return
        for keys, action in (("Shift+S", Action.SEGMENT), ("Shift+P", Action.PROPAGATE),
                             ("Shift+F", Action.PROPAGATE_FROM_SLICE)):
            shortcut = qt.QShortcut(mainWindow)
            shortcut.setKey(qt.QKeySequence(keys))
            shortcut.connect("activated()", lambda action=action: self.onAction(action, fromShortcut=True))
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []

    # --- actions --------------------------------------------------------------------------------------------

    def onPlaceRoi(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start placing an ROI."), waitCursor=True):
            roi = self.controller.start_roi_placement(slicer.mrmlScene, self._parameterNode, self._shownSliceNode())
            self.addObserver(roi, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onRoiPlaced)
            self._parameterNode.segmentId = ""  # a new ROI is a new object: its own segment, named after it
            self._parameterNode.roiNode = roi
            self._setStatus(_("Click two opposite corners of a box around the object in a slice view."))

    def onRoiPlaced(self, roi, event) -> None:
        """Each click: the view clicked in sets the axis. The second corner completes the box."""
        self._followView()
        if all(size > 0 for size in roi.GetSize()):
            self.removeObserver(roi, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onRoiPlaced)
            self._setStatus(_("ROI placed; axis: {axis}.").format(axis=self._parameterNode.axis.label()))

    def onPlaceClick(self, positive: bool) -> None:
        """One click in a view: a positive or negative point of the object, then its slice is segmented again."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start placing a click."), waitCursor=True):
            points = self.controller.start_click_placement(self._parameterNode, self._shownSliceNode())
            self.removeObserver(points, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClickPlaced)
            self.addObserver(points, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClickPlaced)
            self._clickIsPositive = positive
            self._setStatus(_("Click on what belongs to the object.") if positive else
                            _("Click on what the mask should leave out."))

    def onClickPlaced(self, points, event) -> None:
        from MedSAM2HITLLib.panel_controller import Action

        self.removeObserver(points, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClickPlaced)
        self._followView()
        last = points.GetNumberOfControlPoints() - 1
        points.SetNthControlPointLabel(last, "+" if self._clickIsPositive else "-")
        self.onAction(Action.CLICK)

    def onAction(self, action, fromShortcut: bool = False) -> None:
        """A model action from its button, its shortcut or a click: one rule decides whether it may run now."""
        from MedSAM2HITLLib import panel_controller
        from MedSAM2HITLLib.panel_controller import Action

        p = self._parameterNode
        if not self.controller.allowed(action, p):
            self._setStatus(_("Busy: wait for the running request or cancel it.") if self.controller.busy else
                            _("{action}: select what it needs first (volume, ROI or segment).").format(
                                action=action.value.capitalize()))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed: {action}.").format(action=action.value), waitCursor=True):
            if fromShortcut:
                self._followView()  # a shortcut is pressed with the mouse over the view the user works in
            keyIndex = None
            if action == Action.PROPAGATE_FROM_SLICE:
                keyIndex = panel_controller.slice_index_in_view(p, self._sliceNodeForAxis())
            started = self.controller.start(action, p, on_done=self._onDone, on_error=self._onError,
                                            on_progress=self._onProgress, key_index=keyIndex)
            if started and self.controller.busy:  # not when it failed at once (its error is shown already)
                self.ui.progressBar.setRange(0, 0)
                self.ui.progressBar.show()
                self._setStatus(_("Running... (the first request also starts the worker and loads the model)"))
            self._updateButtons()

    def onCancel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to cancel.")):
            if self.controller.cancel():
                self._setStatus(_("Cancelling..."))

    def onHistory(self, step) -> None:
        """Undo or redo one action on the panel's segmentation (one stack with the embedded Segment Editor)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to undo or redo.")):
            step(self._parameterNode.segmentationNode)
            self._updateButtons()

    def onStopWorker(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to stop the worker.")):
            self.controller.stop_worker()  # at once; what was running is abandoned and its late answer dropped
            self.ui.progressBar.hide()
            self._updateButtons()
            self._setStatus(_("Worker stopped; it restarts on the next action."))

    def onRemoveCheckpoint(self) -> None:
        from MedSAM2HITLLib.checkpoints import REGISTRY, cache_dir, remove_cached

        name = self._parameterNode.checkpoint
        with slicer.util.tryWithErrorDisplay(_("Failed to remove the checkpoint."), waitCursor=True):
            if name not in REGISTRY:
                raise ValueError(_("'{name}' is a file of yours, not a downloaded checkpoint: it is left "
                                   "alone.").format(name=name))
            if not slicer.util.confirmOkCancelDisplay(
                    _("Delete the downloaded checkpoint {name} from {folder}?").format(name=name, folder=cache_dir())):
                return
            freed = remove_cached(name)
            self._setStatus(_("Removed {name}: {megabytes:.0f} MB freed.").format(name=name, megabytes=freed / 1e6))
            self._updateCacheLabel()

    def _updateCacheLabel(self) -> None:
        from MedSAM2HITLLib.checkpoints import cache_dir, cache_size

        self.ui.cacheLabel.text = _("cache: {megabytes:.0f} MB").format(megabytes=cache_size() / 1e6)
        self.ui.cacheLabel.toolTip = str(cache_dir())

    def onBrowseCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Choose a checkpoint"), "", _("PyTorch checkpoint (*.pt *.pth);;All files (*)"))
        if path:
            self._parameterNode.checkpoint = path

    def onDownload(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to download the checkpoint.")):
            if self.controller.download:
                self.controller.download.cancel()
                return
            self.controller.start_download(self._parameterNode.checkpoint)
            self.ui.downloadProgressBar.setRange(0, 0)
            self.ui.downloadProgressBar.show()
            self._updateButtons()

    # --- answers ----------------------------------------------------------------------------------------------

    def _onDone(self, result, seconds) -> None:
        self.ui.progressBar.hide()
        self._updateButtons()
        if isinstance(result, tuple):  # (segmentation, segment ID) of a slice
            self._setStatus(_("Segmented the key slice in {seconds:.2f} s.").format(seconds=seconds))
            return
        slices = len(result) if isinstance(result, list) else sum(len(w) for w in result.values())
        counts = dict(count=slices, seconds=seconds, perSlice=seconds / slices if slices else 0.0)
        if self.controller.early_end:  # e.g. "done at slice 48 (forward): the object ended"
            self._setStatus(_("Propagated {count} slices in {seconds:.1f} s ({perSlice:.2f} s/slice), {end}.").format(
                end=self.controller.early_end, **counts))
            return
        self._setStatus(_("Propagated {count} slices in {seconds:.1f} s ({perSlice:.2f} s/slice).").format(**counts))

    def _onProgress(self, completed, total) -> None:
        self.ui.progressBar.setRange(0, total)
        self.ui.progressBar.setValue(completed)
        self._setStatus(_("Propagating: {done}/{total} slices").format(done=completed, total=total))

    def _onError(self, error, seconds) -> None:
        self.ui.progressBar.hide()
        self._updateButtons()
        if getattr(error, "kind", "") == "cancelled":
            self._setStatus(_("Cancelled: {message}. Slices already written are kept; Undo removes them.").format(
                message=error))
            return
        self._setStatus(_("Failed: {message}").format(message=error))
        slicer.util.errorDisplay(_("MedSAM2 failed: {message}").format(message=error))

    def _setStatus(self, text) -> None:
        self.ui.statusLabel.text = text
        logging.info("MedSAM2HITL: %s", text)

    def onTick(self) -> None:
        """Poll what has no callback: the worker state, the Test connection answer and a running download."""
        self.ui.workerStateLabel.text = self.controller.worker_state()
        answer = self.controller.poll_connection()
        if answer:
            self._showConnection(answer)
            self._updateButtons()
        job = self.controller.download
        if job and job.total:
            self.ui.downloadProgressBar.setRange(0, 1000)
            self.ui.downloadProgressBar.setValue(int(1000 * job.received / job.total))
        job = self.controller.poll_download()
        if not job:
            return
        self.ui.downloadProgressBar.hide()
        self._updateButtons()
        if job.error:
            self._setStatus(_("Download stopped: {message}").format(message=job.error))
            if getattr(job.error, "kind", "") != "cancelled":
                slicer.util.errorDisplay(_("Download failed: {message}").format(message=job.error))
        else:
            self._setStatus(_("Checkpoint ready: {path}").format(path=job.path))
        self._updateCacheLabel()


class MedSAM2HITLLogic(ScriptedLoadableModuleLogic):
    """The panel's parameter node; requests go through the panel's `PanelController`."""

    def getParameterNode(self):
        return MedSAM2HITLParameterNode(super().getParameterNode())


class EmbeddedEditorHistory:
    """The panel's Segment Editor as the history of one segmentation, in the calls the library makes
    (vtkSlicerSegmentEditorLogic's names): the editor's own Undo and the panel's Undo use one stack."""

    def __init__(self, editor, segmentationNode):
        self.editor, self.segmentationNode = editor, segmentationNode

    def _showing(self) -> bool:
        return self.editor.segmentationNode() == self.segmentationNode

    def SaveStateForUndo(self) -> None:
        if not self._showing():
            self.editor.setSegmentationNode(self.segmentationNode)
        self.editor.saveStateForUndo()

    def CanUndo(self) -> bool:  # the editor enables its Undo button exactly when its logic CanUndo()
        return self._showing() and slicer.util.findChild(self.editor, "UndoButton").enabled

    def CanRedo(self) -> bool:
        return self._showing() and slicer.util.findChild(self.editor, "RedoButton").enabled

    def Undo(self) -> None:
        self.editor.undo()

    def Redo(self) -> None:
        self.editor.redo()


class MedSAM2HITLTest(ScriptedLoadableModuleTest):
    """The panel end to end inside Slicer: ROI, Segment slice, Propagate, Cancel, Undo/Redo, Stop worker."""

    TIMEOUT = 300.0

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from MedSAM2HITLLib.dependencies import self_test_skip_reason

        reason = self_test_skip_reason()
        if reason:  # an extension build machine has neither; installing is refused in testing mode
            self.skipTest(reason)
        self.setUp()
        self.test_panel_end_to_end()

    @staticmethod
    def _sourceTree():
        """The repository holding the fixtures: given by ctest, or the one this file lies in (development)."""
        given = os.environ.get("MEDSAM2HITL_SOURCE_DIR")
        for root in ([Path(given)] if given else []) + [Path(__file__).resolve().parents[1]]:
            if (root / "Testing" / "Data" / "phantom_sam2.pt").is_file():
                return root
        return None

    def _randomCheckpoint(self):
        """The fixture's model family at random init, for installed extensions that have no fixture.

        Built by PythonSlicer in a process of its own: torch never loads into Slicer's GUI process.
        """
        import subprocess

        self.delayDisplay("Fixture checkpoint not found: building a random-init one (structure checks only)")
        from MedSAM2HITLLib import dependencies

        dependencies.ensure()
        folder = Path(slicer.app.temporaryPath) / "MedSAM2HITLTest"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "random.pt"
        script = ("import sys; sys.path.insert(0, sys.argv[1]); from MedSAM2HITLLib.model import "
                  "save_random_checkpoint; save_random_checkpoint(sys.argv[2], image_size=128)")
        made = subprocess.run(["PythonSlicer", "-c", script, str(Path(__file__).parent), str(path)],
                              capture_output=True, text=True, timeout=self.TIMEOUT)
        self.assertEqual(made.returncode, 0, f"building the random checkpoint failed: {made.stderr[-2000:]}")
        return path

    def _wait(self, widget):
        deadline = time.monotonic() + self.TIMEOUT
        while widget.controller.busy:
            self.assertLess(time.monotonic(), deadline, "the worker did not answer in time")
            slicer.app.processEvents()
            time.sleep(0.02)

    @staticmethod
    def _phantom(sourceTree):
        """Volume [k, j, i], true mask, key slice and its box (x_min, y_min, x_max, y_max).

        With the source tree: a held-out phantom of the project's generator (all the fixture model knows).
        Without: a CT-like block with a bright ellipsoid on slices 7..24.
        """
        import numpy as np

        if sourceTree:
            sys.path.insert(0, str(sourceTree / "Testing" / "Training"))
            import phantoms

            phantom = phantoms.make_phantom(1_000_003, modality="ct")
            return phantom.volume, phantom.mask, phantom.key_index, phantom.box()
        k, j, i = np.mgrid[0:32, 0:64, 0:64]
        truth = ((k - 15.5) / 8.5) ** 2 + ((j - 30) / 12.0) ** 2 + ((i - 34) / 10.0) ** 2 <= 1.0
        array = (40 + 10 * np.random.default_rng(0).standard_normal(truth.shape) + 160 * truth).astype(np.int16)
        return array, truth, 16, (24, 18, 44, 42)

    def _reference(self, checkpoint, array, key, box, first, last):
        """What the engine answers for the same inputs in a worker of its own, asked for voxel boxes directly.
        The panel must agree with it, whatever the model's quality: a flip, transpose or off-by-one anywhere
        in ROI → box → slice → segment would break the agreement. torch stays out of Slicer's process."""
        import numpy as np

        from MedSAM2HITLLib.slicer_transport import slicer_transport_factory
        from MedSAM2HITLLib.worker_client import WorkerClient

        client = WorkerClient(transport_factory=slicer_transport_factory())
        mask3d = np.zeros(array.shape, bool)

        def keep(item):
            mask3d[item.index] = item.mask

        try:
            client.load_model(checkpoint, device="cpu").wait(self.TIMEOUT)
            client.set_volume("reference", array).wait(self.TIMEOUT)
            mask2d = client.segment_slice("reference", 0, key, box, window="abdomen").wait(self.TIMEOUT)
            client.propagate("reference", 0, key, box, first, last, "abdomen", on_slice=keep).wait(self.TIMEOUT)
        finally:
            client.shutdown()
        return mask2d, mask3d

    def _segmentArray(self, p):
        return slicer.util.arrayFromSegmentBinaryLabelmap(p.segmentationNode, p.segmentId, p.inputVolume).astype(bool)

    def test_panel_end_to_end(self):
        import numpy as np

        sourceTree = self._sourceTree()
        checkpoint = sourceTree / "Testing" / "Data" / "phantom_sam2.pt" if sourceTree else self._randomCheckpoint()
        accurate = sourceTree is not None  # a random model only allows structure checks
        array, truth, key, (x0, y0, x1, y1) = self._phantom(sourceTree)
        first, last = max(key - 6, 0), min(key + 6, array.shape[0] - 1)
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=np.eye(4), name="MedSAM2HITLTestPhantom")
        before = array.copy()
        slicer.util.selectModule("MedSAM2HITL")
        widget = slicer.modules.medsam2hitl.widgetRepresentation().self()
        p = widget._parameterNode
        p.inputVolume = volume
        p.checkpoint = str(checkpoint)
        p.device = Device.CPU
        p.intensity = Intensity.ABDOMEN
        p.axis = Axis.AXIAL

        widget.ui.placeRoiButton.click()  # creates an ROI and enters place mode, as for a user
        roi = p.roiNode
        self.assertIsNotNone(roi)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        self.assertEqual(interaction.GetCurrentInteractionMode(), interaction.Place)
        selection = slicer.app.applicationLogic().GetSelectionNode()  # the next clicks go to this ROI
        self.assertEqual(selection.GetActivePlaceNodeClassName(), "vtkMRMLMarkupsROINode")
        self.assertEqual(selection.GetActivePlaceNodeID(), roi.GetID())
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        # Identity IJK->RAS: (x, y, z) = (i, j, k). The box plus one voxel each side, one slice thick.
        roi.SetCenter((x0 + x1) / 2, (y0 + y1) / 2, float(key))
        roi.SetSize(x1 - x0 + 2.0, y1 - y0 + 2.0, 1.0)

        def dice(a, b):
            return 1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum())

        reference2d, reference3d = self._reference(checkpoint, array, key, (x0 - 1, y0 - 1, x1 + 1, y1 + 1), first, last)
        widget.ui.segmentSliceButton.click()
        self._wait(widget)
        self.assertTrue(p.segmentationNode and p.segmentId, widget.ui.statusLabel.text)
        mask2d = self._segmentArray(p)
        self.assertEqual(sorted(set(np.nonzero(mask2d)[0])), [key], "only the key slice may change")
        self.assertGreater(dice(mask2d[key], reference2d), 0.98, "the panel's mask differs from the engine's")
        if accurate:  # the phantom-trained model finds the object (a flipped or shifted mask would not)
            self.assertGreater(dice(mask2d[key], truth[key]), 0.8)  # the engine: 0.96 on these inputs

        p.rangeMode = RangeMode.CUSTOM
        p.rangeStart, p.rangeEnd = first, last
        widget.ui.propagateButton.click()
        self._wait(widget)
        mask3d = self._segmentArray(p)
        changed = sorted(set(np.nonzero(mask3d)[0]))
        self.assertTrue(changed and changed[0] >= first and changed[-1] <= last, f"outside {first}..{last}: {changed}")
        self.assertGreater(dice(mask3d, reference3d), 0.95, "the panel's propagation differs from the engine's")
        if accurate:
            self.assertGreater(dice(mask3d[first:last + 1], truth[first:last + 1]), 0.8)  # the engine: 0.95
        self.assertIn(f"yours: {key} ", widget.ui.sliceSourcesLabel.text)  # the box's slice is the user's

        widget.ui.addNegativeClickButton.click()  # the object's point list, created and waiting for one click
        self.assertIsNotNone(p.pointsNode)
        self.assertEqual(selection.GetActivePlaceNodeClassName(), "vtkMRMLMarkupsFiducialNode")
        self.assertEqual(selection.GetActivePlaceNodeID(), p.pointsNode.GetID())
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)

        widget.ui.undoButton.click()
        np.testing.assert_array_equal(self._segmentArray(p), mask2d)
        widget.ui.redoButton.click()
        np.testing.assert_array_equal(self._segmentArray(p), mask3d)

        # A user corrects a slice by hand, shows it in the Red view and propagates from it: the corrected mask
        # is the prompt and stays exactly as drawn; one Undo returns to the corrected state.
        fixed = key - 3
        corrected = mask3d.copy()
        corrected[fixed] = truth[fixed]
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            corrected.astype(np.uint8), p.segmentationNode, p.segmentId, volume)
        slicer.app.layoutManager().sliceWidget("Red").sliceLogic().SetSliceOffset(float(fixed))
        widget.ui.propagateFromSliceButton.click()
        self._wait(widget)
        fromSlice = self._segmentArray(p)
        np.testing.assert_array_equal(fromSlice[fixed], truth[fixed])
        changed = np.nonzero((fromSlice != corrected).any(axis=(1, 2)))[0]
        self.assertTrue(all(first <= k <= last for k in changed), f"outside {first}..{last}: {changed}")
        widget.ui.undoButton.click()
        np.testing.assert_array_equal(self._segmentArray(p), corrected)

        # Cancel right away: the slices written before the cancel landed (maybe none) go with one Undo.
        p.rangeMode = RangeMode.WHOLE
        widget.ui.propagateButton.click()
        self.assertTrue(widget.controller.busy, f"propagation did not start: {widget.ui.statusLabel.text}")
        request = widget.controller.running.request
        widget.ui.cancelButton.click()
        self._wait(widget)
        cancelled = getattr(request.error, "kind", "") == "cancelled"
        self.assertTrue(cancelled or request.error is None, f"unexpected failure: {request.error}")
        if not (cancelled and not request.error.completed):
            widget.ui.undoButton.click()
        np.testing.assert_array_equal(self._segmentArray(p), corrected)

        widget.ui.stopWorkerButton.click()
        self.assertEqual(widget.controller.worker_state(), "stopped")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)
        self.delayDisplay("Test passed")
