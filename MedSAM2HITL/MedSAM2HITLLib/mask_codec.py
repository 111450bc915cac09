"""2D masks on the wire: run lengths over the C-order pixels, starting with a run of zeros (may be 0).

Compact for the blobs segmentation makes (a 512x512 mask is a few hundred numbers) and decodable in a few lines
of JavaScript or Python, with no binary framing in JSON.
"""

from __future__ import annotations

import numpy as np

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.slice_rules import check_mask_shape


def encode(mask: np.ndarray) -> dict:
    flat = np.asarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)
    return {"shape": list(mask.shape), "counts": runs}


MAX_SIDE = 1 << 16


def check(payload, shape: tuple[int, int] | None = None) -> tuple[tuple[int, int], list[int]]:
    """The shape and run lengths of a mask payload once they are safe to decode; BadInputError naming the rule.

    Every mask from a client or from a worker passes here before numpy sees it: numpy's int64 sum wraps around
    (four runs of 2**62 "add up" to a slice) and its repeat then writes far outside the array.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("shape"), list) \
            or not isinstance(payload.get("counts"), list):
        raise BadInputError("a mask needs 'shape' [rows, cols] and 'counts' (run lengths, zeros first)")
    declared, counts = payload["shape"], payload["counts"]
    if len(declared) != 2 or any(type(n) is not int or not 1 <= n <= MAX_SIDE for n in declared):
        raise BadInputError(f"a mask's 'shape' is [rows, cols], two whole numbers from 1 to {MAX_SIDE}")
    if shape is not None:
        check_mask_shape(declared, shape)
    pixels = declared[0] * declared[1]
    if len(counts) > pixels + 1:
        raise BadInputError(f"a mask of {pixels} pixels has at most {pixels + 1} run lengths, not {len(counts)}")
    if any(type(c) is not int or not 0 <= c <= pixels for c in counts):
        raise BadInputError(f"each run length of a mask must be a whole number from 0 to {pixels} (the pixels of "
                            "its slice)")
    if sum(counts) != pixels:
        raise BadInputError(f"mask run lengths must add up to {pixels} pixels, not {sum(counts)}")
    return (declared[0], declared[1]), counts


def decode(payload: dict, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The mask of `payload`, which must describe exactly a slice of `shape` when given (see `check`)."""
    shape, counts = check(payload, shape)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, np.asarray(counts, dtype=np.int64)).reshape(shape)
