"""2D masks on the wire: run lengths over the C-order pixels, starting with a run of zeros (may be 0).

Compact for the blobs segmentation makes (a 512x512 mask is a few hundred numbers) and decodable in a few lines
of JavaScript or Python, with no binary framing in JSON.
"""

from __future__ import annotations

import numpy as np

from MedSAM2HITLLib.errors import BadInputError


def encode(mask: np.ndarray) -> dict:
    flat = np.asarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)
    return {"shape": list(mask.shape), "counts": runs}


def decode(payload: dict, shape: tuple[int, int]) -> np.ndarray:
    """The mask of `payload`, which must describe exactly a slice of `shape`."""
    try:
        declared = tuple(int(v) for v in payload["shape"])
        counts = np.asarray(payload["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise BadInputError("a mask needs 'shape' [rows, cols] and 'counts' (run lengths, zeros first)") from None
    if declared != tuple(shape):
        raise BadInputError(f"the mask has shape {list(declared)}, the slice has {list(shape)}")
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != shape[0] * shape[1]:
        raise BadInputError(f"mask run lengths must be non-negative and add up to {shape[0] * shape[1]} pixels")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(shape)
