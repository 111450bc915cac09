"""Slice and range writes into a segment, read-back, geometry handling and exact undo/redo (headless MRML)."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import AFFINES, affine_from, scene  # noqa: F401  (pytest fixture)

from MedSAM2HITLLib import segment_writer as sw
from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.mrml_scene import add_volume_from_array

pytestmark = pytest.mark.unit

SHAPE = (14, 18, 22)  # [k, j, i]


def _blob(rng, shape=SHAPE, fill=0.3) -> np.ndarray:
    return rng.random(shape) < fill


@pytest.fixture
def setup(scene):  # noqa: F811
    """Volume on an oblique grid, segmentation with two overlapping, pre-filled segments."""
    rng = np.random.default_rng(7)
    volume = add_volume_from_array(scene, rng.normal(size=SHAPE).astype(np.float32), AFFINES["oblique"], "MR")
    segmentation = sw.create_segmentation(scene, volume)
    first = sw.get_or_create_segment(segmentation, "liver")
    second = sw.get_or_create_segment(segmentation, "lesion")
    contents = {first: _blob(rng), second: _blob(rng)}
    for segment_id, content in contents.items():
        sw.write_slices(segmentation, segment_id, volume, 0, {k: content[k] for k in range(SHAPE[0])})
    return scene, volume, segmentation, contents, rng


def _state(segmentation, volume) -> dict[str, np.ndarray]:
    ids = segmentation.GetSegmentation().GetSegmentIDs()
    return {segment_id: sw.read_segment(segmentation, segment_id, volume) for segment_id in ids}


def _assert_state(segmentation, volume, expected: dict[str, np.ndarray]) -> None:
    state = _state(segmentation, volume)
    assert state.keys() == expected.keys()
    for segment_id, content in expected.items():
        np.testing.assert_array_equal(state[segment_id], content, err_msg=segment_id)


def test_prefill_is_read_back_exactly_and_matches_slicer_util(setup):
    import slicer

    _, volume, segmentation, contents, _ = setup
    _assert_state(segmentation, volume, contents)
    for segment_id, content in contents.items():  # Slicer's own export path agrees with our reader
        exported = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        np.testing.assert_array_equal(exported.astype(bool), content)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_write_replaces_only_that_slice_of_that_segment(setup, axis):
    scene, volume, segmentation, contents, rng = setup
    target, other = list(contents)
    index = SHAPE[axis] // 2
    nodes_before = scene.GetNumberOfNodes()
    mask = _blob(rng, tuple(np.delete(SHAPE, axis)), 0.5)
    sw.write_slice(segmentation, target, volume, axis, index, mask)

    expected = {segment_id: content.copy() for segment_id, content in contents.items()}
    np.moveaxis(expected[target], axis, 0)[index] = mask
    _assert_state(segmentation, volume, expected)
    np.testing.assert_array_equal(sw.read_slice(segmentation, target, volume, axis, index), mask)
    other_slice = sw.read_slice(segmentation, other, volume, axis, index)
    np.testing.assert_array_equal(other_slice, np.take(contents[other], index, axis))
    assert scene.GetNumberOfNodes() == nodes_before  # no temporary or display nodes left behind


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_range_writes_in_batches_replace_only_those_slices(setup, axis):
    _, volume, segmentation, contents, rng = setup
    target, _ = list(contents)
    key = SHAPE[axis] // 2
    # Propagation order: key, forward, then backward; delivered in batches, one batch not contiguous.
    order = [key, *range(key + 1, SHAPE[axis] - 2), *range(key - 1, 1, -1)]
    batches = [order[:3], order[3:5] + order[-2:], order[5:-2]]
    expected = {segment_id: content.copy() for segment_id, content in contents.items()}
    for batch in batches:
        masks = {index: _blob(rng, tuple(np.delete(SHAPE, axis)), 0.4) for index in batch}
        sw.write_slices(segmentation, target, volume, axis, masks)
        for index, mask in masks.items():
            np.moveaxis(expected[target], axis, 0)[index] = mask
        _assert_state(segmentation, volume, expected)
    untouched = [0, 1, SHAPE[axis] - 2, SHAPE[axis] - 1]
    np.testing.assert_array_equal(
        np.take(expected[target], untouched, axis), np.take(contents[target], untouched, axis)
    )


def test_empty_masks_clear_slices_and_new_segment_starts_empty(setup):
    _, volume, segmentation, contents, _ = setup
    target, _ = list(contents)
    sw.write_slices(segmentation, target, volume, 2, {i: np.zeros(SHAPE[:2], bool) for i in range(SHAPE[2])})
    assert not sw.read_segment(segmentation, target, volume).any()
    fresh = sw.get_or_create_segment(segmentation, "spleen", segment_id="spleen")
    assert fresh == "spleen"  # AddEmptySegment's first argument is the ID
    assert sw.get_or_create_segment(segmentation, "spleen") == "spleen"
    assert sw.get_or_create_segment(segmentation, "liver") == target
    assert not sw.read_slice(segmentation, fresh, volume, 1, 3).any()


def test_undo_redo_restore_exactly_and_propagation_is_one_step(setup):
    _, volume, segmentation, contents, rng = setup
    target, other = list(contents)
    history = sw.SegmentationHistory(segmentation)
    states = [_state(segmentation, volume)]

    history.save_state()  # "Segment slice"
    sw.write_slice(segmentation, target, volume, 1, 5, _blob(rng, (SHAPE[0], SHAPE[2]), 0.6))
    states.append(_state(segmentation, volume))

    history.save_state()  # "Propagate", cancelled after two batches: the completed slices stay
    sw.write_slices(segmentation, other, volume, 0, {k: _blob(rng, SHAPE[1:], 0.6) for k in (6, 7, 8)})
    sw.write_slices(segmentation, other, volume, 0, {k: _blob(rng, SHAPE[1:], 0.6) for k in (5, 4)})
    states.append(_state(segmentation, volume))

    assert history.can_undo and not history.can_redo
    assert history.undo()  # one undo removes the whole propagation
    _assert_state(segmentation, volume, states[1])
    assert history.undo()
    _assert_state(segmentation, volume, states[0])
    assert not history.undo()
    _assert_state(segmentation, volume, states[0])
    assert history.redo()
    _assert_state(segmentation, volume, states[1])
    assert history.redo()
    _assert_state(segmentation, volume, states[2])
    assert not history.redo()

    assert history.undo()
    history.save_state()  # a new operation after undo drops the redo branch
    sw.write_slice(segmentation, target, volume, 2, 0, np.ones(SHAPE[:2], bool))
    assert not history.can_redo
    assert history.undo()
    _assert_state(segmentation, volume, states[1])


def test_one_history_with_the_segment_editor_model_and_manual_edits_undo_in_order(setup):
    """Model write, a paint stroke as the Segment Editor makes it, model write: undo x3 / redo x3 are exact,
    whether the panel (history) or the editor (its logic's Undo/Redo) asks."""
    _, volume, segmentation, contents, rng = setup
    target, other = list(contents)
    history = sw.SegmentationHistory(segmentation)
    editor = history.editor  # the Segment Editor's logic: what its Undo button and paint effect call
    assert editor.GetClassName() == "vtkSlicerSegmentEditorLogic"
    states = [_state(segmentation, volume)]

    history.save_state()  # the model's slice
    sw.write_slice(segmentation, target, volume, 0, 4, _blob(rng, SHAPE[1:], 0.5))
    states.append(_state(segmentation, volume))
    editor.SaveStateForUndo()  # a paint stroke: the editor saves its state, then edits the labelmap
    sw.write_slice(segmentation, target, volume, 0, 4, np.zeros(SHAPE[1:], bool))
    states.append(_state(segmentation, volume))
    history.save_state()  # the model's propagation
    sw.write_slices(segmentation, other, volume, 0, {k: _blob(rng, SHAPE[1:], 0.5) for k in (5, 6, 7)})
    states.append(_state(segmentation, volume))

    assert history.undo()
    _assert_state(segmentation, volume, states[2])
    editor.Undo()  # the editor's Undo takes the paint stroke back: the same stack
    _assert_state(segmentation, volume, states[1])
    assert history.undo()
    _assert_state(segmentation, volume, states[0])
    assert not history.can_undo and not editor.CanUndo()
    for expected in states[1:]:
        assert history.redo()
        _assert_state(segmentation, volume, expected)
    assert not history.can_redo and not editor.CanRedo()


def test_geometry_is_adopted_or_refused(scene):  # noqa: F811
    volume = add_volume_from_array(scene, np.zeros(SHAPE, np.int16), AFFINES["left_handed"], "CT")
    other_grid = add_volume_from_array(scene, np.zeros(SHAPE, np.int16), AFFINES["flipped"], "other")

    bare = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # no reference geometry yet
    segment = sw.get_or_create_segment(bare, "a")
    mask = np.zeros(SHAPE[1:], bool)
    mask[3:9, 4:12] = True
    sw.write_slice(bare, segment, volume, 0, 4, mask)  # adopts the volume's grid
    np.testing.assert_array_equal(sw.read_slice(bare, segment, volume, 0, 4), mask)

    with pytest.raises(BadInputError, match="different voxel grid"):
        sw.write_slice(bare, segment, other_grid, 0, 4, mask)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(BadInputError, match="different transform"):
        sw.ensure_geometry(bare, volume)

    empty = sw.create_segmentation(scene, other_grid)
    second = sw.get_or_create_segment(empty, "b")
    sw.ensure_geometry(empty, volume)  # still empty: takes the new volume's grid and transform
    assert empty.GetTransformNodeID() == transform.GetID()
    sw.write_slice(empty, second, volume, 0, 2, mask)
    np.testing.assert_array_equal(sw.read_slice(empty, second, volume, 0, 2), mask)


def test_bad_writes_give_clear_errors(setup):
    _, volume, segmentation, contents, _ = setup
    target, _ = list(contents)
    with pytest.raises(BadInputError, match="has shape"):
        sw.write_slice(segmentation, target, volume, 0, 3, np.zeros((5, 5), bool))
    with pytest.raises(BadInputError, match=r"slice 14 is outside the volume: array axis 0 has slices 0\.\.13"):
        sw.write_slice(segmentation, target, volume, 0, 14, np.zeros(SHAPE[1:], bool))
    with pytest.raises(BadInputError, match="does not exist"):
        sw.write_slice(segmentation, "nope", volume, 0, 3, np.zeros(SHAPE[1:], bool))
    with pytest.raises(BadInputError, match="array axis"):
        sw.read_slice(segmentation, target, volume, 3, 0)
    _assert_state(segmentation, volume, contents)  # nothing was written


def test_write_cost_stays_per_slice_on_a_large_volume(scene):  # noqa: F811
    """On a 512×512×200 volume, writing and reading a slice must not re-process the whole segment each time
    (Slicer's merge-based SetBinaryLabelmapToSegment takes ~0.1 s per slice here)."""
    import time

    volume = add_volume_from_array(scene, np.zeros((200, 512, 512), np.int16), affine_from(np.eye(3), [0, 0, 0]))
    segmentation = sw.create_segmentation(scene, volume)
    segment = sw.get_or_create_segment(segmentation, "a")
    mask = np.zeros((512, 512), bool)
    mask[100:300, 120:330] = True
    sw.write_slices(segmentation, segment, volume, 0, {k: mask for k in range(50, 150)})
    moved = np.roll(mask, (-20, 15), axis=(0, 1))
    start = time.perf_counter()
    for k in range(60, 80):  # one slice at a time, as a propagation without batching would
        sw.write_slice(segmentation, segment, volume, 0, k, moved)
    write_seconds = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    read = sw.read_slice(segmentation, segment, volume, 0, 70)
    read_seconds = time.perf_counter() - start
    np.testing.assert_array_equal(read, moved)
    np.testing.assert_array_equal(sw.read_slice(segmentation, segment, volume, 0, 80), mask)
    assert write_seconds < 0.02
    assert read_seconds < 0.02


def test_headless_scene_supports_slicer_util_without_leaking_nodes(setup):
    """create_scene registers the logics slicer.util needs; its temporary labelmaps leave nothing behind."""
    import slicer

    scene, volume, segmentation, contents, rng = setup
    target, _ = list(contents)
    replacement = _blob(rng)
    nodes_before = scene.GetNumberOfNodes()
    for _ in range(3):
        slicer.util.updateSegmentBinaryLabelmapFromArray(replacement.astype(np.uint8), segmentation, target, volume)
        slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, target, volume)
    assert scene.GetNumberOfNodes() == nodes_before
    np.testing.assert_array_equal(sw.read_segment(segmentation, target, volume), replacement)


def test_write_into_a_layer_shared_with_other_segments_leaves_them_intact(scene):  # noqa: F811
    """Segments sharing one labelmap layer (as saved by Slicer's Segment Editor) keep their voxels."""
    volume = add_volume_from_array(scene, np.zeros(SHAPE, np.int16), AFFINES["flipped"])
    segmentation = sw.create_segmentation(scene, volume)
    first = sw.get_or_create_segment(segmentation, "left")
    second = sw.get_or_create_segment(segmentation, "right")
    left = np.zeros(SHAPE, bool)
    left[2:12, 3:15, 2:10] = True
    right = np.zeros(SHAPE, bool)
    right[2:12, 3:15, 12:20] = True
    sw.write_slices(segmentation, first, volume, 0, {k: left[k] for k in range(SHAPE[0])})
    sw.write_slices(segmentation, second, volume, 0, {k: right[k] for k in range(SHAPE[0])})
    layers = segmentation.GetSegmentation()
    layers.CollapseBinaryLabelmaps(False)
    assert layers.GetNumberOfLayers() == 1 and layers.GetSegment(second).GetLabelValue() != 1

    grown = np.zeros(SHAPE[:2], bool)
    grown[:, :] = True  # the whole slice, across the other segment too
    sw.write_slice(segmentation, first, volume, 2, 15, grown)
    left[:, :, 15] = True
    _assert_state(segmentation, volume, {first: left, second: right})
