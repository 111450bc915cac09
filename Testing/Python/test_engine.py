"""Engine behaviour with the real MedSAM2 architecture at random init (loaded through the real loader)."""

from __future__ import annotations

import numpy as np
import pytest

from MedSAM2HITLLib.engine import Engine, SliceMask
from MedSAM2HITLLib.errors import BadInputError, PropagationCancelled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(random_checkpoint):
    return Engine.load(random_checkpoint, device="cpu", threads=2)


@pytest.fixture
def volume():
    rng = np.random.default_rng(1)
    data = rng.normal(100, 30, size=(9, 48, 64)).astype(np.int16)
    data[:, 10:30, 20:44] += 300
    return data


def test_segment_slice_returns_a_bool_mask_of_the_slice_shape_on_each_axis(engine, volume):
    engine.set_volume(volume, "v")
    for axis, index in ((0, 4), (1, 20), (2, 30)):
        shape = tuple(s for a, s in enumerate(volume.shape) if a != axis)
        mask = engine.segment_slice(axis, index, (1, 1, shape[1] - 2, shape[0] - 2))
        assert mask.dtype == bool and mask.shape == shape


def test_the_volume_is_referenced_read_only_and_never_modified(engine, volume):
    before = volume.copy()
    engine.set_volume(volume, "v")
    engine.segment_slice(0, 2, (5, 5, 40, 30), window="abdomen")
    list(engine.propagate(0, 3, (5, 5, 40, 30), start=2, end=4))
    assert np.array_equal(volume, before)
    assert np.shares_memory(engine.volume, volume) and not engine.volume.flags.writeable
    assert volume.flags.writeable


def test_slices_along_any_axis_match_the_same_slice_moved_to_axis_zero(engine, volume):
    """Same pixels → same mask, whichever axis the slice is taken along (no transposes or flips)."""
    box = (3, 2, 7, 40)
    engine.set_volume(volume, "original")
    along_axis_2 = engine.segment_slice(2, 30, box)
    engine.set_volume(np.moveaxis(volume, 2, 0), "moved")
    along_axis_0 = engine.segment_slice(0, 30, box)
    assert np.array_equal(along_axis_2, along_axis_0)


def test_a_second_prompt_on_the_same_slice_skips_the_image_encoder(engine, volume, monkeypatch):
    calls = []
    encoder = engine.model.predictor.forward_image
    monkeypatch.setattr(engine.model.predictor, "forward_image", lambda image: calls.append(1) or encoder(image))
    engine.set_volume(volume, "cache-test")
    first = engine.segment_slice(0, 5, (20, 10, 43, 29))
    engine.segment_slice(0, 5, (22, 12, 40, 25))
    again = engine.segment_slice(0, 5, (20, 10, 43, 29))
    assert len(calls) == 1
    assert np.array_equal(first, again)
    engine.segment_slice(0, 5, (20, 10, 43, 29), window="lung")  # another preprocessing is another embedding
    engine.segment_slice(1, 5, (20, 1, 43, 7))  # another axis too
    assert len(calls) == 3


def test_new_content_under_the_same_volume_id_is_not_answered_from_old_embeddings(engine, volume):
    engine.set_volume(volume, "reused-id")
    before = engine.segment_slice(0, 4, (20, 10, 43, 29), window="mr")
    engine.set_volume(np.roll(volume, 9, axis=2), "reused-id")
    after = engine.segment_slice(0, 4, (20, 10, 43, 29), window="mr")
    assert not np.array_equal(before, after)


def test_an_mr_window_is_computed_once_per_volume(engine, volume, monkeypatch):
    import MedSAM2HITLLib.preprocessing as preprocessing

    calls = []
    original = preprocessing.mr_window
    monkeypatch.setattr(preprocessing, "mr_window", lambda v: calls.append(1) or original(v))
    engine.set_volume(volume, "mr-once")
    for index in (1, 2, 3):
        engine.segment_slice(0, index, (20, 10, 43, 29), window="mr")
    list(engine.propagate(0, 2, (20, 10, 43, 29), start=1, end=3, window="mr"))
    assert len(calls) == 1


@pytest.mark.parametrize(
    "box, message",
    [
        ((100, 100, 120, 130), "entirely outside"),
        ((-20, -5, -1, -1), "entirely outside"),
        ((10, 10, 10, 30), "empty"),
        ((10, 10, 30), "4 numbers"),
        ((10, float("nan"), 30, 30), "finite"),
        (("a", 1, 2, 3), "numbers"),
    ],
)
def test_bad_boxes_are_rejected_with_a_clear_message(engine, volume, box, message):
    engine.set_volume(volume, "v")
    with pytest.raises(BadInputError, match=message):
        engine.segment_slice(0, 2, box)


def test_boxes_are_ordered_and_clipped_to_the_slice(engine, volume):
    engine.set_volume(volume, "v")
    ordered = engine.segment_slice(0, 2, (0, 0, 63, 47))
    assert np.array_equal(engine.segment_slice(0, 2, (63, 47, 0, 0)), ordered)
    assert np.array_equal(engine.segment_slice(0, 2, (-50, -9, 500, 90)), ordered)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.segment_slice(3, 0, (1, 1, 5, 5)), "axis must be"),
        (lambda e: e.segment_slice(0, 9, (1, 1, 5, 5)), "outside the volume"),
        (lambda e: e.segment_slice(0, 1, (1, 1, 5, 5), window="liver"), "unknown intensity window"),
        (lambda e: e.propagate(0, 5, (1, 1, 5, 5), start=6, end=8), "contain the key slice"),
        (lambda e: e.propagate(0, 5, (1, 1, 5, 5), start=0, end=9), "within slices 0..8"),
        (lambda e: e.propagate(0, 5, np.zeros((48, 64), bool)), "mask prompt is empty"),
        (lambda e: e.propagate(0, 5, np.ones((64, 48), bool)), "mask prompt has shape"),
    ],
)
def test_bad_requests_fail_before_any_work(engine, volume, call, message):
    engine.set_volume(volume, "v")
    with pytest.raises(BadInputError, match=message):
        call(engine)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 3)])
def test_volumes_that_are_not_scalar_3d_are_rejected(engine, shape):
    with pytest.raises(BadInputError, match="scalar 3D"):
        engine.set_volume(np.zeros(shape, np.float32), "bad")


@pytest.mark.parametrize(
    "key, start, end, expected",
    [
        (4, 2, 6, [4, 5, 6, 3, 2]),
        (0, 0, 3, [0, 1, 2, 3]),
        (8, 5, 8, [8, 7, 6, 5]),
        (3, 3, 3, [3]),
    ],
)
def test_propagation_streams_key_then_forward_then_backward_over_the_inclusive_range(
    engine, volume, key, start, end, expected
):
    engine.set_volume(volume, "v")
    results = list(engine.propagate(0, key, (20, 10, 43, 29), start=start, end=end))
    assert [r.index for r in results] == expected
    assert [r.completed for r in results] == list(range(1, len(expected) + 1))
    assert all(r.total == len(expected) and r.mask.shape == (48, 64) and r.mask.dtype == bool for r in results)


def test_propagation_along_axis_two_yields_slices_of_that_axis(engine, volume):
    engine.set_volume(volume, "v")
    results = list(engine.propagate(2, 30, (10, 2, 29, 7), start=28, end=31))
    assert [r.index for r in results] == [30, 31, 29, 28]
    assert all(r.mask.shape == (9, 48) for r in results)


def test_the_key_slice_of_a_propagation_matches_segment_slice(engine, volume):
    engine.set_volume(volume, "v")
    box = (20, 10, 43, 29)
    first = next(iter(engine.propagate(0, 4, box, start=4, end=5)))
    assert first.index == 4
    assert np.array_equal(first.mask, engine.segment_slice(0, 4, box))


def test_a_mask_prompt_is_the_key_slice_result(engine, volume):
    """MedSAM2 uses a mask prompt as the key slice's output: a corrected slice seeds propagation as drawn."""
    engine.set_volume(volume, "v")
    drawn = np.zeros((48, 64), bool)
    drawn[12:30, 16:40] = True
    results = list(engine.propagate(0, 4, drawn, start=3, end=5))
    key = results[0]
    assert key.index == 4
    overlap = (key.mask & drawn).sum() / (key.mask | drawn).sum()
    assert overlap > 0.95


def test_cancel_stops_within_one_slice_and_keeps_what_was_yielded(engine, volume):
    engine.set_volume(volume, "v")
    seen: list[SliceMask] = []
    with pytest.raises(PropagationCancelled) as cancelled:
        for result in engine.propagate(0, 2, (20, 10, 43, 29), should_cancel=lambda: len(seen) >= 3):
            seen.append(result)
    assert [r.index for r in seen] == [2, 3, 4]
    assert cancelled.value.completed == [2, 3, 4]
    # The engine is usable right after a cancel.
    assert len(list(engine.propagate(0, 2, (20, 10, 43, 29), start=1, end=3))) == 3


def test_largest_component_removes_disconnected_slices_at_the_end(engine, volume):
    """A slice where the object vanishes splits the result; the filter re-yields the smaller side as empty."""
    engine.set_volume(volume, "v")
    raw = {r.index: r.mask for r in engine.propagate(0, 4, (20, 10, 43, 29))}
    filtered = list(engine.propagate(0, 4, (20, 10, 43, 29), largest_component=True))
    streamed = filtered[: len(raw)]
    assert {r.index: r.mask.tolist() for r in streamed} == {i: m.tolist() for i, m in raw.items()}
    final = {i: m for i, m in raw.items()}
    for correction in filtered[len(raw):]:
        final[correction.index] = correction.mask
    stack = np.stack([final[i] for i in sorted(final)])
    import SimpleITK as sitk

    components = sitk.ConnectedComponent(sitk.GetImageFromArray(stack.astype(np.uint8)))
    assert sitk.GetArrayFromImage(components).max() <= 1
    assert stack.sum() <= np.stack([raw[i] for i in sorted(raw)]).sum()
