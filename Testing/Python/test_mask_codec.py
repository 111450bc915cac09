"""The RLE mask checker: whatever the counts, a mask is either refused with the rule it breaks or decodes to exactly
its slice; nothing reaches numpy that could overflow (four runs of 2**62 wrap around to a valid-looking sum)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from MedSAM2HITLLib import mask_codec
from MedSAM2HITLLib.errors import BadInputError

pytestmark = pytest.mark.unit

SHAPE = (7, 9)
PIXELS = SHAPE[0] * SHAPE[1]

counts = st.lists(st.one_of(st.integers(-3, PIXELS + 3), st.integers(-(2**70), 2**70), st.sampled_from(
    [2**62, 2**63 - 1, 2**63, 2**64, -(2**63)]), st.booleans(), st.floats(allow_nan=True)), max_size=12)


@settings(max_examples=400, deadline=None)
@given(counts=counts, shape=st.sampled_from([list(SHAPE), [0, 9], [2**20, 2], [7, True], [7.0, 9], [7], "7x9"]))
def test_a_mask_is_refused_with_its_rule_or_decodes_to_exactly_its_slice(counts, shape):
    payload = {"shape": shape, "counts": counts}
    valid = (shape == list(SHAPE) and type(shape[1]) is int and all(type(c) is int and 0 <= c <= PIXELS
                                                                    for c in counts) and sum(counts) == PIXELS)
    if not valid:
        with pytest.raises(BadInputError, match=r"mask"):
            mask_codec.decode(payload, SHAPE)
        return
    mask = mask_codec.decode(payload, SHAPE)
    assert mask.shape == SHAPE and int(mask.sum()) == sum(counts[1::2])
    assert mask_codec.decode(mask_codec.encode(mask), SHAPE).tolist() == mask.tolist()


@given(st.lists(st.booleans(), min_size=PIXELS, max_size=PIXELS))
def test_every_mask_survives_encode_and_decode(pixels):
    mask = np.array(pixels).reshape(SHAPE)
    assert (mask_codec.decode(mask_codec.encode(mask), SHAPE) == mask).all()


@pytest.mark.parametrize("counts, rule", [
    ([0, 2**62, 2**62, 2**62, 2**62 + 4096], "from 0 to 4096"),  # int64 sum wraps to 4096: numpy segfaulted
    ([0, 2**64], "from 0 to 4096"),  # OverflowError in numpy: a 500
    ([-1, 4097], "from 0 to 4096"),
    ([True, 4095], "whole number"),
    ([4096.0], "whole number"),
    ([0, 4095], "add up to 4096 pixels, not 4095"),
])
def test_the_cases_that_crashed_the_worker_name_their_rule(counts, rule):
    with pytest.raises(BadInputError, match=rule):
        mask_codec.check({"shape": [64, 64], "counts": counts})
