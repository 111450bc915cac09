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


class Intensity(Choice):
    MR = ("mr", _("MR / other: automatic (0.5-99.5 percentile)"))
    ABDOMEN = ("abdomen", _("CT abdomen (W400 L40)"))
    LUNG = ("lung", _("CT lung (W1500 L-600)"))
    BRAIN = ("brain", _("CT brain (W80 L40)"))
    MEDIASTINUM = ("mediastinum", _("CT mediastinum (W350 L50)"))
    BONE = ("bone", _("CT bone (W1800 L400)"))
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


class MedSAM2HITLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Long work runs in the worker process; callbacks arrive on the main thread."""

    SHORTCUTS = (("Shift+S", "onSegmentSlice"), ("Shift+P", "onPropagate"), ("Shift+F", "onPropagateFromSlice"))

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastSliceNode = None
        self._roiId = None  # the ROI the panel last showed: switching ROIs switches objects (segments)
        self._clickIsPositive = True  # the sign of the click being placed
        self._shortcuts = []
        self._running = None  # (token, start time, request) while a request is in flight
        self._download = None
        self._timer = None
        self._pumpTimer = None
        self.segmentEditorWidget = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM2HITL.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self._setupSegmentEditor()
        uiWidget.setMRMLScene(slicer.mrmlScene)
        editor = self.segmentEditorWidget
        self.logic = MedSAM2HITLLogic(editorFor=lambda segmentation: EmbeddedEditorHistory(editor, segmentation))

        from MedSAM2HITLLib import compute_backend
        from MedSAM2HITLLib.checkpoints import REGISTRY

        self.ui.checkpointComboBox.addItems(list(REGISTRY))
        self.ui.computeComboBox.addItem(_("This computer"), compute_backend.LOCAL)
        self.ui.computeComboBox.addItem(_("Server (inference service)"), compute_backend.SERVER)
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
        self.ui.segmentSliceButton.clicked.connect(self.onSegmentSlice)
        self.ui.propagateButton.clicked.connect(self.onPropagate)
        self.ui.propagateFromSliceButton.clicked.connect(self.onPropagateFromSlice)
        self.ui.propagateAllButton.clicked.connect(self.onPropagateAll)
        self.ui.addPositiveClickButton.clicked.connect(lambda: self.onPlaceClick(True))
        self.ui.addNegativeClickButton.clicked.connect(lambda: self.onPlaceClick(False))
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.undoButton.clicked.connect(lambda: self.onHistory(self.logic.undo))
        self.ui.redoButton.clicked.connect(lambda: self.onHistory(self.logic.redo))
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

        self._pumpTimer = qt.QTimer()  # the service's replies wait in a queue until the main thread takes them
        self._pumpTimer.setInterval(50)
        self._pumpTimer.timeout.connect(self.logic.pump)
        self._pumpTimer.start()
        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.timeout.connect(self.onTick)
        self._timer.start()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._removeShortcuts()
        if self._timer:
            self._timer.stop()
        if self._pumpTimer:
            self._pumpTimer.stop()
        if self._download:
            self._download.cancel()
        if self.logic:
            self.logic.stopWorker(atOnce=True)  # Slicer is closing or reloading the module: do not wait

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
        """Stop what runs on the closing scene; the worker drops its volumes and the undo histories go."""
        self.setParameterNode(None)
        self.segmentEditorWidget.setSegmentationNode(None)
        if self._running:
            self.logic.cancel()
            self._finish()  # the cancelled request's late answer is ignored
        self.logic.forgetScene()

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
        self.ui.segmentSelector.setCurrentNode(p.segmentationNode)
        self._showInSegmentEditor(p)
        if p.segmentId and self.ui.segmentSelector.currentSegmentID() != p.segmentId:
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        if self.ui.checkpointComboBox.currentText != p.checkpoint:
            self.ui.checkpointComboBox.setCurrentText(p.checkpoint)
        custom = p.rangeMode == RangeMode.CUSTOM
        self.ui.rangeStartSpinBox.enabled = custom
        self.ui.rangeEndSpinBox.enabled = custom
        self._updateButtons()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        idle = self._running is None
        hasVolume = bool(p and p.inputVolume)
        hasRoi = bool(hasVolume and p.roiNode)
        hasSegment = bool(hasVolume and p.segmentationNode and p.segmentId)
        self.ui.segmentSliceButton.enabled = idle and hasRoi
        self.ui.propagateButton.enabled = idle and hasRoi
        self.ui.propagateFromSliceButton.enabled = idle and hasSegment
        self.ui.propagateAllButton.enabled = idle and hasVolume and bool(p.segmentationNode)
        self.ui.addPositiveClickButton.enabled = self.ui.addNegativeClickButton.enabled = idle and hasVolume
        self.ui.cancelButton.enabled = not idle
        self.ui.computeCollapsibleButton.enabled = idle  # switching where the model runs waits for the result
        segmentation = p.segmentationNode if p else None
        self.ui.undoButton.enabled = idle and self.logic.canUndo(segmentation)
        self.ui.redoButton.enabled = idle and self.logic.canRedo(segmentation)
        self.ui.downloadButton.text = _("Cancel download") if self._download else _("Download")
        hasVoxels = hasSegment and p.inputVolume.GetImageData() is not None
        self.ui.sliceSourcesLabel.text = self.logic.describeSliceSources(p) if hasVoxels else ""

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
        """Switch where the next request runs; settings that only apply locally grey out."""
        from MedSAM2HITLLib.compute_backend import SERVER

        server = self.ui.computeComboBox.currentData == SERVER
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.testConnectionButton):
            widget.enabled = server
        for widget in (self.ui.checkpointRow, self.ui.deviceComboBox, self.ui.precisionComboBox):
            widget.enabled = not server
        self.ui.serverInfoLabel.text = ""
        self.logic.setCompute(self.ui.computeComboBox.currentData, self.ui.serverUrlLineEdit.text.strip(),
                              self.ui.serverTokenLineEdit.text.strip())

    def onTestConnection(self) -> None:
        from MedSAM2HITLLib.compute_backend import clear_text_warning, describe_service

        with slicer.util.tryWithErrorDisplay(_("Failed to reach the inference service."), waitCursor=True):
            self.ui.serverInfoLabel.text = ""
            url, token = self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip()
            lines = describe_service(url, token)
            warning = clear_text_warning(url)
            self.ui.serverInfoLabel.text = "\n".join(lines + ([_("Warning: {text}").format(text=warning)]
                                                              if warning else []))
            self._setStatus(_("Connected: {line}").format(line=lines[0]))

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

    # --- shortcuts ------------------------------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        mainWindow = slicer.util.mainWindow()
        if self._shortcuts or not mainWindow:
            return
        for keys, method in self.SHORTCUTS:
            shortcut = qt.QShortcut(mainWindow)
            shortcut.setKey(qt.QKeySequence(keys))
            shortcut.connect("activated()", lambda method=method: self._fromShortcut(method))
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []

    def _fromShortcut(self, method) -> None:
        self._followView()  # a shortcut is pressed with the mouse over the view the user works in
        getattr(self, method)()

    # --- actions --------------------------------------------------------------------------------------------

    def onPlaceRoi(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start placing an ROI."), waitCursor=True):
            roi = self.logic.startRoiPlacement()
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
            points = self.logic.startClickPlacement(self._parameterNode)
            self.removeObserver(points, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClickPlaced)
            self.addObserver(points, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClickPlaced)
            self._clickIsPositive = positive
            self._setStatus(_("Click on what belongs to the object.") if positive else
                            _("Click on what the mask should leave out."))

    def onClickPlaced(self, points, event) -> None:
        self.removeObserver(points, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onClickPlaced)
        self._followView()
        last = points.GetNumberOfControlPoints() - 1
        points.SetNthControlPointLabel(last, "+" if self._clickIsPositive else "-")
        self._launch(_("Failed to segment the slice from the clicks."), lambda mine: self.logic.segmentSlice(
            self._parameterNode, withClicks=True, onDone=mine(self._onSegmentDone), onError=mine(self._onError)))

    def onPropagateAll(self) -> None:
        self._launch(_("Failed to propagate the objects."), lambda mine: self.logic.propagateAll(
            self._parameterNode, onProgress=mine(self._onProgress), onDone=mine(self._onPropagateDone),
            onError=mine(self._onError)))

    def onSegmentSlice(self) -> None:
        self._launch(_("Failed to segment the slice."), lambda mine: self.logic.segmentSlice(
            self._parameterNode, onDone=mine(self._onSegmentDone), onError=mine(self._onError)))

    def onPropagate(self) -> None:
        self._launch(_("Failed to propagate."), lambda mine: self.logic.propagate(
            self._parameterNode, onProgress=mine(self._onProgress), onDone=mine(self._onPropagateDone),
            onError=mine(self._onError)))

    def onPropagateFromSlice(self) -> None:
        def request(mine):
            keyIndex = self.logic.sliceIndexInView(self._parameterNode, self._sliceNodeForAxis())
            return self.logic.propagate(
                self._parameterNode, fromSegment=True, keyIndex=keyIndex, onProgress=mine(self._onProgress),
                onDone=mine(self._onPropagateDone), onError=mine(self._onError))

        self._launch(_("Failed to propagate from this slice."), request)

    def onCancel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to cancel.")):
            self.logic.cancel()
            self._setStatus(_("Cancelling..."))

    def onHistory(self, step) -> None:
        """Undo or redo one MedSAM2 result (logic.undo / logic.redo)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to undo or redo.")):
            step(self._parameterNode.segmentationNode)
            self._updateButtons()

    def onStopWorker(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to stop the worker.")):
            self.logic.stopWorker()
            self._finish()  # what was running is abandoned; its late answer is ignored
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
            if self._download:
                self._download.cancel()
                return
            from MedSAM2HITLLib.checkpoints import BackgroundDownload

            self._download = BackgroundDownload(self._parameterNode.checkpoint)
            self._download.start()
            self.ui.downloadProgressBar.setRange(0, 0)
            self.ui.downloadProgressBar.show()
            self._updateButtons()

    # --- request life cycle ---------------------------------------------------------------------------------

    def _launch(self, failure, makeRequest) -> None:
        """Run a logic call that returns a Request, with callbacks that act only while it is the current one.

        Callbacks may fire before the call returns (bad input), and a request that follows a failed model load,
        or one cut off by Stop worker, still answers later: those answers must not end the next request.
        """
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            token = object()
            self._running = (token, time.perf_counter(), None)
            self.ui.progressBar.setRange(0, 0)
            self.ui.progressBar.show()
            self._setStatus(_("Running... (the first request also starts the worker and loads the model)"))
            self._updateButtons()

            def mine(callback):
                def run(*args):
                    if self._running and self._running[0] is token:
                        callback(*args)
                    else:
                        logging.info("MedSAM2HITL: ignored a late answer of an earlier request: %s", args[:1])
                return run

            try:
                request = makeRequest(mine)
            except Exception:
                self._finish()
                raise
            if self._running and self._running[0] is token:  # still in flight
                self._running = (token, self._running[1], request)

    def _finish(self) -> float:
        elapsed = time.perf_counter() - self._running[1] if self._running else 0.0
        self._running = None
        self.ui.progressBar.hide()
        self._updateButtons()
        return elapsed

    def _onSegmentDone(self, result) -> None:
        elapsed = self._finish()
        self._setStatus(_("Segmented the key slice in {seconds:.2f} s.").format(seconds=elapsed))

    def _onProgress(self, completed, total) -> None:
        self.ui.progressBar.setRange(0, total)
        self.ui.progressBar.setValue(completed)
        if self._running:
            elapsed = time.perf_counter() - self._running[1]
            self._setStatus(_("Propagating: {done}/{total} slices, {seconds:.1f} s").format(
                done=completed, total=total, seconds=elapsed))

    def _onPropagateDone(self, written) -> None:
        slices = len(written) if isinstance(written, list) else sum(len(w) for w in written.values())
        elapsed = self._finish()
        perSlice = elapsed / slices if slices else 0.0
        self._setStatus(_("Propagated {count} slices in {seconds:.1f} s ({perSlice:.2f} s/slice).").format(
            count=slices, seconds=elapsed, perSlice=perSlice))

    def _onError(self, error) -> None:
        self._finish()
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
        """Poll what has no callback: the worker state (and the service's queue) and a running download."""
        notice = self.logic.workerNotice()
        self.ui.workerStateLabel.text = self.logic.workerState() + (f" - {notice}" if notice else "")
        job = self._download
        if not job:
            return
        if job.total:
            self.ui.downloadProgressBar.setRange(0, 1000)
            self.ui.downloadProgressBar.setValue(int(1000 * job.received / job.total))
        if job.done:
            self._download = None
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
    """Adapter from the parameter node to `MedSAM2HITLLib.logic.SegmentationLogic`, which does the work.

    The library logic (and its worker process) is created on first use, so opening the module costs nothing.
    """

    def __init__(self, editorFor=None) -> None:
        """`editorFor(segmentationNode)`: the Segment Editor whose undo stack the results go on."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._editorFor = editorFor
        self._core = None
        self._model = None  # (checkpoint, device) last sent to the worker client
        self._compute = ("local", "", "")  # (where, server URL, token): see setCompute

    def getParameterNode(self):
        return MedSAM2HITLParameterNode(super().getParameterNode())

    @property
    def core(self):
        """The library logic, created on first use with a client for the chosen compute."""
        if self._core is None:
            from MedSAM2HITLLib.logic import SegmentationLogic

            self._core = SegmentationLogic(client=self._newClient(), editor_for=self._editorFor)
        return self._core

    def _newClient(self):
        """A client of the service, or of a local worker (first installing missing packages, after asking)."""
        from MedSAM2HITLLib import compute_backend

        where, url, token = self._compute
        if where == compute_backend.SERVER:
            return compute_backend.service_client(url, token)
        from MedSAM2HITLLib import dependencies
        from MedSAM2HITLLib.client import WorkerClient
        from MedSAM2HITLLib.slicer_transport import slicer_transport_factory

        dependencies.ensure()
        return WorkerClient(transport_factory=slicer_transport_factory())

    def setCompute(self, where: str, url: str = "", token: str = "") -> None:
        """Run the next requests on this computer ("local") or the service at `url` ("server").

        A change closes the current worker or connection (a running request fails); undo histories are kept.
        """
        compute = (where, url, token) if where == "server" else ("local", "", "")
        if compute == self._compute:
            return
        self._compute = compute
        self._model = None
        if self._core:
            self._core.use_client(self._newClient())

    def pump(self) -> None:
        """Hand the service's replies to their callbacks on the main thread (a local worker needs no pumping)."""
        if self._core and self._compute[0] == "server":
            self._core.client.pump(0)

    def _prepare(self, p, needRoi: bool, onError) -> None:
        """Check the inputs, (re)load the model when its choice changed, and make sure the target segment exists.

        The client re-sends the model to a restarted worker by itself; a model that fails to load is reported
        through `onError` and requested again next time.
        """
        from MedSAM2HITLLib import segment_writer

        if not p.inputVolume:
            raise ValueError(_("Select a volume first."))
        if needRoi and not p.roiNode:
            raise ValueError(_("Select or place an ROI around the object first."))
        model = (p.checkpoint, p.device.value, p.precision.value) if self._compute[0] == "local" else self._compute
        if self._model != model:
            failed = lambda error: self._modelFailed(error, onError)  # noqa: E731
            if self._compute[0] == "local":
                self.core.load_model(p.checkpoint, device=p.device.value, precision=p.precision.value,
                                     on_error=failed)
            else:  # the service runs its own model; the answer names it
                self.core.client.load_model(Path(p.checkpoint), on_error=failed)
            self._model = model
        if not p.segmentationNode:
            p.segmentationNode = segment_writer.create_segmentation(p.inputVolume.GetScene(), p.inputVolume)
        if not p.segmentId:
            name = p.roiNode.GetName() if p.roiNode else "MedSAM2"
            p.segmentId = segment_writer.get_or_create_segment(p.segmentationNode, name)

    def _modelFailed(self, error, onError) -> None:
        self._model = None
        if onError:
            onError(error)

    def segmentSlice(self, p, withClicks=False, onDone=None, onError=None):
        """Segment the slice through the ROI centre from its box; `withClicks`: the slice of the last click, from
        the clicks there (with the ROI's box when the ROI is on that slice). Result (segmentation, segment ID)."""
        from MedSAM2HITLLib import point_prompts

        self._prepare(p, needRoi=not withClicks, onError=onError)
        roi = p.roiNode
        if withClicks and roi is not None:
            axis = self.core.array_axis(p.inputVolume, p.axis.value)
            clicked = point_prompts.latest_point_slice(p.inputVolume, p.pointsNode, axis)
            roi = roi if self.core.key_slice(p.inputVolume, roi, axis) == clicked else None
        return self.core.segment_slice(
            p.inputVolume, roi, p.segmentationNode, segment_id=p.segmentId, axis=p.axis.value,
            window=p.intensity.value, points_node=p.pointsNode if withClicks else None, on_done=onDone,
            on_error=onError)

    def propagateAll(self, p, onProgress=None, onDone=None, onError=None):
        """Every object in one pass: each ROI of the scene with a segment of its name in the segmentation."""
        self._prepare(p, needRoi=False, onError=onError)
        segmentation = p.segmentationNode.GetSegmentation()
        objects = []
        for roi in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode"):
            segmentId = segmentation.GetSegmentIdBySegmentName(roi.GetName())
            if segmentId:
                objects.append((roi, segmentId))
        if not objects:
            raise ValueError(_("No ROI has a segment of its name: place an ROI per object and segment it first."))
        custom = p.rangeMode == RangeMode.CUSTOM
        return self.core.propagate_objects(
            p.inputVolume, p.segmentationNode, objects, axis=p.axis.value, start=p.rangeStart if custom else None,
            end=p.rangeEnd if custom else None, window=p.intensity.value, on_progress=onProgress, on_done=onDone,
            on_error=onError)

    def describeSliceSources(self, p) -> str:
        """The selected segment's slices along the panel's axis: the user's and the predicted ones."""
        from MedSAM2HITLLib import roi_box

        axis = roi_box.array_axis_for_view(p.inputVolume, p.axis.value)
        sources = self.core.slice_sources(p.segmentationNode, p.segmentId)
        return _("Slices: {sources}").format(sources=sources.describe(axis))

    def startClickPlacement(self, p):
        """The object's point list (made on first use, named after its ROI or segment), in place mode for one click."""
        from MedSAM2HITLLib.placement import start_placement

        if not p.inputVolume:
            raise ValueError(_("Select a volume first."))
        if not p.pointsNode:
            name = p.roiNode.GetName() if p.roiNode else "MedSAM2"
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                        slicer.mrmlScene.GenerateUniqueName(f"{name} clicks"))
            points.CreateDefaultDisplayNodes()
            p.pointsNode = points
        start_placement(p.pointsNode)
        return p.pointsNode

    def propagate(self, p, fromSegment=False, keyIndex=None, onProgress=None, onDone=None, onError=None):
        """Propagate from the ROI's box or (fromSegment) the segment's mask on keyIndex; result: slices written."""
        if fromSegment and not (p.segmentationNode and p.segmentId):
            raise ValueError(_("Select the segment whose mask on this slice is the prompt."))
        if p.rangeMode == RangeMode.ROI and not p.roiNode:
            raise ValueError(_("The 'ROI extent' range needs an ROI."))
        self._prepare(p, needRoi=not fromSegment, onError=onError)
        custom = p.rangeMode == RangeMode.CUSTOM
        return self.core.propagate(
            p.inputVolume, p.segmentationNode, p.segmentId, axis=p.axis.value,
            roi_node=p.roiNode, from_segment=fromSegment, key_index=keyIndex,
            start=p.rangeStart if custom else None, end=p.rangeEnd if custom else None,
            range_from_roi=p.rangeMode == RangeMode.ROI, window=p.intensity.value,
            largest_component=p.largestComponent, on_progress=onProgress, on_done=onDone, on_error=onError)

    @staticmethod
    def sliceIndexInView(p, sliceNode) -> int:
        """Index, along the array axis of the current view orientation, of the volume slice a view shows."""
        import numpy as np

        from MedSAM2HITLLib import roi_box

        if not p.inputVolume:
            raise ValueError(_("Select a volume first."))
        axis = roi_box.array_axis_for_view(p.inputVolume, p.axis.value)
        planeOrigin = [sliceNode.GetSliceToRAS().GetElement(row, 3) for row in range(3)] + [1.0]
        ijk = np.linalg.solve(roi_box.volume_ijk_to_world(p.inputVolume), planeOrigin)
        index = int(np.floor(ijk[2 - axis] + 0.5))  # array axis 0 is K, 2 is I
        count = p.inputVolume.GetImageData().GetDimensions()[2 - axis]
        if not 0 <= index < count:
            raise ValueError(_("The slice view shows no slice of the volume (slice {index} of 0..{last}).").format(
                index=index, last=count - 1))
        return index

    @staticmethod
    def startRoiPlacement():
        """A new box ROI that the next two clicks in a view define (see MedSAM2HITLLib.placement)."""
        from MedSAM2HITLLib.placement import start_placement

        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", slicer.mrmlScene.GenerateUniqueName("ROI"))
        roi.CreateDefaultDisplayNodes()
        start_placement(roi)
        return roi

    def cancel(self) -> None:
        if self._core:
            self._core.cancel()

    def undo(self, segmentation) -> None:
        if self._core and segmentation:
            self._core.undo(segmentation)

    def redo(self, segmentation) -> None:
        if self._core and segmentation:
            self._core.redo(segmentation)

    def canUndo(self, segmentation) -> bool:
        return bool(self._core and segmentation and self._core.history(segmentation).can_undo)

    def canRedo(self, segmentation) -> bool:
        return bool(self._core and segmentation and self._core.history(segmentation).can_redo)

    def stopWorker(self, atOnce: bool = False) -> None:
        if self._core:
            self._core.stop_worker(at_once=atOnce)

    def forgetScene(self) -> None:
        if self._core:
            self._core.forget_scene()

    def workerState(self) -> str:
        """stopped, starting, loading, ready or busy."""
        return self._core.client.state if self._core else "stopped"

    def workerNotice(self) -> str:
        """What the worker last said of its state, e.g. the service's queue position ("" if nothing)."""
        return self._core.client.notice if self._core else ""


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
        while widget._running is not None:
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

        from MedSAM2HITLLib.client import WorkerClient
        from MedSAM2HITLLib.slicer_transport import slicer_transport_factory

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
        self.assertIsNotNone(widget._running, f"propagation did not start: {widget.ui.statusLabel.text}")
        request = widget._running[2]
        widget.ui.cancelButton.click()
        self._wait(widget)
        cancelled = getattr(request.error, "kind", "") == "cancelled"
        self.assertTrue(cancelled or request.error is None, f"unexpected failure: {request.error}")
        if not (cancelled and not request.error.completed):
            widget.ui.undoButton.click()
        np.testing.assert_array_equal(self._segmentArray(p), corrected)

        widget.ui.stopWorkerButton.click()
        self.assertEqual(widget.logic.workerState(), "stopped")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)
        self.delayDisplay("Test passed")
