"""The rules of slices, key slices and ranges, kept in one place for the Slicer logic, the engine and the service.

A slice is one 2D plane of the [k, j, i] voxel array along an array axis. A propagation runs over an inclusive
range of slices that lies in the volume and contains every prompted slice (the key slice and the user's
conditioning slices); a slice prompted with a mask is the user's and comes back exactly as drawn. Each rule
refuses bad input with one message, whoever asks, so the Slicer panel, the CLI and the service say the same.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import BadInputError

RANGE_CHOICES = ("whole", "box", "custom")  # the service's `range`: the volume, the ROI's extent, start..end


def slice_axes(axis: int) -> tuple[int, int]:
    """The array axes of a slice's rows and columns, for slices along array `axis` (the other two, in order)."""
    rows, columns = (a for a in range(3) if a != axis)
    return rows, columns


def slice_shape(shape: Sequence[int], axis: int) -> tuple[int, int]:
    """(rows, columns) of a slice along array `axis` of a volume of this shape."""
    rows, columns = slice_axes(axis)
    return int(shape[rows]), int(shape[columns])


def check_slice(index: int, count: int, where: str, what: str = "slice") -> None:
    """Refuse a slice index outside 0..count-1; `where` names the slices' axis or view (e.g. "the axial view")."""
    if not 0 <= index < count:
        raise BadInputError(f"{what} {index} is outside the volume: {where} has slices 0..{count - 1}")


def check_mask_shape(shape: Sequence[int], expected: Sequence[int], what: str = "the mask") -> None:
    """Refuse a 2D mask whose shape is not the slice's."""
    if tuple(shape) != tuple(expected):
        raise BadInputError(f"{what} has shape {list(shape)}, the slice has {list(expected)}")


def slice_range(start: int | None, end: int | None, count: int) -> tuple[int, int]:
    """The inclusive range start..end, a missing end meaning the volume's end on that side."""
    return 0 if start is None else int(start), count - 1 if end is None else int(end)


def resolve_range(choice: str, count: int, extent: tuple[int, int] | None = None, start: int | None = None,
                  end: int | None = None) -> tuple[int, int]:
    """The range a request names: "whole" (the volume), "box" (`extent`: the ROI's slices) or "custom" (start..end,
    both needed); check it with check_range."""
    if choice == "whole":
        return 0, count - 1
    if choice == "box":
        if extent is None:
            raise BadInputError("range 'box' needs a box as an ROI ('box_ras'): the range is its extent")
        return int(extent[0]), int(extent[1])
    if choice == "custom":
        if start is None or end is None:
            raise BadInputError("range 'custom' needs 'start' and 'end'")
        return int(start), int(end)
    raise BadInputError(f"range must be one of {', '.join(RANGE_CHOICES)}, got {choice!r}")


def check_range(start: int | None, end: int | None, count: int, prompted: Iterable[int] = ()) -> tuple[int, int]:
    """The range (see slice_range), refused before any work unless it lies in the volume and contains every
    prompted slice: the key slice, and any conditioning slices."""
    first, last = slice_range(start, end, count)
    slices = sorted({int(i) for i in prompted})
    if not 0 <= first <= last < count or any(not first <= i <= last for i in slices):
        named = "" if not slices else f" and contain the key slice {slices[0]}" if len(slices) == 1 else \
            f" and contain the prompted slices {', '.join(map(str, slices))}"
        raise BadInputError(f"slice range {first}..{last} must lie within slices 0..{count - 1}{named}")
    return first, last


def user_slices(prompts: Mapping[int, object]) -> set[int]:
    """The slices prompted with a mask (index → box or mask): the user's, never overwritten by a prediction."""
    return {index for index, prompt in prompts.items() if isinstance(prompt, np.ndarray)}


def note_completed(completed: list[int], index: int) -> None:
    """Add a finished slice to the list of completed slices (in arrival order, each once; several objects and the
    largest-component pass deliver a slice more than once)."""
    if index not in completed:
        completed.append(index)
