"""End-to-end behaviour of the Engine with a model that really segments: the phantom-trained fixture.

The fixture (Testing/Data/phantom_sam2.pt, made by Testing/Training/train_phantom_model.py) is a small SAM2.1
model; these tests check, on phantoms it never saw, that it meets issue 5's quality targets (with a small
margin), that the mask follows the box (another object's box gives that object, in 2D and through propagation;
a box on empty background labels next to nothing), and that slices along any array axis give the same masks in
the right place.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "Training"))

from evaluate_phantom_model import (  # noqa: E402
    TARGET_2D,
    TARGET_3D,
    dice,
    evaluate_case,
    held_out_phantom,
    propagate_volume,
)
from phantoms import make_phantom  # noqa: E402

pytestmark = pytest.mark.slow

CHECKPOINT = REPO / "Testing" / "Data" / "phantom_sam2.pt"
CASES_PER_SET = 8  # of each held-out set; the first ones, not chosen
MARGIN = 0.05


@pytest.fixture(scope="module")
def engine():
    from MedSAM2HITLLib.engine import Engine

    return Engine.load(CHECKPOINT, device="cpu", threads=2)


@pytest.fixture(scope="module")
def held_out_results(engine):
    return [evaluate_case(engine, held_out_phantom(s, i), f"{s}-{i}") for s in ("seeds", "unseen")
            for i in range(CASES_PER_SET)]


def test_fixture_loads_through_the_normal_loader():
    from MedSAM2HITLLib.model import load_model

    assert CHECKPOINT.stat().st_size <= 20 * 2**20
    model = load_model(CHECKPOINT, device="cpu")
    assert model.config == CHECKPOINT.with_suffix(".yaml")
    assert model.image_size == 128


def test_key_slice_dice_on_held_out_phantoms_meets_the_target(held_out_results):
    """A box gives the target on phantoms of other seeds and of unseen shapes and orientations."""
    scores = [r.dice_2d for r in held_out_results]
    assert np.mean(scores) >= TARGET_2D - MARGIN, np.round(scores, 2)


def test_propagated_dice_on_held_out_phantoms_meets_the_target(held_out_results):
    """The box's object is followed through ≥ 44 slices both ways (extra slices past its ends cost Dice)."""
    scores = [r.dice_3d for r in held_out_results]
    assert np.mean(scores) >= TARGET_3D - MARGIN, np.round(scores, 2)


@pytest.mark.parametrize("axis", [1, 2])
def test_other_slice_axes_give_the_same_masks(engine, axis):
    """The same slices stacked along another array axis must give the same masks, placed on that axis."""
    phantom = held_out_phantom("seeds", 0)
    key, box = phantom.key_index, phantom.box()
    engine.set_volume(phantom.volume, "axis0")
    expected_2d = engine.segment_slice(0, key, box, window=phantom.window)
    expected_3d = propagate_volume(engine, 0, key, box, phantom.window)
    moved = np.moveaxis(phantom.volume, 0, axis)
    engine.set_volume(moved, f"axis{axis}")
    assert np.array_equal(engine.segment_slice(axis, key, box, window=phantom.window), expected_2d)
    result = propagate_volume(engine, axis, key, box, phantom.window)
    assert np.array_equal(np.moveaxis(result, axis, 0), expected_3d)


def _background_box(objects: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """A size x size box touching no object, nearest the slice centre (so on the body, not on air)."""
    rows, cols = objects.shape
    best = None
    for y in range(0, rows - size, 4):
        for x in range(0, cols - size, 4):
            if objects[max(0, y - 3):y + size + 3, max(0, x - 3):x + size + 3].any():
                continue
            distance = abs(y + size / 2 - rows / 2) + abs(x + size / 2 - cols / 2)
            if best is None or distance < best[0]:
                best = (distance, (x, y, x + size - 1, y + size - 1))
    assert best is not None, "no free background in this phantom"
    return best[1]


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_box_on_empty_background_labels_nothing_in_the_box(engine, modality):
    """At most 5 % of the box is labelled, and no object is taken: at most a fifth of one (≤ 12 % seen)."""
    for seed in range(2_000_001, 2_000_005):
        phantom = make_phantom(seed, size=(48, 112, 112), modality=modality, distractors=2)
        key = phantom.key_index
        objects = np.logical_or.reduce([o[key] for o in phantom.objects])
        x0, y0, x1, y1 = box = _background_box(objects, 20)
        engine.set_volume(phantom.volume, f"empty-box-{seed}-{modality}")
        mask = engine.segment_slice(0, key, box, window=phantom.window)
        assert mask[y0:y1 + 1, x0:x1 + 1].sum() <= 0.05 * 20 * 20, f"seed {seed}: box {box}"
        for other in phantom.objects:
            assert np.logical_and(mask, other[key]).sum() <= 0.2 * other[key].sum(), f"seed {seed}: box {box}"


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_box_on_another_object_segments_and_follows_that_object(engine, modality):
    """The mask follows the box, not the most salient object: a box on each object gives that object."""
    phantom = make_phantom(2_000_002, size=(48, 112, 112), modality=modality, distractors=3)
    assert len(phantom.distractors) >= 2
    engine.set_volume(phantom.volume, f"objects-{modality}")
    key_dice = []
    for number, target in enumerate(phantom.objects):
        index = int(np.argmax(target.sum(axis=(1, 2))))
        box = phantom.box(index, target)
        mask = engine.segment_slice(0, index, box, window=phantom.window)
        # the least precise of the seven: 97.7 % of its mask inside its object (88.5 % before stage 5)
        assert np.logical_and(mask, target[index]).sum() >= 0.9 * mask.sum() > 0, f"object {number}"
        key_dice.append(dice(mask, target[index]))
        found = propagate_volume(engine, 0, index, box, phantom.window)
        assert dice(found, target) >= 0.7, f"object {number}"
        # the least precise: 96.1 % inside its object (77 % before stage 5)
        assert np.logical_and(found, target).sum() >= 0.8 * found.sum(), f"object {number}"
    # key-slice Dice 0.95-0.99 since stage 5 (a low-contrast CT object was under-segmented before: 0.38-0.93)
    assert np.mean(key_dice) >= 0.9, np.round(key_dice, 2)
