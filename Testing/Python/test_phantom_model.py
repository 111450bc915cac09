"""End-to-end behaviour of the Engine with a model that really segments: the phantom-trained fixture.

The fixture (Testing/Data/phantom_sam2.pt, made by Testing/Training/train_phantom_model.py) is a small SAM2.1
model; these tests check, on phantoms it never saw, that key-slice masks land on the boxed target, that an
empty box gives an empty mask, and that slices along any array axis give the same masks in the right place.
The fixture does not reach issue 5's quality targets (see Testing/Data/README.md): its propagation often
drifts to a look-alike, so 3D Dice and prompt-vs-prompt comparisons are not asserted here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "Training"))

from evaluate_phantom_model import dice, held_out_phantom, propagate_volume  # noqa: E402
from phantoms import Phantom, make_phantom  # noqa: E402

CHECKPOINT = REPO / "Testing" / "Data" / "phantom_sam2.pt"
MEDIAN_2D_FLOOR = 0.7


def evaluate_key_slice(engine, phantom: Phantom) -> float:
    engine.set_volume(phantom.volume, f"{phantom.seed}-{phantom.held_out}")
    mask = engine.segment_slice(0, phantom.key_index, phantom.box(), window=phantom.window)
    return dice(mask, phantom.mask[phantom.key_index])


@pytest.fixture(scope="module")
def engine():
    from MedSAM2HITLLib.engine import Engine

    return Engine.load(CHECKPOINT, device="cpu", threads=2)


def test_fixture_loads_through_the_normal_loader():
    from MedSAM2HITLLib.model import load_model

    assert CHECKPOINT.stat().st_size <= 20 * 2**20
    model = load_model(CHECKPOINT, device="cpu")
    assert model.config == CHECKPOINT.with_suffix(".yaml")
    assert model.image_size == 128


def test_key_slice_masks_land_on_the_target(engine):
    """A box on held-out phantoms gives the target: a flipped, transposed or shifted box would give ~0.

    The floor is what this fixture reaches (median 0.80 over these 16), not issue 5's 0.85 target.
    """
    results = [evaluate_key_slice(engine, held_out_phantom(s, i)) for s in ("seeds", "unseen") for i in range(8)]
    assert np.median(results) >= MEDIAN_2D_FLOOR, np.round(results, 2)


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


def test_box_on_empty_background_gives_a_near_empty_mask(engine):
    phantom = make_phantom(2_000_001, size=(48, 112, 112), modality="ct", distractors=2)
    key = phantom.key_index
    objects = np.logical_or.reduce([o[key] for o in phantom.objects])
    box = _background_box(objects, 20)
    engine.set_volume(phantom.volume, "empty-box")
    mask = engine.segment_slice(0, key, box, window=phantom.window)
    assert mask.sum() <= 0.05 * 20 * 20, f"{mask.sum()} pixels for a box on empty background {box}"
