"""The phantom generator and the fixture's training script: reproducible, well-formed, loadable output.

The fixture model is committed, so CI never retrains it; these tests keep the script that made it runnable
and deterministic (a few steps of stages 1, 2 and 5, twice) and the phantoms it learns from as documented.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from phantoms import MIN_TARGET_SLICES, make_phantom  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_phantoms_are_reproducible_and_in_their_modality_range(modality):
    first = make_phantom(5, size=(40, 64, 72), modality=modality)
    again = make_phantom(5, size=(40, 64, 72), modality=modality)
    other = make_phantom(6, size=(40, 64, 72), modality=modality)
    assert np.array_equal(first.volume, again.volume) and np.array_equal(first.mask, again.mask)
    assert not np.array_equal(first.volume, other.volume)
    assert first.volume.shape == first.mask.shape == (40, 64, 72)
    if modality == "ct":
        assert first.volume.dtype == np.int16 and first.volume.min() >= -1024
    else:
        assert first.volume.dtype == np.float32 and first.volume.min() >= 0


def test_phantom_objects_are_separate_and_the_target_spans_enough_slices():
    for seed in range(6):
        phantom = make_phantom(seed, size=(48, 96, 96), modality="ct", distractors=3, held_out=seed % 2 == 1)
        assert np.count_nonzero(phantom.mask.any(axis=(1, 2))) >= MIN_TARGET_SLICES
        assert all(o.any() for o in phantom.objects)
        assert np.sum([o.astype(int) for o in phantom.objects], axis=0).max() == 1  # no voxel in two objects


def test_training_is_deterministic_and_writes_a_checkpoint_the_loader_accepts(tmp_path):
    import torch

    import train_phantom_model as training
    from MedSAM2HITLLib.model import load_model

    from MedSAM2HITLLib.model import build_predictor

    schedule = training.Schedule(key_steps=2, track_steps=2, pool=4, warmup=1)
    first = training.train(schedule, tmp_path / "first" / "model.pt", log_every=1000)
    second = training.train(schedule, tmp_path / "second" / "model.pt", log_every=1000)
    weights = torch.load(first, map_location="cpu")["model"]
    repeated = torch.load(second, map_location="cpu")["model"]
    assert weights.keys() == repeated.keys()
    assert all(torch.equal(weights[k], repeated[k]) for k in weights)
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    torch.manual_seed(training.SEED)  # the weights training started from
    initial = build_predictor(first.with_suffix(".yaml")).state_dict()
    for module in ("image_encoder.", "sam_mask_decoder.", "memory_attention."):  # both phases ran
        assert any(not torch.equal(initial[k], weights[k]) for k in weights if k.startswith(module)), module

    loaded = load_model(first, device="cpu")  # strict: the yaml beside it must describe these weights
    assert loaded.image_size == training.IMAGE_SIZE
    assert loaded.config == first.with_suffix(".yaml")

    schedule = training.Schedule(interaction_steps=2, correction_steps=2, choice_steps=2, pool=4, warmup=1)
    later = [training.train(schedule, tmp_path / name / "model.pt", log_every=1000, init=first, stage=2)
             for name in ("second_a", "second_b")]
    later.append(training.train(schedule, tmp_path / "third" / "model.pt", log_every=1000, init=later[0], stage=3))
    later += [training.train(schedule, tmp_path / name / "model.pt", log_every=1000, init=later[2], stage=5)
              for name in ("fifth_a", "fifth_b")]
    stage_2, again, stage_3, stage_5, again_5 = (torch.load(path, map_location="cpu")["model"] for path in later)
    assert all(torch.equal(stage_2[k], again[k]) for k in stage_2)  # the later stages are deterministic too
    assert all(torch.equal(stage_5[k], again_5[k]) for k in stage_5)
    assert any(not torch.equal(weights[k], stage_2[k]) for k in weights)
    assert any(not torch.equal(stage_2[k], stage_3[k]) for k in stage_2)
    assert any(not torch.equal(stage_3[k], stage_5[k]) for k in stage_3)
    load_model(later[4], device="cpu")


def test_long_shapes_and_thick_slices():
    """Elongated objects reach 1:5 in plane, tubes cross most slices; thick slices average intensities and keep
    the masks by majority, and older phantoms do not change (no `shapes` given)."""
    from phantoms import LONG_SHAPES, thick_slices

    bars = make_phantom(3, size=(60, 96, 96), shapes=("elongated",), distractors=0)
    tube = make_phantom(3, size=(60, 96, 96), shapes=("tube",), distractors=0)
    key = bars.key_index
    rows, cols = np.nonzero(bars.mask[key])
    extent = np.linalg.svd(np.stack([rows, cols]).T - [rows.mean(), cols.mean()], compute_uv=False)
    assert extent[0] / extent[1] >= 1.9  # a bar, not a disc
    assert np.count_nonzero(tube.mask.any(axis=(1, 2))) >= 0.7 * 60
    thick = thick_slices(tube, 3)
    assert thick.volume.shape == (20, 96, 96) and thick.volume.dtype == tube.volume.dtype
    assert np.array_equal(thick.mask[5], tube.mask[15:18].mean(axis=0) >= 0.5)
    assert set(LONG_SHAPES) == {"elongated", "tube"}


def test_twisted_bars_turn_along_their_slices():
    """The bar's long axis turns by 60-120° between the ends of the object (where corrections pay off)."""
    from phantoms import TWISTED_SHAPES

    for seed in range(3):
        bar = make_phantom(seed, size=(60, 96, 96), shapes=TWISTED_SHAPES, distractors=0).mask
        present = np.flatnonzero(bar.sum(axis=(1, 2)) >= 30)

        def heading(index: int) -> float:
            rows, cols = np.nonzero(bar[index])
            direction = np.linalg.svd(np.stack([rows, cols]).T - [rows.mean(), cols.mean()])[2][0]
            return float(np.arctan2(direction[0], direction[1]))

        turn = abs(heading(present[0]) - heading(present[-1])) % np.pi
        assert np.degrees(min(turn, np.pi - turn)) >= 50, seed  # 64-80° on these three
