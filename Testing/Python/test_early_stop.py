"""Propagation that stops where the object ends, with the phantom-trained fixture on phantoms it never saw.

What stopping must never do: end inside the object (a gap shorter than the patience), change a mask it computes,
skip a slice the user drew beyond the end, or stop one object of several while another goes on.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import DATA, REPO

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from evaluate_phantom_model import key_and_box  # noqa: E402
from phantoms import bounding_box, make_phantom  # noqa: E402

from MedSAM2HITLLib.errors import BadInputError  # noqa: E402

pytestmark = pytest.mark.slow

PATIENCE = 3


@pytest.fixture(scope="module")
def engine():
    from MedSAM2HITLLib.engine import Engine

    return Engine.load(DATA / "phantom_sam2.pt", device="cpu", threads=2)


@pytest.fixture(scope="module")
def phantom():
    """A target well inside a 48-slice volume: slices without it on both sides."""
    phantom = make_phantom(1_000_074, size=(48, 96, 96))  # target on slices 15-32, another object on 3-35
    slices = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    assert slices[0] > PATIENCE and slices[-1] < 47 - PATIENCE
    return phantom


def run(engine, axis, objects, patience, **options):
    """(the propagation, {(object, slice): mask}, slices in the order they came) of a whole-range pass."""
    propagation = engine.propagate_objects(axis, objects, patience=patience, **options)
    masks, order = {}, []
    for item in propagation:
        masks[item.object, item.index] = item.mask
        order.append(item.index)
    return propagation, masks, order


def expected_stop(masks: dict, obj: int, indices) -> int | None:
    """Where the engine's rule stops along `indices` (slices in tracking order): the slice completing `PATIENCE`
    empty masks in a row, or None when it reaches the end of the range."""
    empty = 0
    for index in indices:
        empty = 0 if masks[obj, index].any() else empty + 1
        if empty >= PATIENCE:
            return index
    return None


def test_tracking_stops_after_the_patience_on_both_sides_with_the_masks_it_has_without(engine, phantom):
    engine.set_volume(phantom.volume, "early-stop")
    key, box = key_and_box(phantom, 0)
    _, full, _ = run(engine, 0, [{key: box}], None, window=phantom.window)
    stopped, masks, order = run(engine, 0, [{key: box}], PATIENCE, window=phantom.window)
    forward = expected_stop(full, 0, range(key, 48))
    backward = expected_stop(full, 0, range(key - 1, -1, -1))
    assert forward is not None and backward is not None, "the object ends inside the volume on both sides"
    assert stopped.ended_early == {"forward": forward, "backward": backward}
    assert sorted(order) == list(range(backward, forward + 1))  # nothing beyond is computed or yielded
    assert all(np.array_equal(mask, full[slot]) for slot, mask in masks.items())
    assert all(not masks[0, i].any() for i in (*range(forward - PATIENCE + 1, forward + 1),
                                               *range(backward, backward + PATIENCE)))
    truth = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    assert backward < truth[0] and forward > truth[-1], "it stopped where the true object still was"


def test_a_gap_shorter_than_the_patience_does_not_stop_tracking_and_a_longer_one_does(engine, phantom):
    """The target is blanked out on a few slices above the key (those slices replaced by one without it)."""
    key, box = key_and_box(phantom, 0)
    truth = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    for gap, stops_in_gap in ((PATIENCE - 1, False), (PATIENCE + 2, True)):
        volume = phantom.volume.copy()
        blanked = list(range(key + 2, key + 2 + gap))
        volume[blanked] = phantom.volume[0]
        engine.set_volume(volume, f"gap-{gap}")
        _, full, _ = run(engine, 0, [{key: box}], None, window=phantom.window)
        assert not any(full[0, i].any() for i in blanked), "the model sees the gap as empty"
        propagation, masks, _ = run(engine, 0, [{key: box}], PATIENCE, window=phantom.window)
        reached = propagation.ended_early["forward"]
        if stops_in_gap:
            assert reached == blanked[PATIENCE - 1]
        else:
            assert reached > truth[-1] and masks[0, blanked[-1] + 1].any()


def test_several_objects_stop_when_all_have_ended_each_where_it_ends(engine, phantom):
    """Two objects of one phantom through one pass: each is tracked until it ends, the pass until both have."""
    objects = []
    for mask in (phantom.mask, phantom.distractors[0]):
        key = int(np.argmax(mask.sum(axis=(1, 2))))
        objects.append({key: bounding_box(mask[key])})
    engine.set_volume(phantom.volume, "two-objects")
    _, full, _ = run(engine, 0, objects, None, window=phantom.window)
    propagation, masks, _ = run(engine, 0, objects, PATIENCE, window=phantom.window)
    ends = []
    for obj, prompts in enumerate(objects):
        key = min(prompts)
        forward = expected_stop(full, obj, range(key, 48))
        done = sorted(index for o, index in masks if o == obj)
        assert done[-1] == (47 if forward is None else forward)
        ends.append(done[-1])
    assert propagation.ended_early.get("forward", 47) == max(ends)
    assert all(np.array_equal(mask, full[slot]) for slot, mask in masks.items())


def test_a_slice_the_user_drew_beyond_the_end_keeps_tracking_going_to_it(engine, phantom):
    """A wide gap stops tracking; with a mask the user drew after it, tracking goes on to it and beyond."""
    key, box = key_and_box(phantom, 0)
    truth = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    volume = phantom.volume.copy()
    blanked = list(range(key + 2, key + 8))
    volume[blanked] = phantom.volume[0]
    drawn = blanked[-1] + 1
    engine.set_volume(volume, "beyond")
    alone, _, _ = run(engine, 0, [{key: box}], PATIENCE, window=phantom.window)
    assert alone.ended_early["forward"] < drawn
    with_drawn, masks, _ = run(engine, 0, [{key: box, drawn: phantom.mask[drawn]}], PATIENCE, window=phantom.window)
    assert np.array_equal(masks[0, drawn], phantom.mask[drawn])
    assert with_drawn.ended_early["forward"] > truth[-1] and (0, drawn + 1) in masks


def test_patience_must_be_a_positive_number_of_slices(engine, phantom):
    engine.set_volume(phantom.volume, "early-stop")
    key, box = key_and_box(phantom, 0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BadInputError, match="patience must be"):
            engine.propagate(0, key, box, patience=bad)


def test_the_cli_stops_where_the_object_ends_and_says_so_unless_told_not_to(phantom, tmp_path):
    """Through the CLI (logic, worker, engine): the default stops and reports it; --no-early-stop and a range
    given with --start/--end go through every slice; the labels of the stopped run equal the full run's."""
    import nibabel as nib

    from test_cli import cli

    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(phantom.volume.transpose(2, 1, 0), np.eye(4)), path)  # [k, j, i] → file (i, j, k)
    x0, y0, x1, y1 = phantom.box()
    k = phantom.key_index
    common = ["--box-ras", *map(str, (x0 - 1, y0 - 1, k, x1 + 1, y1 + 1, k)), "--propagate", "--window",
              phantom.window, "--checkpoint", str(DATA / "phantom_sam2.pt"), "--device", "cpu", "--threads", "2"]
    labels = {}
    for name, extra in (("on", []), ("off", ["--no-early-stop"]), ("range", ["--start", "0", "--end", "47"])):
        labelmap = tmp_path / f"{name}.nii.gz"
        result = cli("segment", str(path), *common, *extra, "-o", str(tmp_path / f"{name}.seg.nrrd"),
                     "--labelmap", str(labelmap))
        assert result.returncode == 0, result.stderr
        labels[name] = np.asarray(nib.load(labelmap).dataobj) > 0
        if name == "on":
            assert "(forward)" in result.stderr and "(backward): the object ended" in result.stderr, result.stderr
            assert "propagated 48 slices" not in result.stderr
        else:
            assert "propagated 48 slices" in result.stderr and "the object ended" not in result.stderr
    assert np.array_equal(labels["on"], labels["off"]) and np.array_equal(labels["off"], labels["range"])
    assert labels["on"][..., k].any()
