"""Request bodies at the API edge: strict (unknown fields refused), finite numbers only."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.preprocessing import parse_window

Finite = Annotated[float, Field(allow_inf_nan=False)]
View = Literal["axial", "coronal", "sagittal"]
Window = str | Annotated[list[Finite], Field(min_length=2, max_length=2)]


class Mask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: Annotated[list[Annotated[int, Field(ge=1, le=1 << 16)]], Field(min_length=2, max_length=2)]
    counts: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1 << 20)]


class Prompt(BaseModel):
    """A box on a slice: voxel indices on `slice` of `view`, or two opposite corners in RAS millimetres."""

    model_config = ConfigDict(extra="forbid")
    view: View = "axial"
    slice: Annotated[int, Field(ge=0)] | None = None
    box: Annotated[list[Finite], Field(min_length=4, max_length=4)] | None = None
    box_ras: Annotated[list[Finite], Field(min_length=6, max_length=6)] | None = None
    window: Window = "mr"

    @field_validator("window")
    @classmethod
    def _known_window(cls, value):
        if not (isinstance(value, str) and value.strip().lower() == "mr"):
            try:
                parse_window(value, None)
            except BadInputError as error:
                raise ValueError(str(error)) from None
        return value

    @model_validator(mode="after")
    def _one_box(self):
        if self.box is not None and self.box_ras is not None:
            raise ValueError("give either 'box' (with 'slice') or 'box_ras', not both")
        if self.box is not None and self.slice is None:
            raise ValueError("'box' needs the 'slice' it is drawn on")
        if self.box is not None and (self.box[0] > self.box[2] or self.box[1] > self.box[3]):
            raise ValueError("'box' is [x_min, y_min, x_max, y_max]: each minimum must not exceed its maximum")
        return self


Click = Annotated[list[Finite], Field(min_length=3, max_length=3)]


class Segment2D(Prompt):
    """A box and/or clicks [x, y, 1 | 0] (voxel indices on `slice`); clicks correct the slice's current mask."""

    points: Annotated[list[Click], Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _needs_a_prompt(self):
        if self.box is None and self.box_ras is None and not self.points:
            raise ValueError("give a 'box' with its 'slice', a 'box_ras', or 'points' with their 'slice'")
        if self.points:
            if self.slice is None:
                raise ValueError("'points' need the 'slice' they are clicked on")
            if self.box_ras is not None:
                raise ValueError("'points' go with a 'box' on their 'slice', not with a 'box_ras'")
            if any(label not in (0, 1) for _, _, label in self.points):
                raise ValueError("each point is [x, y, label] with label 1 (positive) or 0 (negative)")
        return self


class Propagate(Prompt):
    """Without a box, the key slice's mask prompts: `mask` as sent, or the job's current mask on `slice`.

    `conditioning`: more slices (same view) whose current masks in the job condition the tracking too and are
    kept exactly: the user's corrected slices. `early_stop`: tracking stops in each direction once the object has
    been absent for a few slices in a row (engine.EARLY_STOP_PATIENCE); the `done` event says where (`ended_early`).
    """

    mask: Mask | None = None
    range: Literal["whole", "box", "custom"] = "whole"
    start: Annotated[int, Field(ge=0)] | None = None
    end: Annotated[int, Field(ge=0)] | None = None
    largest_component: bool = False
    early_stop: StrictBool = True  # ranges "whole" and "box" stop where the object ends; "custom" is followed exactly
    conditioning: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1024)] | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if self.mask is not None and (self.box is not None or self.box_ras is not None):
            raise ValueError("give either a box or a 'mask', not both")
        if self.box_ras is None and self.slice is None:
            raise ValueError("give the key 'slice' (with a 'box' or 'mask', or alone to use its current mask), "
                             "or a 'box_ras'")
        return self


class SliceWrite(BaseModel):
    """A slice of the job's labels replaced by the client's mask (an undo, a pen or eraser edit); empty clears it."""

    model_config = ConfigDict(extra="forbid")
    view: View = "axial"
    slice: Annotated[int, Field(ge=0)]
    mask: Mask


def check_against_volume(body: Prompt | SliceWrite, geometry: dict | None) -> None:
    """Refuse at once what the loaded volume's geometry already rules out (the worker checks everything again)."""
    if geometry is None:
        return
    view = geometry["views"][body.view]
    count = view["slices"]
    if body.slice is not None and body.slice >= count:
        raise BadInputError(f"slice {body.slice} is outside the volume: the {body.view} view has slices "
                            f"0..{count - 1}")
    mask = getattr(body, "mask", None)
    if mask is not None:
        shape = [n for a, n in enumerate(geometry["shape_kji"]) if a != view["array_axis"]]
        if mask.shape != shape:
            raise BadInputError(f"the mask has shape {mask.shape}, the {body.view} slices have {shape}")
    if isinstance(body, Propagate):
        outside = [i for i in body.conditioning or [] if i >= count]
        if outside:
            raise BadInputError(f"conditioning slice {outside[0]} is outside the volume: the {body.view} view has "
                                f"slices 0..{count - 1}")
        if body.range == "custom":
            if body.start is None or body.end is None:
                raise BadInputError("range 'custom' needs 'start' and 'end'")
            key = body.slice
            if not body.start <= body.end < count or (key is not None and not body.start <= key <= body.end):
                raise BadInputError(f"range {body.start}..{body.end} must lie within slices 0..{count - 1}"
                                    + (f" and contain the key slice {key}" if key is not None else ""))
