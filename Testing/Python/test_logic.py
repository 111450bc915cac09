"""SegmentationLogic on a headless MRML scene through a real worker process (random-init MedSAM2)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import logic_with_model
from MedSAM2HITLLib.errors import BadInputError, PropagationCancelled

pytestmark = pytest.mark.slow

SHAPE = (14, 40, 48)  # [k, j, i]
SPACING_K = 2.0


@pytest.fixture(scope="module")
def logic(random_checkpoint):
    yield from logic_with_model(random_checkpoint)


@pytest.fixture
def scene_nodes():
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array, create_scene

    scene = create_scene()
    data = np.random.default_rng(0).normal(0, 20, SHAPE).astype(np.int16)
    data[3:11, 10:30, 12:36] += 400
    volume = add_volume_from_array(scene, data, np.diag([1.0, 1.0, SPACING_K, 1.0]), "phantom")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Lesion")
    roi.SetCenter(23.5, 19.5, 7 * SPACING_K)  # voxel centres: RAS = (i, j, 2k)
    roi.SetSize(26, 22, 1)
    return scene, volume, roi, data


def segment_array(segmentation, segment_id, volume) -> np.ndarray:
    from MedSAM2HITLLib.segment_writer import read_segment

    return read_segment(segmentation, segment_id, volume)


def test_segment_slice_writes_only_the_roi_slice_and_undo_restores(logic, scene_nodes):
    scene, volume, roi, data = scene_nodes
    segmentation, segment_id = logic.segment_slice(volume, roi, None, axis="axial", window="abdomen").wait(120)
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "Lesion"
    mask = segment_array(segmentation, segment_id, volume)
    assert np.flatnonzero(mask.any(axis=(1, 2))).tolist() == [7]
    assert logic.undo(segmentation)
    assert not segment_array(segmentation, segment_id, volume).any()
    assert logic.redo(segmentation)
    assert np.array_equal(segment_array(segmentation, segment_id, volume), mask)


def test_the_volume_is_never_modified(logic, scene_nodes):
    import slicer.util

    scene, volume, roi, data = scene_nodes
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
    logic.propagate(volume, segmentation, segment_id, roi_node=roi, start=5, end=9, window="abdomen").wait(120)
    assert np.array_equal(slicer.util.arrayFromVolume(volume), data)


def test_propagation_writes_the_range_keeps_other_segments_and_undoes_in_one_step(logic, scene_nodes):
    scene, volume, roi, data = scene_nodes
    segmentation, first = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
    from MedSAM2HITLLib.segment_writer import get_or_create_segment, write_slice

    other = get_or_create_segment(segmentation, "Other")
    marked = np.zeros(SHAPE[1:], bool)
    marked[2:5, 2:5] = True
    write_slice(segmentation, other, volume, 0, 12, marked)
    before = segment_array(segmentation, first, volume)
    progress = []
    written = logic.propagate(volume, segmentation, first, roi_node=roi, start=4, end=10, window="abdomen",
                              on_progress=lambda done, total: progress.append((done, total))).wait(120)
    assert sorted(written) == list(range(4, 11))
    assert progress[-1] == (7, 7)
    after = segment_array(segmentation, first, volume)
    assert not after[:4].any() and not after[11:].any()
    assert np.array_equal(segment_array(segmentation, other, volume)[12], marked)
    assert logic.undo(segmentation)
    assert np.array_equal(segment_array(segmentation, first, volume), before)


def test_range_from_roi_extent(logic, scene_nodes):
    scene, volume, roi, data = scene_nodes
    roi.SetSize(26, 22, 4.5)  # covers k = 6, 7, 8 (z = 12, 14, 16)
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
    written = logic.propagate(volume, segmentation, segment_id, roi_node=roi, range_from_roi=True,
                              window="abdomen").wait(120)
    assert sorted(written) == [6, 7, 8]


def test_propagate_from_a_corrected_slice_keeps_it_exactly(logic, scene_nodes):
    from MedSAM2HITLLib.segment_writer import create_segmentation, get_or_create_segment, write_slice

    scene, volume, roi, data = scene_nodes
    segmentation = create_segmentation(scene, volume)
    segment_id = get_or_create_segment(segmentation, "Drawn")
    drawn = np.zeros(SHAPE[1:], bool)
    drawn[12:27, 14:33] = True
    drawn[15:18, 20:22] = False  # a detail the model's mask-prompt round trip would not keep
    write_slice(segmentation, segment_id, volume, 0, 5, drawn)
    written = logic.propagate(volume, segmentation, segment_id, from_segment=True, key_index=5, start=3, end=8,
                              window="abdomen").wait(120)
    assert 5 not in written and sorted(written) == [3, 4, 6, 7, 8]
    assert np.array_equal(segment_array(segmentation, segment_id, volume)[5], drawn)


def test_propagate_from_an_empty_slice_is_refused_before_any_work(logic, scene_nodes):
    from MedSAM2HITLLib.segment_writer import create_segmentation, get_or_create_segment

    scene, volume, roi, data = scene_nodes
    segmentation = create_segmentation(scene, volume)
    segment_id = get_or_create_segment(segmentation, "Empty")
    with pytest.raises(BadInputError, match="empty on slice 5"):
        logic.propagate(volume, segmentation, segment_id, from_segment=True, key_index=5)


def test_cancel_keeps_completed_slices_and_one_undo_removes_them(logic, scene_nodes):
    scene, volume, roi, data = scene_nodes
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
    before = segment_array(segmentation, segment_id, volume)
    arrived = []

    def on_progress(done, total):
        arrived.append(done)
        if done == 3:
            logic.cancel()

    request = logic.propagate(volume, segmentation, segment_id, roi_node=roi, window="abdomen", on_progress=on_progress)
    with pytest.raises(PropagationCancelled) as cancelled:
        request.wait(120)
    completed = cancelled.value.completed
    assert 3 <= len(completed) < SHAPE[0]
    after = segment_array(segmentation, segment_id, volume)
    changed = {k for k in range(SHAPE[0]) if not np.array_equal(after[k], before[k])}
    assert changed <= set(completed)
    assert logic.undo(segmentation)
    assert np.array_equal(segment_array(segmentation, segment_id, volume), before)


def test_a_changed_volume_is_sent_again(logic, scene_nodes):
    import slicer.util

    scene, volume, roi, data = scene_nodes
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
    first = segment_array(segmentation, segment_id, volume)[7].copy()
    slicer.util.updateVolumeFromArray(volume, np.zeros(SHAPE, np.int16))
    logic.segment_slice(volume, roi, segmentation, segment_id, window="abdomen").wait(120)
    second = segment_array(segmentation, segment_id, volume)[7]
    assert not np.array_equal(first, second)  # a blank slice gives another mask than the block did


def test_closing_the_scene_frees_the_workers_volumes_and_the_histories(logic, scene_nodes):
    scene, volume, roi, data = scene_nodes
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
    assert logic.history(segmentation).can_undo
    held = logic.client.status().wait(30)["volumes"]
    assert held
    import time

    logic.forget_scene()
    deadline = time.monotonic() + 10  # status is answered at once, ahead of the queued forget requests
    while logic.client.status().wait(30)["volumes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not logic.client.status().wait(30)["volumes"]
    assert not logic.history(segmentation).can_undo  # a fresh history: the closed scene's is gone
    logic.segment_slice(volume, roi, segmentation, segment_id, window="abdomen").wait(120)  # sent again on demand


def test_stopping_at_once_does_not_wait_for_a_running_propagation(random_checkpoint, scene_nodes):
    import time

    from MedSAM2HITLLib.logic import SegmentationLogic
    from MedSAM2HITLLib.worker_client import WorkerError

    scene, volume, roi, data = scene_nodes
    logic = SegmentationLogic()
    logic.load_model(random_checkpoint, device="cpu", threads=2).wait(120)
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
    pid = logic.client.status().wait(30)["pid"]
    stopped = {}

    def on_progress(done, total):
        if not stopped:
            began = time.monotonic()
            logic.stop_worker(at_once=True)
            stopped["seconds"] = time.monotonic() - began

    request = logic.propagate(volume, segmentation, segment_id, roi_node=roi, window="abdomen", on_progress=on_progress)
    with pytest.raises(WorkerError):
        request.wait(60)
    assert stopped["seconds"] < 1.0
    assert logic.client.state == "stopped"
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
