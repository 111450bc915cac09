"""The Slicer panel's decisions, without Qt: what may run now, which answers still count, where the model runs.

The widget in MedSAM2HITL.py only binds Qt signals, timers and shortcuts to this class, so every decision is
tested headless (slicer-core MRML, a real worker). The rules:
- one request at a time: buttons and shortcuts ask `allowed()`, and `start()` refuses while one runs;
- answers of a request abandoned by Stop worker, a scene close or a module reload are dropped silently
  (a generation counter), and such a request is stopped while its segmentation is still in the scene;
- packages are checked (and installed, after asking) only when a model action starts, never from a refresh;
- a new compute choice counts only once its client exists; the old worker is stopped without waiting;
- Test connection runs on a thread and its answer is taken on the main thread by `poll()`;
- starting to place an ROI or a click has an idle local worker encode the slice shown meanwhile (never starts it).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import compute_backend
from .errors import BadInputError, MedSAM2Error

log = logging.getLogger(__name__)

# Changing the segmentation shown in the embedded Segment Editor empties its undo history
# (vtkSegmentationHistory::SetSegmentation calls RemoveAllStates): the panel says so where users pick it.
HISTORY_NOTICE = ("Undo and Redo cover the selected segmentation only: selecting another segmentation clears "
                  "their history.")
HISTORY_CLEARED = "Another segmentation is selected: Undo and Redo start afresh (the previous history is cleared)."


class Action(enum.Enum):
    SEGMENT = "segment slice"
    PROPAGATE = "propagate"
    PROPAGATE_FROM_SLICE = "propagate from this slice"
    PROPAGATE_ALL = "propagate all objects"
    CLICK = "click"
    PLACE_ROI = "place ROI"
    CANCEL = "cancel"
    UNDO = "undo"
    REDO = "redo"
    STOP_WORKER = "stop worker"
    COMPUTE = "change compute"
    TEST_CONNECTION = "test connection"


MODEL_ACTIONS = (Action.SEGMENT, Action.PROPAGATE, Action.PROPAGATE_FROM_SLICE, Action.PROPAGATE_ALL, Action.CLICK)


@dataclass
class Running:
    action: Action
    generation: int
    started: float
    request: Any = None


@dataclass
class ConnectionAnswer:
    """What Test connection found: the service's description, or the one-line reason it failed."""

    lines: list[str]
    warning: str | None = None
    error: str | None = None


def make_client(where: str, url: str, token: str, transport_factory: Callable | None = None):
    """The client for a compute choice; nothing starts yet (the worker starts with the first request)."""
    from .worker_client import WorkerClient

    if where == compute_backend.SERVER:
        return compute_backend.service_client(url, token)
    return WorkerClient(transport_factory=transport_factory)


class PanelController:
    """State of one panel: the running request, the compute choice, the library logic (made on first use)."""

    def __init__(self, client_factory: Callable = make_client, check_dependencies: Callable[[], None] | None = None,
                 editor_for: Callable | None = None, describe_service: Callable = compute_backend.describe_service):
        """`client_factory(where, url, token)`; `check_dependencies()` raises when packages stay missing (in
        Slicer: `dependencies.ensure`, which asks before installing); `editor_for`: see SegmentationLogic."""
        if check_dependencies is None:
            from .dependencies import ensure as check_dependencies
        self.client_factory, self.check_dependencies = client_factory, check_dependencies
        self.editor_for, self.describe_service = editor_for, describe_service
        self.generation = 0  # bumped by Stop worker, scene close and module close: older answers are stale
        self.running: Running | None = None
        self.closed = False
        self.compute = (compute_backend.LOCAL, "", "")  # what the current client serves (or will, once made)
        self.unusable: str | None = None  # why the compute last chosen could not be used (actions refuse)
        self.early_end = ""  # where the last finished propagation stopped because its object(s) ended, for the status
        self.download = None  # a checkpoints.BackgroundDownload while one runs
        self._core = None
        self._model = None  # the model choice last sent to the client
        self._probe: tuple[int, threading.Thread, list] | None = None  # Test connection: generation, thread, answer

    # ---- what may happen now ----------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.running is not None

    def allowed(self, action: Action, p) -> bool:
        """Whether `action` may start now; buttons are enabled and shortcuts act by this one rule."""
        if self.closed:
            return False
        if action == Action.CANCEL:
            return self.busy
        if action == Action.TEST_CONNECTION:
            return self._probe is None
        if self.busy:  # one request at a time; editing, switching compute and stopping wait for it
            return action == Action.STOP_WORKER
        volume = bool(p and p.inputVolume)
        segmentation = p.segmentationNode if volume else None
        if action in (Action.SEGMENT, Action.PROPAGATE):
            return volume and bool(p.roiNode)
        if action == Action.PROPAGATE_FROM_SLICE:
            return bool(segmentation and p.segmentId)
        if action == Action.PROPAGATE_ALL:
            return bool(segmentation)
        if action in (Action.CLICK, Action.PLACE_ROI):
            return volume
        if action == Action.UNDO:
            return self.can_undo(p.segmentationNode if p else None)
        if action == Action.REDO:
            return self.can_redo(p.segmentationNode if p else None)
        return True  # STOP_WORKER, COMPUTE

    def can_undo(self, segmentation) -> bool:
        return bool(self._core and segmentation and self._core.history(segmentation).can_undo)

    def can_redo(self, segmentation) -> bool:
        return bool(self._core and segmentation and self._core.history(segmentation).can_redo)

    @staticmethod
    def describe_slice_sources(p) -> str:
        """The selected segment's slices along the panel's axis; reads the segment's tag, starts nothing."""
        from . import roi_box, slice_sources

        if not (p and p.inputVolume and p.inputVolume.GetImageData() is not None and p.segmentationNode
                and p.segmentId):
            return ""
        axis = roi_box.array_axis_for_view(p.inputVolume, p.axis.value)
        return "Slices: " + slice_sources.read(p.segmentationNode, p.segmentId).describe(axis)

    # ---- requests ---------------------------------------------------------------------------------------------

    def start(self, action: Action, p, on_done: Callable, on_error: Callable, on_progress: Callable | None = None,
              key_index: int | None = None) -> bool:
        """Start a model action; False (nothing done) when it may not run now. Raises on bad input or missing
        packages, before anything is sent. `on_done(result, seconds)`, `on_error(error, seconds)` and
        `on_progress(done, total)` run only while this request is the current one."""
        if action not in MODEL_ACTIONS:
            raise ValueError(f"{action} is not a model action")
        if not self.allowed(action, p):
            return False
        if self.unusable:  # the user chose a server that cannot work: running elsewhere would mislead
            raise BadInputError(self.unusable)
        if self.compute[0] == compute_backend.LOCAL:
            self.check_dependencies()  # an explicit action: the only place the install dialogs may appear
        running = self.running = Running(action, self.generation, time.perf_counter())

        def current(callback, ends: bool):
            def run(*args):
                if self.running is not running or running.generation != self.generation:
                    log.info("MedSAM2HITL: dropped a late answer of an abandoned %s", running.action.value)
                    return
                if ends:
                    self.running = None
                    callback(*args, time.perf_counter() - running.started)
                elif callback is not None:
                    callback(*args)
            return run

        def finished(result, seconds: float) -> None:
            from .engine import describe_early_end

            reply = running.request.reply if running.request is not None else {}
            objects = len(result) if isinstance(result, dict) else 1
            self.early_end = describe_early_end(reply.get("ended_early") or {}, objects)
            on_done(result, seconds)

        self.early_end = ""
        done, error = current(finished, True), current(on_error, True)
        try:
            running.request = self._request(action, p, current(on_progress, False), done, error, key_index)
        except Exception:
            if self.running is running:
                self.running = None
            raise
        return True

    def _request(self, action: Action, p, on_progress, on_done, on_error, key_index):
        core = self.core
        if action in (Action.SEGMENT, Action.CLICK):
            clicks = action == Action.CLICK
            self._prepare(p, need_roi=not clicks, on_error=on_error)
            roi = p.roiNode
            if clicks and roi is not None:  # the ROI's box joins the clicks only on the clicked slice
                from . import point_prompts

                axis = core.array_axis(p.inputVolume, p.axis.value)
                clicked = point_prompts.latest_point_slice(p.inputVolume, p.pointsNode, axis)
                roi = roi if core.key_slice(p.inputVolume, roi, axis) == clicked else None
            return core.segment_slice(p.inputVolume, roi, p.segmentationNode, segment_id=p.segmentId,
                                      axis=p.axis.value, window=p.intensity.value,
                                      points_node=p.pointsNode if clicks else None, on_done=on_done,
                                      on_error=on_error)
        custom = p.rangeMode.value == "custom"
        start, end = (p.rangeStart, p.rangeEnd) if custom else (None, None)
        if action == Action.PROPAGATE_ALL:
            self._prepare(p, need_roi=False, on_error=on_error)
            return core.propagate_objects(p.inputVolume, p.segmentationNode, objects_of(p), axis=p.axis.value,
                                          start=start, end=end, window=p.intensity.value, early_stop=p.earlyStop,
                                          on_progress=on_progress, on_done=on_done, on_error=on_error)
        from_segment = action == Action.PROPAGATE_FROM_SLICE
        if from_segment and not (p.segmentationNode and p.segmentId):
            raise BadInputError("select the segment whose mask on this slice is the prompt")
        if p.rangeMode.value == "roi" and not p.roiNode:
            raise BadInputError("the 'ROI extent' range needs an ROI")
        self._prepare(p, need_roi=not from_segment, on_error=on_error)
        return core.propagate(p.inputVolume, p.segmentationNode, p.segmentId, axis=p.axis.value, roi_node=p.roiNode,
                              from_segment=from_segment, key_index=key_index, start=start, end=end,
                              range_from_roi=p.rangeMode.value == "roi", window=p.intensity.value,
                              largest_component=p.largestComponent, early_stop=p.earlyStop, on_progress=on_progress,
                              on_done=on_done, on_error=on_error)

    def _prepare(self, p, need_roi: bool, on_error) -> None:
        """Check the inputs, (re)load the model when its choice changed, and make sure the target segment exists.
        A model that fails to load is reported through `on_error` and requested again next time."""
        from . import segment_writer

        if not p.inputVolume:
            raise BadInputError("select a volume first")
        if need_roi and not p.roiNode:
            raise BadInputError("select or place an ROI around the object first")
        local = self.compute[0] == compute_backend.LOCAL
        model = (p.checkpoint, p.device.value, p.precision.value) if local else self.compute
        if self._model != model:
            def failed(error):
                self._model = None
                on_error(error)

            if local:
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

    def cancel(self) -> bool:
        return bool(self.busy and self._core and self._core.cancel())

    # ---- placing prompts, and encoding ahead meanwhile ----------------------------------------------------------

    def start_roi_placement(self, scene, p, slice_node=None):
        """A new box ROI that the next two clicks in a view define (see placement.start_placement); the slice
        `slice_node` shows is encoded meanwhile (`encode_ahead`)."""
        from .placement import start_placement

        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName("ROI"))
        roi.CreateDefaultDisplayNodes()
        start_placement(roi)
        self.encode_ahead(p, slice_node)
        return roi

    def start_click_placement(self, p, slice_node=None):
        """The object's point list (made on first use, named after its ROI), in place mode for one click; the
        slice `slice_node` shows is encoded meanwhile (`encode_ahead`)."""
        from .placement import start_placement

        if not p.inputVolume:
            raise BadInputError("select a volume first")
        if not p.pointsNode:
            scene = p.inputVolume.GetScene()
            name = p.roiNode.GetName() if p.roiNode else "MedSAM2"
            points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                             scene.GenerateUniqueName(f"{name} clicks"))
            points.CreateDefaultDisplayNodes()
            p.pointsNode = points
        start_placement(p.pointsNode)
        self.encode_ahead(p, slice_node)
        return p.pointsNode

    def encode_ahead(self, p, slice_node) -> bool:
        """Have the local worker encode the slice `slice_node` shows while the user draws there, so the prompt
        costs only the mask decoder; True if asked. Only a worker already running with the panel's model and
        idle is asked: this never starts a worker, checks packages or waits, and the service is not asked (its
        transport has no prefetch). The request gives way to any real one; its answer is not needed."""
        if (self.closed or self.busy or slice_node is None or self._core is None or self._model is None
                or self.compute[0] != compute_backend.LOCAL or self._core.client.state != "ready"
                or not (p and p.inputVolume and p.inputVolume.GetImageData() is not None)):
            return False
        try:
            self._core.prefetch(p.inputVolume, p.axis.value, slice_index_in_view(p, slice_node), p.intensity.value,
                                on_error=lambda error: log.info("MedSAM2HITL: encoding ahead failed: %s", error))
        except MedSAM2Error as error:  # e.g. the view shows no slice of the volume: nothing to encode, nothing to say
            log.info("MedSAM2HITL: nothing encoded ahead: %s", error)
            return False
        return True

    def undo(self, segmentation) -> bool:
        return bool(not self.busy and self.can_undo(segmentation) and self._core.undo(segmentation))

    def redo(self, segmentation) -> bool:
        return bool(not self.busy and self.can_redo(segmentation) and self._core.redo(segmentation))

    # ---- the library logic and where it runs ----------------------------------------------------------------

    @property
    def core(self):
        """The library logic, made by the first model action (never by a refresh) with the chosen compute's client."""
        if self._core is None:
            from .logic import SegmentationLogic

            self._core = SegmentationLogic(client=self.client_factory(*self.compute), editor_for=self.editor_for)
        return self._core

    def set_compute(self, where: str, url: str = "", token: str = "") -> bool:
        """Run the next requests on this computer ("local") or the service at `url` ("server"); False if unchanged.

        The choice counts only once its client exists: a bad URL raises and the current client stays. The old
        worker is stopped at once (not waited for); undo histories are kept.
        """
        compute = (where, url, token) if where == compute_backend.SERVER else (compute_backend.LOCAL, "", "")
        if compute == self.compute:
            self.unusable = None
            return False
        if self.busy:
            raise BadInputError("a request is running: wait for it or cancel it before changing where the model runs")
        try:
            if where == compute_backend.SERVER:
                compute_backend.check_server_url(url)
            client = self.client_factory(*compute) if self._core is not None else None
        except MedSAM2Error as error:  # BadInputError included: the actions say it until the choice is fixed
            self.unusable = f"the server cannot be used: {error}"
            raise
        if client is not None:
            self._core.stop_worker(at_once=True)
            self._core.use_client(client)
        self.compute, self._model, self.unusable = compute, None, None
        return True

    @property
    def serves_remotely(self) -> bool:
        return self._core is not None and self.compute[0] == compute_backend.SERVER

    def pump(self) -> None:
        """Hand the service's replies to their callbacks on the main thread; a local worker's QProcess needs none."""
        if self.serves_remotely:
            self._core.client.pump(0)

    def worker_state(self) -> str:
        """stopped, starting, loading, ready or busy, with what the worker last said of its queue."""
        if self._core is None:
            return "stopped"
        notice = self._core.client.notice
        return self._core.client.state + (f" - {notice}" if notice else "")

    def stop_worker(self) -> None:
        """Stop the worker at once (it holds nothing that a restart does not rebuild); a running request is
        abandoned and its answers dropped."""
        self._abandon()
        if self._core is not None:
            self._core.stop_worker(at_once=True)

    def _abandon(self) -> None:
        self.generation += 1
        self.running = None

    # ---- scene and module life cycle --------------------------------------------------------------------------

    def scene_closing(self) -> None:
        """Before the scene's nodes go: a running request is stopped now, so nothing it still had arrives later
        to write into a removed segmentation; the worker drops the scene's volumes and the histories go."""
        was_running = self.busy
        self._abandon()
        if self._core is None:
            return
        if was_running:
            self._core.stop_worker(at_once=True)
        self._core.forget_scene()

    def close(self) -> None:
        """The module is reloaded or Slicer quits: stop the request, the worker and the download; answers that
        still arrive are dropped (no dialogs during shutdown)."""
        self._abandon()
        self.closed = True
        if self.download is not None:
            self.download.cancel()
            self.download = None
        if self._core is not None:
            self._core.stop_worker(at_once=True)

    # ---- background work the GUI polls ------------------------------------------------------------------------

    def test_connection(self, url: str, token: str) -> bool:
        """Ask the service about itself on a thread; `poll()` returns the answer. False if one is under way.
        A malformed URL is refused at once."""
        if not self.allowed(Action.TEST_CONNECTION, None):
            return False
        compute_backend.check_server_url(url)
        answer: list[ConnectionAnswer] = []

        def ask() -> None:
            try:
                lines = self.describe_service(url, token)
                answer.append(ConnectionAnswer(lines, compute_backend.clear_text_warning(url)))
            except MedSAM2Error as error:
                answer.append(ConnectionAnswer([], error=str(error)))
            except Exception as error:  # a bug must still end the probe, with its message
                answer.append(ConnectionAnswer([], error=f"{error.__class__.__name__}: {error}"))

        thread = threading.Thread(target=ask, name="MedSAM2HITL test connection", daemon=True)
        self._probe = (self.generation, thread, answer)
        thread.start()
        return True

    def poll_connection(self) -> ConnectionAnswer | None:
        """The Test connection answer once it is in (None before, or when it went stale)."""
        if self._probe is None or self._probe[1].is_alive():
            return None
        generation, _, answer = self._probe
        self._probe = None
        if self.closed or generation != self.generation:
            return None
        return answer[0]

    def start_download(self, checkpoint: str) -> None:
        from .checkpoints import BackgroundDownload

        self.download = BackgroundDownload(checkpoint)
        self.download.start()

    def poll_download(self):
        """The finished download (once), else None; progress is on `self.download` meanwhile."""
        job = self.download
        if job is None or not job.done:
            return None
        self.download = None
        return job


def objects_of(p) -> list[tuple[Any, str]]:
    """Every ROI of the volume's scene that has a segment of its name in the panel's segmentation."""
    segmentation = p.segmentationNode.GetSegmentation()
    scene = p.inputVolume.GetScene()
    objects = []
    for number in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")):
        roi = scene.GetNthNodeByClass(number, "vtkMRMLMarkupsROINode")
        segment_id = segmentation.GetSegmentIdBySegmentName(roi.GetName())
        if segment_id:
            objects.append((roi, segment_id))
    if not objects:
        raise BadInputError("no ROI has a segment of its name: place an ROI per object and segment it first")
    return objects


def slice_index_in_view(p, slice_node) -> int:
    """Index, along the array axis of the panel's view orientation, of the volume slice a slice view shows."""
    import numpy as np

    from . import roi_box

    if not p.inputVolume:
        raise BadInputError("select a volume first")
    axis = roi_box.array_axis_for_view(p.inputVolume, p.axis.value)
    plane_origin = [slice_node.GetSliceToRAS().GetElement(row, 3) for row in range(3)] + [1.0]
    ijk = np.linalg.solve(roi_box.volume_ijk_to_world(p.inputVolume), plane_origin)
    index = int(np.floor(ijk[2 - axis] + 0.5))  # array axis 0 is K, 2 is I
    count = roi_box.volume_shape(p.inputVolume)[axis]
    if not 0 <= index < count:
        raise BadInputError(f"the slice view shows no slice of the volume (slice {index} of 0..{count - 1})")
    return index


class SegmentationWatch:
    """Calls `changed()` whenever the watched segmentation's content changes: a result, a paint stroke, or an
    undo/redo in the embedded Segment Editor (vtkSegmentationHistory restores segments: SegmentModified)."""

    EVENTS = ("SegmentAdded", "SegmentRemoved", "SegmentModified", "SourceRepresentationModified")

    def __init__(self, changed: Callable[[], None]):
        self.changed = changed
        self.node = None
        self._tags: list[int] = []

    def watch(self, node) -> None:
        if node is self.node:
            return
        self.release()
        self.node = node
        if node is not None:
            import slicer

            self._tags = [node.AddObserver(getattr(slicer.vtkSegmentation, name), lambda *_: self.changed())
                          for name in self.EVENTS]

    def release(self) -> None:
        for tag in self._tags:
            self.node.RemoveObserver(tag)
        self._tags, self.node = [], None
