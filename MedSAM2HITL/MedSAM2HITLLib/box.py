"""Box and point prompts in a slice's pixel coordinates, checked before they reach the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BadInputError


@dataclass(frozen=True)
class Box:
    """Inclusive pixel indices in a 2D slice: x = column, y = row (SAM's XYXY order)."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int

    def as_list(self) -> list[int]:
        return [self.x_min, self.y_min, self.x_max, self.y_max]


def validate_box(box, slice_shape: tuple[int, int]) -> Box:
    """Order the corners, clip to the slice and reject boxes that are empty or lie entirely outside it."""
    values = box.as_list() if isinstance(box, Box) else list(box)
    if len(values) != 4:
        raise BadInputError(f"a box needs 4 numbers (x_min, y_min, x_max, y_max), got {len(values)}")
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise BadInputError(f"box coordinates must be numbers, got {values}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise BadInputError(f"box coordinates must be finite, got {values}")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    rows, cols = slice_shape
    if x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
        raise BadInputError(
            f"box {values} lies entirely outside the slice (columns 0..{cols - 1}, rows 0..{rows - 1}); "
            "place the box on the image"
        )
    clipped = Box(
        max(0, math.floor(x0)), max(0, math.floor(y0)), min(cols - 1, math.ceil(x1)), min(rows - 1, math.ceil(y1))
    )
    if clipped.x_max <= clipped.x_min or clipped.y_max <= clipped.y_min:
        raise BadInputError(
            f"box {values} is empty inside the slice ({clipped.x_max - clipped.x_min + 1}×"
            f"{clipped.y_max - clipped.y_min + 1} pixels); draw a box at least 2 pixels wide and high"
        )
    return clipped


@dataclass(frozen=True)
class Point:
    """A click on a slice: x = column, y = row (pixels); positive adds what is under it, negative removes it."""

    x: float
    y: float
    positive: bool

    def as_list(self) -> list:
        return [self.x, self.y, 1 if self.positive else 0]


def validate_points(points, slice_shape: tuple[int, int]) -> list[Point]:
    """Points as (x, y, label) with label 1/+ (positive) or 0/- (negative), each on the slice."""
    rows, cols = slice_shape
    checked = []
    for point in points:
        values = point.as_list() if isinstance(point, Point) else list(point)
        if len(values) != 3:
            raise BadInputError(f"a point needs x, y and a label (1 positive, 0 negative), got {values}")
        x, y, label = values
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):
            raise BadInputError(f"point coordinates must be numbers, got {values}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise BadInputError(f"point coordinates must be finite, got {values}")
        if label not in (0, 1, "+", "-"):
            raise BadInputError(f"a point's label must be 1 or '+' (positive) or 0 or '-' (negative), got {label!r}")
        if not (-0.5 <= x <= cols - 0.5 and -0.5 <= y <= rows - 0.5):
            raise BadInputError(
                f"point ({x:g}, {y:g}) lies outside the slice (columns 0..{cols - 1}, rows 0..{rows - 1}); "
                "click on the image"
            )
        checked.append(Point(x, y, label in (1, "+")))
    return checked
