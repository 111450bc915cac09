"""Which slices of a segment the user made and which the model predicted, kept with the segment.

The user's slices (a box or clicks segmented there, or a slice corrected and propagated from) are the
conditioning slices of later propagations. The record lives in a segment tag, so it is saved with the scene (a
.seg.nrrd keeps segment tags) and undone and redone with the segment (the Segment Editor's undo states copy the
segmentation, tags included). It is JSON, parsed and checked, never executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

TAG = "MedSAM2HITL.SliceSources"


@dataclass
class SliceSources:
    """Per array axis: the user's slices and the predicted ones (a slice is in at most one of the two)."""

    user: dict[int, set[int]] = field(default_factory=dict)
    predicted: dict[int, set[int]] = field(default_factory=dict)

    def mark(self, axis: int, user=(), predicted=()) -> None:
        """Record a write: `user` slices become the user's, `predicted` ones (not the user's) predicted."""
        mine = self.user.setdefault(axis, set())
        mine.update(int(i) for i in user)
        model = self.predicted.setdefault(axis, set())
        model.update(int(i) for i in predicted if int(i) not in mine)
        model.difference_update(mine)

    def user_slices(self, axis: int) -> list[int]:
        return sorted(self.user.get(axis, ()))

    def predicted_slices(self, axis: int) -> list[int]:
        return sorted(self.predicted.get(axis, ()))

    def neighbours(self, axis: int, index: int) -> tuple[int | None, int | None]:
        """The user's nearest slices below and above `index` (None where there is none)."""
        mine = self.user.get(axis, set())
        below = [i for i in mine if i < index]
        above = [i for i in mine if i > index]
        return (max(below) if below else None), (min(above) if above else None)

    def extent(self, axis: int) -> tuple[int, int] | None:
        """First and last slice the segment has from us along `axis` (user's or predicted)."""
        known = self.user.get(axis, set()) | self.predicted.get(axis, set())
        return (min(known), max(known)) if known else None

    def describe(self, axis: int) -> str:
        """One line for the panel, e.g. 'yours: 12, 30 · predicted: 0–11, 13–29, 31–47'."""
        mine, model = self.user_slices(axis), self.predicted_slices(axis)
        if not mine and not model:
            return "no slices from MedSAM2 yet"
        return f"yours: {_runs(mine) or 'none'} · predicted: {_runs(model) or 'none'}"

    def to_json(self) -> str:
        axes = sorted(set(self.user) | set(self.predicted))
        return json.dumps({"version": 1, "axes": {str(a): {"user": _pairs(self.user_slices(a)),
                                                           "predicted": _pairs(self.predicted_slices(a))}
                                                  for a in axes}}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> "SliceSources":
        """Parse a tag; anything malformed (a hand-edited file) counts as no record rather than failing a request."""
        sources = cls()
        try:
            axes = json.loads(text)["axes"] if text else {}
            for axis, kinds in axes.items():
                axis = int(axis)
                if axis not in (0, 1, 2):
                    continue
                sources.mark(axis, user=_unpairs(kinds.get("user", [])), predicted=_unpairs(kinds.get("predicted", [])))
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls()
        return sources


def read(segmentation_node, segment_id: str) -> SliceSources:
    import vtk

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    value = vtk.reference("")
    if segment is None or not segment.GetTag(TAG, value):
        return SliceSources()
    return SliceSources.from_json(str(value))


def record(segmentation_node, segment_id: str, axis: int, user=(), predicted=()) -> None:
    """Add a write to the segment's record (see SliceSources.mark); call it inside the write's undo step."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is not None:
        sources = read(segmentation_node, segment_id)
        sources.mark(axis, user=user, predicted=predicted)
        segment.SetTag(TAG, sources.to_json())


def _pairs(indices: list[int]) -> list[list[int]]:
    """Sorted indices as [first, last] runs (a 300-slice propagation is one pair)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def _unpairs(runs) -> list[int]:
    found = []
    for first, last in runs:
        first, last = int(first), int(last)
        if last < first or last - first > 1 << 16:
            raise ValueError("bad run")
        found.extend(range(first, last + 1))
    return found


def _runs(indices: list[int]) -> str:
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in _pairs(indices))
