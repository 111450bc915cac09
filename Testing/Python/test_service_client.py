"""The logic on the inference service, seen from the client: faults and a job that expires mid-session."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from service_fixtures import Service, free_port
from test_end_to_end import PHANTOM_CHECKPOINT, Case

pytestmark = pytest.mark.service

TOKEN = "client-test-token"


@pytest.fixture
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service_client"), tokens=TOKEN).start()
    yield running
    running.stop()


def service_logic(url: str, token: str | None):
    from MedSAM2HITLLib.logic import SegmentationLogic
    from MedSAM2HITLLib.service_transport import service_transport_factory
    from MedSAM2HITLLib.worker_client import WorkerClient

    return SegmentationLogic(WorkerClient(service_transport_factory(url, token)))


@pytest.fixture
def logic(service):
    """The logic on the live service with the right token; its client is closed after the test."""
    logic = service_logic(service.url, TOKEN)
    yield logic
    logic.stop_worker()


def segmented(logic, tmp_path, seed: int):
    """A phantom case, its ROI and the segmentation after the key slice was segmented through the service."""
    case = Case(tmp_path, seed=seed, grid="identity", axis=0)
    roi = case.roi()
    logic.load_model(PHANTOM_CHECKPOINT).wait(60)
    segmentation, segment_id = logic.segment_slice(case.volume, roi, None, axis="axial", window="abdomen").wait(60)
    return case, roi, segmentation, segment_id


def any_voxel_written(case) -> bool:
    from MedSAM2HITLLib.segment_writer import read_segment

    nodes = case.scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        for segment_id in node.GetSegmentation().GetSegmentIDs():
            if read_segment(node, segment_id, case.volume).any():
                return True
    return False


def segment_count(segmentation) -> int:
    return 0 if segmentation is None else segmentation.GetSegmentation().GetNumberOfSegments()


def test_service_down_at_start_fails_with_a_clear_message(tmp_path):
    from MedSAM2HITLLib.errors import MedSAM2Error

    url = f"http://127.0.0.1:{free_port()}"
    logic = service_logic(url, TOKEN)
    case = Case(tmp_path, seed=3, grid="identity", axis=0)
    try:
        with pytest.raises(MedSAM2Error, match="unreachable"):
            logic.load_model(PHANTOM_CHECKPOINT).wait(30)
        with pytest.raises(MedSAM2Error, match="unreachable"):
            logic.segment_slice(case.volume, case.roi(), None, axis="axial", window="abdomen").wait(30)
        assert not any_voxel_written(case)
    finally:
        logic.stop_worker()


def test_wrong_token_is_named(service, tmp_path):
    from MedSAM2HITLLib.errors import BadInputError

    logic = service_logic(service.url, "not-the-token")
    try:
        with pytest.raises(BadInputError, match="refused the token"):
            logic.load_model(PHANTOM_CHECKPOINT).wait(30)
    finally:
        logic.stop_worker()


def test_api_killed_mid_propagation_fails_within_10_s_keeps_slices_and_undo_works(service, logic, tmp_path):
    from MedSAM2HITLLib.errors import MedSAM2Error

    case, roi, segmentation, segment_id = segmented(logic, tmp_path, seed=3)
    killed = {}

    def on_progress(done, total):
        if done == 5 and not killed:
            service.kill("api", signal.SIGKILL)
            killed["at"] = time.monotonic()

    request = logic.propagate(case.volume, segmentation, segment_id, axis="axial", roi_node=roi,
                              window="abdomen", on_progress=on_progress)
    with pytest.raises(MedSAM2Error) as failed:
        request.wait(120)
    assert time.monotonic() - killed["at"] < 10
    assert "service" in str(failed.value)
    labels = case.exported(segmentation, tmp_path)
    kept = set(np.flatnonzero(labels.any(axis=(0, 1))).tolist())
    assert len(kept) >= 5  # the key slice and the slices that arrived before the kill
    assert logic.undo(segmentation)  # one undo removes the whole (partial) propagation
    labels = case.exported(segmentation, tmp_path)
    assert set(np.flatnonzero(labels.any(axis=(0, 1))).tolist()) == {case.key}


def test_a_job_expired_mid_session_is_uploaded_again(service, logic, tmp_path):
    import redis

    case, roi, _, _ = segmented(logic, tmp_path, seed=4)
    store = redis.Redis(port=service.redis_port, decode_responses=True)
    (job_id,) = store.zrange("m2h:jobs", 0, -1)
    store.zadd("m2h:jobs", {job_id: 0})  # due now: the service purges it within a second
    deadline = time.monotonic() + 15
    while store.exists(f"m2h:job:{job_id}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not store.exists(f"m2h:job:{job_id}")
    segmentation, _ = logic.segment_slice(case.volume, roi, None, axis="axial", window="abdomen").wait(60)
    assert segment_count(segmentation) == 1
    assert store.zcard("m2h:jobs") == 1 and store.zrange("m2h:jobs", 0, -1) != [job_id]


def test_cli_on_the_service_gives_what_it_gives_locally(service, tmp_path):
    """The flipped, left-handed grid of test_cli: --server gives the local result (Dice >= 0.99 between them)."""
    import nibabel as nib

    from test_cli import AFFINE, DATA, cli, ras_of
    from test_service import dice
    from phantoms import make_phantom

    phantom = make_phantom(31, size=(40, 80, 96), modality="ct")
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(phantom.volume.transpose(2, 1, 0), AFFINE), path)
    x0, y0, x1, y1 = phantom.box()
    k = phantom.key_index
    box = [f"{v:.3f}" for v in (*ras_of((x0 - 1, y0 - 1, k)), *ras_of((x1 + 1, y1 + 1, k)))]
    labels = {}
    for where, extra in (("local", ["--checkpoint", str(DATA / "phantom_sam2.pt"), "--device", "cpu"]),
                         ("service", ["--server", service.url])):
        out = tmp_path / f"{where}.nii.gz"
        result = cli("segment", str(path), "--box-ras", *box, "--propagate", "--window", "abdomen", "--threads", "2",
                     "-o", str(tmp_path / f"{where}.seg.nrrd"), "--labelmap", str(out), *extra,
                     env={"MEDSAM2HITL_TOKEN": TOKEN})
        assert result.returncode == 0, result.stderr
        assert TOKEN not in result.stderr + result.stdout
        labels[where] = np.asarray(nib.load(out).dataobj) > 0
    assert dice(labels["service"], labels["local"]) >= 0.99
    assert dice(labels["service"], phantom.mask.transpose(2, 1, 0)) >= 0.85


def test_cli_lists_the_services_models_and_names_a_wrong_token(service):
    from test_cli import cli

    listed = cli("models", "list", "--server", service.url, "--token", TOKEN)
    assert listed.returncode == 0, listed.stderr
    assert "model phantom_sam2" in listed.stdout and "worker w0: idle" in listed.stdout
    refused = cli("models", "list", "--server", service.url, "--token", "wrong")
    assert refused.returncode == 2 and "refused the token" in refused.stderr
    down = cli("models", "list", "--server", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "unreachable" in down.stderr


def test_test_connection_shows_version_models_and_queues(service):
    from MedSAM2HITLLib import __version__
    from MedSAM2HITLLib.compute_backend import describe_service
    from MedSAM2HITLLib.errors import MedSAM2Error

    lines = describe_service(service.url + "/", TOKEN)
    assert lines[0] == f"service {service.url}: version {__version__}"
    assert any(line.startswith("model phantom_sam2 on cpu") for line in lines)
    assert "worker w0: idle, 0 job(s), 0 task(s) queued" in lines
    with pytest.raises(MedSAM2Error, match="refused the token"):
        describe_service(service.url, "wrong")
    with pytest.raises(MedSAM2Error, match="unreachable"):
        describe_service(f"http://127.0.0.1:{free_port()}", TOKEN)


def test_a_busy_service_tells_the_queue_position_until_the_volume_is_loaded(service, logic, tmp_path):
    """One worker propagating for client A: client B's upload waits in that worker's queue, and B is told so."""
    case, roi, segmentation, segment_id = segmented(logic, tmp_path, seed=5)
    other = service_logic(service.url, TOKEN)
    try:
        other.load_model(PHANTOM_CHECKPOINT).wait(30)
        (tmp_path / "b").mkdir()
        second = Case(tmp_path / "b", seed=6, grid="identity", axis=0)
        waiting = {}

        def on_progress(done, total):
            if done == 2 and not waiting:
                waiting["request"] = other.segment_slice(second.volume, second.roi(), None, axis="axial",
                                                         window="abdomen")

        propagation = logic.propagate(case.volume, segmentation, segment_id, axis="axial", roi_node=roi,
                                      window="abdomen", on_progress=on_progress)
        notices = set()
        while "request" not in waiting or not waiting["request"].done:
            logic.client.pump(0.02)
            other.client.pump(0.02)
            notices.add(other.client.notice)
        waiting["request"].wait(0)
        propagation.wait(120)
    finally:
        other.stop_worker()
    assert "the service is busy: this volume is number 1 in its worker's queue" in notices
    assert other.client.notice == ""  # cleared once the volume was loaded


def test_switching_between_this_computer_and_the_service_keeps_one_undo_history(service, tmp_path):
    """The panel's Compute choice swaps the client under the same logic: results of both undo in order."""
    from MedSAM2HITLLib.compute_backend import service_client
    from MedSAM2HITLLib.logic import SegmentationLogic
    from MedSAM2HITLLib.worker_client import WorkerClient

    logic = SegmentationLogic(WorkerClient())
    try:
        logic.load_model(PHANTOM_CHECKPOINT, device="cpu").wait(60)
        case = Case(tmp_path, seed=7, grid="identity", axis=0)
        segmentation, segment_id = logic.segment_slice(case.volume, case.roi(), None, axis="axial",
                                                       window="abdomen").wait(60)
        local_key = case.exported(segmentation, tmp_path).copy()
        logic.use_client(service_client(service.url, TOKEN))
        logic.client.load_model(PHANTOM_CHECKPOINT).wait(30)
        logic.propagate(case.volume, segmentation, segment_id, axis="axial", roi_node=case.roi(),
                        window="abdomen").wait(120)
        propagated = case.exported(segmentation, tmp_path)
        assert np.count_nonzero(propagated.any(axis=(0, 1))) > 1
        assert logic.undo(segmentation)
        assert np.array_equal(case.exported(segmentation, tmp_path), local_key)
        assert logic.undo(segmentation)
        assert not case.exported(segmentation, tmp_path).any()
        assert logic.redo(segmentation) and logic.redo(segmentation)
        assert np.array_equal(case.exported(segmentation, tmp_path), propagated)
    finally:
        logic.stop_worker()


def test_clicks_and_several_objects_on_the_service(service, logic, tmp_path):
    """A positive click alone, then two ROIs in one propagation: the transport runs the objects one after
    another on the service and the segments come back as locally (each on its object, none overlapping)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "Testing" / "Training"))
    from evaluate_phantom_model import dice, inside_point

    from MedSAM2HITLLib.point_prompts import add_point
    from MedSAM2HITLLib.segment_writer import create_segmentation, read_segment

    case = Case(tmp_path, seed=9, grid="identity", axis=0)
    phantom = case.phantom
    logic.load_model(PHANTOM_CHECKPOINT).wait(60)
    clicks = case.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Object clicks")
    x, y = inside_point(phantom.mask[case.key])  # identity grid: RAS (x, y, z) = file (i, j, k) = phantom [k, j, i]
    add_point(clicks, (x, y, case.key), positive=True)
    segmentation, segment_id = logic.segment_slice(case.volume, None, None, points_node=clicks,
                                                   window="abdomen").wait(60)
    assert dice(read_segment(segmentation, segment_id, case.volume)[case.key], phantom.mask[case.key]) >= 0.8

    segmentation = create_segmentation(case.scene, case.volume)
    objects = [(case.roi(), None)]
    for number, other in enumerate(phantom.distractors[:1], 2):
        k = int(np.argmax(other.sum(axis=(1, 2))))
        rows, cols = np.nonzero(other[k])
        objects.append((case.roi((np.array([cols.min() - 1, rows.min() - 1, k]),
                                  np.array([cols.max() + 1, rows.max() + 1, k])), name=f"Object {number}"), None))
    written = logic.propagate_objects(case.volume, segmentation, objects, axis="axial", window="abdomen").wait(300)
    masks = [read_segment(segmentation, segment_id, case.volume) for segment_id in written]
    assert len(masks) == 2 and (np.sum(masks, axis=0) <= 1).all()
    for mask, truth in zip(masks, phantom.objects):
        assert dice(mask, truth) >= 0.75
