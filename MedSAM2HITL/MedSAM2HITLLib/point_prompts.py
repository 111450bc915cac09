"""Markups point lists as click prompts: a control point's position becomes (x, y) on a slice, its label its sign.

One point list per object; a point labelled "-" (or "−") is a negative click (remove what is under it), any
other label a positive one. Points lie on whichever slices the user clicked; a request uses those on its slice.
"""

from __future__ import annotations

import numpy as np

from .box import Point
from .errors import BadInputError
from .roi_box import check_axis, volume_ijk_to_world, volume_shape
from .slice_rules import slice_axes

NEGATIVE_LABELS = ("-", "−")


def is_negative(label: str) -> bool:
    return label.strip()[:1] in NEGATIVE_LABELS


def add_point(points_node, ras, positive: bool) -> int:
    """Add a click to an object's point list, labelled "+" or "-" (so the views show its sign)."""
    index = points_node.AddControlPointWorld(*(float(v) for v in ras))
    points_node.SetNthControlPointLabel(index, "+" if positive else "-")
    return index


def _array_coordinates(volume_node, points_node) -> list[tuple[np.ndarray, bool]]:
    """Each control point's position in the volume's array ([k, j, i], voxel units) and its sign."""
    world_to_ijk = np.linalg.inv(volume_ijk_to_world(volume_node))
    found = []
    for n in range(points_node.GetNumberOfControlPoints()):
        ras = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(n, ras)
        if not np.all(np.isfinite(ras)):
            raise BadInputError(f"point {n + 1} of '{points_node.GetName()}' has no finite position; place it again")
        ijk = (world_to_ijk @ np.append(ras, 1.0))[:3]
        found.append((ijk[::-1], not is_negative(points_node.GetNthControlPointLabel(n))))
    return found


def latest_point_slice(volume_node, points_node, axis: int) -> int:
    """The slice (along array `axis`) of the point placed last: where the user is working."""
    check_axis(axis)
    placed = _array_coordinates(volume_node, points_node)
    if not placed:
        raise BadInputError(f"point list '{points_node.GetName()}' has no points: click on the object first")
    index = int(np.floor(placed[-1][0][axis] + 0.5))
    count = volume_shape(volume_node)[axis]
    if not 0 <= index < count:
        raise BadInputError(f"the last point of '{points_node.GetName()}' is outside volume "
                            f"'{volume_node.GetName()}' (slice {index} of 0..{count - 1}); place it on the volume")
    return index


def slice_points(volume_node, points_node, axis: int, index: int) -> list[Point]:
    """The clicks on slice `index` (within half a voxel of its plane), in that slice's pixels."""
    check_axis(axis)
    rows, columns = slice_axes(axis)
    return [Point(float(kji[columns]), float(kji[rows]), positive)
            for kji, positive in _array_coordinates(volume_node, points_node)
            if abs(kji[axis] - index) <= 0.5]
