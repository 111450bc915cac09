"""The Slicer panel's decisions (MedSAM2HITLLib.panel_controller), headless: slicer-core MRML, a real worker
process with the random-init model, a real HTTP server for Test connection.

Each test is one finding of the review of the panel against Slicer's source (issue 24). The widget only binds
Qt to this controller; the parameter node is stood in for by an object with the same fields (the wrapper
needs Slicer's Qt). The dependency check is recorded: in Slicer it is the pip/PyTorch dialog, the edge to
the user.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from MedSAM2HITLLib import compute_backend
from MedSAM2HITLLib.dependencies import DependencyError
from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.panel_controller import Action, PanelController, SegmentationWatch, make_client, slice_index_in_view

pytestmark = pytest.mark.slow

SHAPE = (14, 40, 48)  # [k, j, i]
RANGE = [6, 7, 8]  # propagated slices around the ROI's slice 7: few, the machine is shared


class Recorder:
    """Counts the dependency checks and the clients made, as Slicer's dialogs and workers would see them."""

    def __init__(self, decline: bool = False):
        self.checks, self.clients, self.decline = 0, [], decline

    def check(self) -> None:
        self.checks += 1
        if self.decline:
            raise DependencyError("installation declined; MedSAM2HITL cannot run without: torch, sam2")

    def client(self, where, url, token):
        client = make_client(where, url, token)
        self.clients.append(client)
        return client


def panel_inputs(checkpoint, segment: bool = False):
    """A fresh scene with a phantom and an ROI, and the panel's parameters on it (the wrapper's fields)."""
    from MedSAM2HITLLib import segment_writer
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array, create_scene

    scene = create_scene()
    data = np.random.default_rng(0).normal(0, 20, SHAPE).astype(np.int16)
    data[3:11, 10:30, 12:36] += 400
    volume = add_volume_from_array(scene, data, np.eye(4), "phantom")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Lesion")
    roi.SetCenter(23.5, 19.5, 7.0)
    roi.SetSize(26, 22, 1)
    segmentation, segment_id = None, ""
    if segment:
        segmentation = segment_writer.create_segmentation(scene, volume)
        segment_id = segment_writer.get_or_create_segment(segmentation, "Lesion")
    choice = SimpleNamespace
    p = SimpleNamespace(inputVolume=volume, segmentationNode=segmentation, segmentId=segment_id, roiNode=roi,
                        pointsNode=None, axis=choice(value="axial"), rangeMode=choice(value="custom"),
                        rangeStart=RANGE[0], rangeEnd=RANGE[-1], intensity=choice(value="abdomen"), checkpoint=str(checkpoint),
                        device=choice(value="cpu"), precision=choice(value="fp32"), largestComponent=False,
                        earlyStop=True)
    return scene, p


class Answers:
    """The widget's callbacks, recorded."""

    def __init__(self):
        self.done, self.errors, self.progress = [], [], []

    def start(self, controller, action, p, **options) -> bool:
        return controller.start(action, p, on_done=lambda result, s: self.done.append(result),
                                on_error=lambda error, s: self.errors.append(error),
                                on_progress=lambda done, total: self.progress.append(done), **options)


def pump_until(controller, condition, timeout=240.0) -> None:
    """Qt's event loop delivers the worker's frames in Slicer; here the client is pumped."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the worker"
        controller.core.client.pump(0.05)


@pytest.fixture(scope="module")
def worker_panel(random_checkpoint):
    """One controller with a real worker for the module (the model loads once); tests use fresh scenes."""
    recorder = Recorder()
    controller = PanelController(client_factory=recorder.client, check_dependencies=recorder.check)
    yield controller, recorder
    controller.close()


def test_1_a_refresh_never_checks_dependencies_or_makes_a_client(random_checkpoint):
    """Finding 1: selecting a segment or loading a scene refreshes the panel; that must not open install dialogs."""
    recorder = Recorder(decline=True)
    controller = PanelController(client_factory=recorder.client, check_dependencies=recorder.check)
    scene, p = panel_inputs(random_checkpoint, segment=True)
    for _ in range(3):  # what every parameter-node observer call does
        states = {action: controller.allowed(action, p) for action in Action}
        controller.describe_slice_sources(p)
        controller.pump()
        controller.worker_state()
    assert states[Action.PROPAGATE] and states[Action.PROPAGATE_FROM_SLICE] and not states[Action.UNDO]
    assert controller.describe_slice_sources(p).startswith("Slices: ")
    assert (recorder.checks, recorder.clients) == (0, [])
    with pytest.raises(DependencyError, match="declined"):  # an explicit action asks, once per press
        controller.start(Action.SEGMENT, p, on_done=print, on_error=print)
    assert recorder.checks == 1 and recorder.clients == [] and not controller.busy
    controller.allowed(Action.SEGMENT, p)
    assert recorder.checks == 1
    with pytest.raises(BadInputError, match="no server URL"):  # Server with an empty URL: said, not raised later
        controller.set_compute(compute_backend.SERVER, "", "")
    assert controller.compute[0] == compute_backend.LOCAL and not controller.serves_remotely
    with pytest.raises(BadInputError, match="server cannot be used: no server URL"):  # not run locally instead
        controller.start(Action.SEGMENT, p, on_done=print, on_error=print)
    assert recorder.checks == 1
    controller.set_compute(compute_backend.SERVER, "http://127.0.0.1:9", "")
    controller.allowed(Action.SEGMENT, p)
    started = Answers().start(controller, Action.SEGMENT, p)  # the service needs no local packages
    assert started and recorder.checks == 1
    controller.close()


def test_2_a_shortcut_pressed_twice_starts_one_propagation(worker_panel, random_checkpoint):
    """Finding 2: Shift+P twice; buttons and shortcuts ask the same rule, and start() refuses while busy."""
    controller, _ = worker_panel
    scene, p = panel_inputs(random_checkpoint)
    answers = Answers()
    assert answers.start(controller, Action.PROPAGATE, p)
    assert controller.busy and not controller.allowed(Action.PROPAGATE, p)
    assert not answers.start(controller, Action.PROPAGATE, p)  # the second press
    assert not answers.start(controller, Action.SEGMENT, p)
    assert controller.allowed(Action.CANCEL, p) and controller.allowed(Action.STOP_WORKER, p)
    pump_until(controller, lambda: not controller.busy)
    assert answers.errors == [] and len(answers.done) == 1
    assert sorted(answers.done[0]) == RANGE
    assert max(answers.progress) == len(RANGE)  # one propagation's progress, not two interleaved
    assert controller.allowed(Action.PROPAGATE, p) and controller.allowed(Action.UNDO, p)


def test_3_closing_the_panel_stops_the_request_and_drops_its_answers(random_checkpoint):
    """Finding 3 (the controller's part of cleanup): the request and the worker go first, nothing answers later."""
    recorder = Recorder()
    controller = PanelController(client_factory=recorder.client, check_dependencies=recorder.check)
    scene, p = panel_inputs(random_checkpoint)
    answers = Answers()
    assert answers.start(controller, Action.PROPAGATE, p)
    client = controller.core.client  # starting its worker and loading the model: pending all the same
    began = time.monotonic()
    controller.close()
    assert time.monotonic() - began < 1.0 and client.state == "stopped"
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        client.pump(0.05)
    assert (answers.done, answers.errors) == ([], [])  # no error dialog while Slicer quits or reloads
    assert not any(controller.allowed(action, p) for action in Action)


def test_8_undo_redo_buttons_follow_the_editors_own_undo(worker_panel, random_checkpoint):
    """Finding 8: an undo made in the Segment Editor (its z key calls the logic's Undo) refreshes the panel's
    buttons through the segmentation's events; another segmentation starts an empty history."""
    from MedSAM2HITLLib import segment_writer

    controller, _ = worker_panel
    scene, p = panel_inputs(random_checkpoint)
    answers = Answers()
    assert answers.start(controller, Action.SEGMENT, p)
    pump_until(controller, lambda: not controller.busy)
    refreshes = []
    watch = SegmentationWatch(lambda: refreshes.append(controller.allowed(Action.REDO, p)))
    watch.watch(p.segmentationNode)
    editor = controller.core.history(p.segmentationNode).editor  # what the embedded editor's Undo drives
    editor.Undo()
    assert refreshes and refreshes[-1] is True
    editor.Redo()
    assert refreshes[-1] is False and controller.allowed(Action.UNDO, p)
    editor.Undo()
    other = segment_writer.create_segmentation(scene, p.inputVolume)
    editor.SetSegmentationNode(other)  # vtkSegmentationHistory::SetSegmentation → RemoveAllStates
    editor.SetSegmentationNode(p.segmentationNode)
    assert not controller.allowed(Action.REDO, p) and not controller.allowed(Action.UNDO, p)
    watch.release()
    count = len(refreshes)
    segment_writer.write_slice(p.segmentationNode, p.segmentId, p.inputVolume, 0, 2, np.ones(SHAPE[1:], bool))
    assert len(refreshes) == count  # released: no observer left on the node


def test_7_a_scene_close_stops_the_request_before_its_segmentation_goes(worker_panel, random_checkpoint):
    """Finding 7: the answers of a propagation running when the scene closes never reach the panel and
    never write into the removed segmentation."""
    import slicer

    controller, _ = worker_panel
    scene, p = panel_inputs(random_checkpoint)
    scene.AddObserver(scene.StartCloseEvent, lambda *_: controller.scene_closing())  # the widget's binding
    answers = Answers()
    assert answers.start(controller, Action.PROPAGATE, p)
    pump_until(controller, lambda: answers.progress)
    segmentation = p.segmentationNode
    writes = []
    segmentation.AddObserver(slicer.vtkSegmentation.SourceRepresentationModified, lambda *_: writes.append(1))
    scene.Clear(0)
    assert segmentation.GetScene() is None and not controller.busy
    written_at_close = len(writes)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        controller.core.client.pump(0.05)
    assert len(writes) == written_at_close, "a late answer wrote into the removed segmentation"
    assert (answers.done, answers.errors) == ([], [])


def test_5_a_compute_switch_counts_only_once_its_client_exists_and_does_not_wait(worker_panel):
    """Findings 5 and 8: a bad server URL keeps the local client (nothing pumps it from a timer); a good one
    replaces it without waiting for the old worker."""
    controller, recorder = worker_panel
    local = controller.core.client
    local.status()  # a running worker (the model is not needed to switch away from it)
    pump_until(controller, lambda: local.state == "ready")
    made = len(recorder.clients)
    with pytest.raises(BadInputError, match="not an http"):
        controller.set_compute(compute_backend.SERVER, "gpu-box:8000", "token")
    assert controller.compute[0] == compute_backend.LOCAL and controller.core.client is local
    assert not controller.serves_remotely and len(recorder.clients) == made
    began = time.monotonic()
    assert controller.set_compute(compute_backend.SERVER, "http://127.0.0.1:9", "token")
    assert time.monotonic() - began < 0.5 and local.state == "stopped"
    assert controller.serves_remotely and controller.core.client is recorder.clients[-1]
    began = time.monotonic()
    controller.set_compute(compute_backend.LOCAL)
    assert time.monotonic() - began < 0.5 and not controller.serves_remotely


def test_8_stop_worker_returns_at_once_while_a_request_runs(worker_panel, random_checkpoint):
    """Finding 8: Stop worker does not block the GUI (a polite shutdown waited up to 7 s); the abandoned request
    answers nothing. (The worker is restarting here: the compute-switch test before this one stopped it.)"""
    controller, _ = worker_panel
    scene, p = panel_inputs(random_checkpoint)
    answers = Answers()
    assert answers.start(controller, Action.PROPAGATE, p)
    controller.core.client.pump(0.5)
    began = time.monotonic()
    controller.stop_worker()
    assert time.monotonic() - began < 0.5
    assert controller.worker_state() == "stopped" and not controller.busy
    controller.core.client.pump(0.3)
    assert (answers.done, answers.errors) == ([], [])


def test_the_slice_a_view_shows_and_the_placement_tools(random_checkpoint):
    """Propagate from this slice takes the slice the view shows; Place ROI and the clicks target their own node."""
    import slicer

    from MedSAM2HITLLib.placement import SELECTION_NODE_ID

    controller = PanelController(client_factory=make_client, check_dependencies=lambda: None)
    scene, p = panel_inputs(random_checkpoint)
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetOrientation("Axial")
    to_ras = view.GetSliceToRAS()
    to_ras.SetElement(2, 3, 9.4)  # 9.4 mm: nearest voxel centre k = 9 (identity IJK to RAS)
    assert slice_index_in_view(p, view) == 9
    to_ras.SetElement(2, 3, 30.0)
    with pytest.raises(BadInputError, match="no slice of the volume.*slice 30 of 0..13"):
        slice_index_in_view(p, view)
    selection = scene.GetNodeByID(SELECTION_NODE_ID)
    roi = controller.start_roi_placement(scene, p, view)
    assert isinstance(roi, slicer.vtkMRMLMarkupsROINode) and selection.GetActivePlaceNodeID() == roi.GetID()
    points = controller.start_click_placement(p, view)
    assert points.GetName() == "Lesion clicks" and p.pointsNode is points
    assert selection.GetActivePlaceNodeID() == points.GetID()
    assert controller.start_click_placement(p) is points  # the object's one point list
    assert controller.worker_state() == "stopped"  # placing never starts a worker (nothing to encode ahead for)


def test_stop_where_the_object_ends_reaches_the_propagation_and_is_reported():
    """Issue 27, with the phantom-trained fixture on a phantom it never saw (object on slices 15-32 of 48): the
    checkbox on stops each direction after the object and the status says where; off fills the whole volume."""
    import sys

    from MedSAM2HITLLib.engine import describe_early_end
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array, create_scene

    from conftest import DATA, REPO

    sys.path.insert(0, str(REPO / "Testing" / "Training"))
    from phantoms import make_phantom

    phantom = make_phantom(1_000_074, size=(48, 96, 96))
    truth = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    x0, y0, x1, y1 = phantom.box()
    controller = PanelController(client_factory=make_client, check_dependencies=lambda: None)
    runs = {}
    for early_stop in (True, False):
        scene = create_scene()
        volume = add_volume_from_array(scene, phantom.volume, np.eye(4), "phantom")  # identity: RAS = (i, j, k)
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Target")
        roi.SetCenter((x0 + x1) / 2, (y0 + y1) / 2, phantom.key_index)
        roi.SetSize(x1 - x0 + 2, y1 - y0 + 2, 1)
        choice = SimpleNamespace
        p = SimpleNamespace(inputVolume=volume, segmentationNode=None, segmentId="", roiNode=roi, pointsNode=None,
                            axis=choice(value="axial"), rangeMode=choice(value="whole"), rangeStart=0, rangeEnd=0,
                            intensity=choice(value=phantom.window), checkpoint=str(DATA / "phantom_sam2.pt"),
                            device=choice(value="cpu"), precision=choice(value="fp32"), largestComponent=False,
                            earlyStop=early_stop)
        answers = Answers()
        assert answers.start(controller, Action.PROPAGATE, p)
        pump_until(controller, lambda: not controller.busy)
        assert answers.errors == []
        runs[early_stop] = (sorted(answers.done[0]), controller.early_end)
    controller.close()
    written, early_end = runs[True]
    backward, forward = written[0], written[-1]
    assert 0 < backward < truth[0] and truth[-1] < forward < 47 and written == list(range(backward, forward + 1))
    assert early_end == describe_early_end({"forward": forward, "backward": backward})
    assert early_end.startswith(f"done at slice {forward} (forward) and slice {backward} (backward)")
    assert runs[False] == (list(range(48)), "")  # off: every slice, no stop reported


def test_placing_a_prompt_encodes_the_shown_slice_only_on_an_idle_running_worker(worker_panel, random_checkpoint,
                                                                                  monkeypatch):
    """Issue 27: starting an ROI or a click has the idle local worker encode the slice the view shows (one
    prefetch, answered with that slice and its neighbours); none while a request runs."""
    controller, _ = worker_panel
    scene, p = panel_inputs(random_checkpoint)
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetOrientation("Axial")
    view.GetSliceToRAS().SetElement(2, 3, 4.0)  # k = 4
    answers = Answers()
    assert answers.start(controller, Action.SEGMENT, p)  # the worker runs with the panel's model afterwards
    client = controller.core.client
    sent = []  # the prefetch requests, as the real client makes and sends them
    real_prefetch = client.prefetch
    monkeypatch.setattr(client, "prefetch", lambda *args, **options: sent.append(real_prefetch(*args, **options))
                        or sent[-1])
    controller.start_click_placement(p, view)  # while the segmentation runs: the worker is busy
    assert sent == []
    pump_until(controller, lambda: not controller.busy)
    assert answers.errors == [] and client.state == "ready"
    controller.start_roi_placement(scene, p, view)
    assert len(sent) == 1
    pump_until(controller, lambda: sent[0].done)
    assert sent[0].reply["encoded"] == [4, 5, 3] and client.state == "ready"
    controller.start_click_placement(p, view)
    assert len(sent) == 2  # one per placement


class SlowService(http.server.BaseHTTPRequestHandler):
    """The service's /api/v1/models, answering after DELAY seconds (a far or busy server)."""

    DELAY = 1.0

    def do_GET(self):  # noqa: N802 (http.server's name)
        time.sleep(self.DELAY)
        body = json.dumps({"version": "9.9", "models": [], "workers": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def slow_service():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_8_test_connection_runs_off_the_gui_thread(slow_service):
    """Finding 8: Test connection returns at once; its answer is taken by the GUI's poll; a stale one is dropped."""
    controller = PanelController(client_factory=make_client, check_dependencies=lambda: None)
    began = time.monotonic()
    assert controller.test_connection(slow_service, "token")
    assert time.monotonic() - began < 0.2
    assert controller.poll_connection() is None and not controller.allowed(Action.TEST_CONNECTION, None)
    assert not controller.test_connection(slow_service, "token")  # one at a time
    deadline = time.monotonic() + 10
    while (answer := controller.poll_connection()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert answer.error is None and answer.lines[0].endswith("version 9.9") and answer.warning is None
    assert "no model worker is running" in answer.lines[-1]
    with pytest.raises(BadInputError, match="names no host"):
        controller.test_connection("http://", "")
    assert controller.test_connection(slow_service, "token")
    controller.close()  # the module reloads meanwhile: its answer must not reach the old panel
    time.sleep(SlowService.DELAY + 0.5)
    assert controller.poll_connection() is None


def test_8_test_connection_reports_an_unreachable_service():
    controller = PanelController(client_factory=make_client, check_dependencies=lambda: None)
    assert controller.test_connection("http://127.0.0.1:9", "")
    deadline = time.monotonic() + 10
    while (answer := controller.poll_connection()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert answer.lines == [] and "unreachable" in answer.error


def test_a_finished_download_is_handed_to_the_gui_once():
    controller = PanelController(client_factory=make_client, check_dependencies=lambda: None)
    controller.start_download("NoSuchModel")  # fails on its thread at once: no network is touched
    deadline = time.monotonic() + 10
    while (job := controller.poll_download()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "unknown checkpoint 'NoSuchModel'" in str(job.error)
    assert controller.download is None and controller.poll_download() is None
