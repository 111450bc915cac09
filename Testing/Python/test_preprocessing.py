"""Intensity windows and model frames, as MedSAM2 prepares them."""

from __future__ import annotations

import numpy as np
import pytest

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.preprocessing import (
    CT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    frame_tensor,
    mr_window,
    parse_window,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(CT_PRESETS))
def test_ct_presets_map_their_window_to_0_255(name):
    width, level = CT_PRESETS[name]
    window = parse_window(name, np.zeros((1, 1, 1)))
    values = np.array([level - width, level - width / 2, level, level + width / 2, level + width])
    assert window.to_uint8(values).tolist() == [0, 0, 128, 255, 255]


def test_the_five_presets_are_the_issue_s():
    assert CT_PRESETS == {
        "abdomen": (400, 40),
        "lung": (1500, -600),
        "brain": (80, 40),
        "mediastinum": (350, 50),
        "bone": (1800, 400),
    }


@pytest.mark.parametrize("spec", ["400,40", (400, 40), [400, 40], " 400 , 40 "])
def test_any_width_level_is_accepted(spec):
    window = parse_window(spec, np.zeros((1, 1, 1)))
    assert (window.low, window.high) == (-160, 240)


@pytest.mark.parametrize("spec, message", [("liver", "unknown intensity window"), ("0,40", "width must be positive")])
def test_bad_windows_say_what_to_use(spec, message):
    with pytest.raises(BadInputError, match=message):
        parse_window(spec, np.zeros((1, 1, 1)))


def test_mr_window_uses_percentiles_of_nonzero_voxels_and_keeps_zeros_at_zero():
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 50, 50), np.float32)
    volume[5:15, 10:40, 10:40] = rng.uniform(100, 1100, size=(10, 30, 30))
    window = mr_window(volume)
    inside = volume[volume > 0]
    assert window.low == pytest.approx(np.percentile(inside, 0.5))
    assert window.high == pytest.approx(np.percentile(inside, 99.5))
    scaled = window.to_uint8(volume)
    assert (scaled[volume == 0] == 0).all()
    assert scaled.max() == 255 and scaled[volume > 0].min() == 0


def test_windowing_never_modifies_the_input():
    volume = np.arange(-500, 500, dtype=np.int16).reshape(10, 10, 10)
    before = volume.copy()
    parse_window("abdomen", volume).to_uint8(volume)
    mr_window(volume).to_uint8(volume)
    assert np.array_equal(volume, before)


def test_frames_are_3_channel_resized_and_imagenet_normalised():
    image = np.full((30, 70), 255, np.uint8)
    image[:, :35] = 0
    frame = frame_tensor(image, 64).numpy()
    assert frame.shape == (3, 64, 64)
    for channel in range(3):
        black = (0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        white = (1 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert frame[channel, :, :5] == pytest.approx(black, abs=1e-5)
        assert frame[channel, :, -5:] == pytest.approx(white, abs=1e-5)
