"""Request bodies at the API edge: strict (unknown fields refused, no bool or float taken for a whole number, no
string for a number), finite numbers only; masks checked by `mask_codec.check` before anything decodes them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from MedSAM2HITLLib import mask_codec, slice_rules
from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.preprocessing import CT_PRESETS, parse_window

from .store import STATES

Finite = Annotated[float, Field(allow_inf_nan=False)]
View = Literal["axial", "coronal", "sagittal"]
Window = str | Annotated[list[Finite], Field(min_length=2, max_length=2)]


STRICT = ConfigDict(extra="forbid", strict=True)


class Mask(BaseModel):
    model_config = STRICT
    shape: Annotated[list[int], Field(min_length=2, max_length=2)]
    counts: Annotated[list[int], Field(max_length=1 << 20)]

    @model_validator(mode="after")
    def _decodable(self):
        try:
            mask_codec.check({"shape": self.shape, "counts": self.counts})
        except BadInputError as error:
            raise ValueError(str(error)) from None
        return self


ObjectNumber = Annotated[int, Field(ge=1, le=255, description="the object (label value) in the job; a new "
                                                           "number makes a new object")]


class BoxFields(BaseModel):
    """Where an object is: voxel indices of a box on `slice`, or two opposite corners in RAS millimetres."""

    model_config = STRICT
    slice: Annotated[int, Field(ge=0)] | None = None
    box: Annotated[list[Finite], Field(min_length=4, max_length=4)] | None = None
    box_ras: Annotated[list[Finite], Field(min_length=6, max_length=6)] | None = None

    @model_validator(mode="after")
    def _one_box(self):
        if self.box is not None and self.box_ras is not None:
            raise ValueError("give either 'box' (with 'slice') or 'box_ras', not both")
        if self.box is not None and self.slice is None:
            raise ValueError("'box' needs the 'slice' it is drawn on")
        if self.box is not None and (self.box[0] > self.box[2] or self.box[1] > self.box[3]):
            raise ValueError("'box' is [x_min, y_min, x_max, y_max]: each minimum must not exceed its maximum")
        return self


class Prompt(BoxFields):
    """A box on a slice of `view` for one object of the job (object 1 unless `object` says otherwise)."""

    view: View = "axial"
    window: Window = "mr"
    object: ObjectNumber = 1

    @field_validator("window")
    @classmethod
    def _known_window(cls, value):
        if not (isinstance(value, str) and value.strip().lower() == "mr"):
            try:
                parse_window(value, None)
            except BadInputError as error:
                raise ValueError(str(error)) from None
        return value


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


class ObjectPrompt(BoxFields):
    """One object of a propagation: its key slice's box or `mask` (or, with `slice` alone, its current mask there),
    and `conditioning`: more slices (same view) whose current masks of this object in the job condition the
    tracking too and are kept exactly (the user's corrected slices)."""

    object: ObjectNumber = 1
    mask: Mask | None = None
    conditioning: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1024)] | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        return _one_key_prompt(self)


def _one_key_prompt(item):
    """An object's key prompt: a box or a mask, on a key slice or as RAS corners."""
    if item.mask is not None and (item.box is not None or item.box_ras is not None):
        raise ValueError("give either a box or a 'mask', not both")
    if item.box_ras is None and item.slice is None:
        raise ValueError("give the key 'slice' (with a 'box' or 'mask', or alone to use its current mask), "
                         "or a 'box_ras'")
    return item


PROMPT_FIELDS = ("object", "slice", "box", "box_ras", "mask", "conditioning")


class Propagate(Prompt):
    """One object's prompt (the fields of ObjectPrompt at the top level), or `objects`: several objects tracked in
    one pass, each slice encoded once for all of them. `view`, `window` and the range are shared. `early_stop`:
    tracking stops in each direction once every object has been absent for a few slices in a row
    (engine.EARLY_STOP_PATIENCE); the `done` event says where (`ended_early`)."""

    mask: Mask | None = None
    range: Literal["whole", "box", "custom"] = "whole"
    start: Annotated[int, Field(ge=0)] | None = None
    end: Annotated[int, Field(ge=0)] | None = None
    largest_component: bool = False
    early_stop: StrictBool = True  # ranges "whole" and "box" stop where the object ends; "custom" is followed exactly
    conditioning: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1024)] | None = None
    objects: Annotated[list[ObjectPrompt], Field(min_length=1, max_length=255)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _prompts_once(cls, data):
        if isinstance(data, dict) and data.get("objects") is not None:
            mixed = [name for name in PROMPT_FIELDS if name in data]
            if mixed:
                raise ValueError(f"with 'objects', give {', '.join(repr(n) for n in mixed)} inside each object, "
                                 "not at the top level")
        return data

    @model_validator(mode="after")
    def _distinct_objects(self):
        if self.objects is not None:
            numbers = [item.object for item in self.objects]
            if len(set(numbers)) != len(numbers):
                raise ValueError("each object may appear once in 'objects'")
            return self
        return _one_key_prompt(self)

    def object_prompts(self) -> list[ObjectPrompt]:
        """The objects to propagate, the top-level prompt being the one object when `objects` is not given."""
        if self.objects is not None:
            return self.objects
        return [ObjectPrompt.model_construct(**{name: getattr(self, name) for name in PROMPT_FIELDS})]

    def params(self) -> dict:
        """What the worker's task takes: the shared fields and the list of objects."""
        shared = self.model_dump(exclude={*PROMPT_FIELDS, "objects"})
        return {**shared, "objects": [item.model_dump() for item in self.object_prompts()]}


class Prefetch(BaseModel):
    """The slice the user is about to prompt on, to encode ahead (with up to two neighbours on each side)."""

    model_config = STRICT
    view: View = "axial"
    slice: Annotated[int, Field(ge=0)]
    window: Window = "mr"

    _known_window = field_validator("window")(Prompt._known_window.__func__)


class SliceWrite(BaseModel):
    """One object's mask on a slice replaced by the client's (an undo, a pen or eraser edit); empty clears it.
    Voxels another object holds on that slice stay that object's."""

    model_config = STRICT
    view: View = "axial"
    object: ObjectNumber = 1
    slice: Annotated[int, Field(ge=0)]
    mask: Mask


def check_against_volume(body: Prompt | SliceWrite | Prefetch, geometry: dict | None) -> None:
    """Refuse at once what the loaded volume's geometry already rules out (the worker checks everything again)."""
    if geometry is None:
        return
    view = geometry["views"][body.view]
    count, where = view["slices"], f"the {body.view} view"
    shape = slice_rules.slice_shape(geometry["shape_kji"], view["array_axis"])
    prompts = body.object_prompts() if isinstance(body, Propagate) else [body]
    for item in prompts:
        if item.slice is not None:
            slice_rules.check_slice(item.slice, count, where)
        mask = getattr(item, "mask", None)
        if mask is not None:
            slice_rules.check_mask_shape(mask.shape, shape)
        for index in getattr(item, "conditioning", None) or []:
            slice_rules.check_slice(index, count, where, "conditioning slice")
    if isinstance(body, Propagate) and body.range == "custom":
        start, end = slice_rules.resolve_range(body.range, count, start=body.start, end=body.end)
        slice_rules.check_range(start, end, count, [item.slice for item in prompts if item.slice is not None])


# Responses: what each endpoint answers and each event carries, so /docs shows the fields and generated clients
# get types. Only these fields go out (FastAPI filters and checks every reply against its model).

JobState = Literal[STATES]  # type: ignore[valid-type]  # the store's list, kept in one place


class ErrorDetail(BaseModel):
    """Every error: one line that says what is wrong and what to do."""

    detail: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Readiness(BaseModel):
    """200 when Redis answers and at least one model worker is alive, else 503 with the same fields."""

    ready: bool
    redis: bool
    workers: int


class ModelInfo(BaseModel):
    name: str = Field(description="the checkpoint's file stem")
    device: str | None
    image_size: int | None
    workers: int = Field(description="live workers holding this model")


class WorkerLoad(BaseModel):
    name: str
    jobs: int = Field(description="jobs bound to this worker")
    busy: bool
    queued_tasks: int


class Models(BaseModel):
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)  # every reply has window_presets
    version: str = Field(description="the server's version")
    models: list[ModelInfo]
    workers: list[WorkerLoad]
    window_presets: dict[str, list[float]] = Field(
        default_factory=lambda: {name: list(preset) for name, preset in CT_PRESETS.items()},
        description="the named CT windows a request's `window` may give: name: [width, level] in HU, from the "
                    "library's one table ('mr' and [width, level] are accepted too)")


class RunLengths(BaseModel):
    """A 2D mask: run lengths over the slice's pixels in row-major order, starting with a run of zeros."""

    shape: list[int] = Field(description="[rows, cols]")
    counts: list[int]


class Progress(BaseModel):
    done: int
    total: int


class ViewSlices(BaseModel):
    array_axis: int = Field(description="the axis of the [k, j, i] array that this view's slices cut")
    slices: int


class Views(BaseModel):
    axial: ViewSlices
    coronal: ViewSlices
    sagittal: ViewSlices


class VolumeGeometry(BaseModel):
    """The volume as the worker loaded it: what slice and box indices refer to."""

    shape_kji: list[int]
    dtype: str
    ijk_to_ras: list[list[float]] = Field(description="4x4 matrix from voxel indices to RAS millimetres")
    views: Views


class UploadedVolume(BaseModel):
    """The volume before a worker has loaded it: what the uploaded file's header says."""

    shape_ijk: list[int]
    dtype: str


class StoredResult(BaseModel):
    stored: str = Field(description="the SOP Instance UID of the DICOM SEG stored on the PACS")
    server: str = Field(description="the DICOMweb server it went to, without credentials")


class PacsSeries(BaseModel):
    """A series on the service's DICOMweb server, without anything about the patient."""

    series_uid: str
    study_uid: str
    modality: str
    description: str = Field(description="SeriesDescription, empty when the series has none")
    number: int | None = Field(description="SeriesNumber")
    instances: int | None = Field(description="how many instances (slices, for most CT/MR) the series holds")


class PacsSeriesList(BaseModel):
    server: str = Field(description="the DICOMweb server asked, without credentials")
    series: list[PacsSeries] = Field(description="image series only: SEG, SR, PR and other non-image series are "
                                                 "left out")


class JobCreated(UploadedVolume):
    id: str
    state: JobState
    worker: str | None = Field(description="the worker the job is bound to; null while none is alive")
    expires_in: int = Field(description="seconds until the job and its files are deleted")


class ObjectVoxels(BaseModel):
    object: int = Field(description="the object's number (its label value)")
    voxels: int = Field(description="voxels the object holds in the job's labels")


class JobStatus(BaseModel):
    id: str
    state: JobState
    progress: Progress
    worker: str | None
    loaded: bool = Field(description="the worker holds the volume: slices can be segmented at once")
    queue_position: int | None = Field(description="tasks ahead of the job's loading on its worker")
    error: str | None
    created: float = Field(description="Unix time")
    expires: float = Field(description="Unix time")
    volume: VolumeGeometry | UploadedVolume
    objects: list[ObjectVoxels] = Field(description="the job's objects, by number, as of the worker's last save")


class SegmentedSlice(BaseModel):
    object: int
    view: View
    array_axis: int
    slice: int
    box: list[int | float] | None = Field(description="the box used, in voxel indices on the slice")
    seconds: float = Field(description="the model's time for this slice")
    embedding_cached: bool = Field(description="the slice's image embedding was already computed")
    mask: RunLengths


class WrittenSlice(BaseModel):
    object: int
    view: View
    array_axis: int
    slice: int
    voxels: int = Field(description="voxels the object holds on the slice now (none another object holds)")


class PropagationStarted(BaseModel):
    propagation: str = Field(description="this propagation's id, in each of its events")
    events_after: str = Field(description="the event id to follow the job's events from")
    events: str = Field(description="the path of the event stream from that id")


class PrefetchQueued(BaseModel):
    prefetch: str = Field(description="this prefetch's id; it is dropped or abandoned whenever a real request "
                                      "comes, so nothing waits for it")


class Cancelling(BaseModel):
    cancelling: bool


class StateEvent(BaseModel):
    """Event `state`: the job's state changed."""

    state: JobState
    error: str | None = None


class SliceEvent(BaseModel):
    """Event `slice`: one slice of one object of the propagation is done; the mask is the model's, the job's labels
    keep it without the voxels another object holds."""

    propagation: str
    object: int = 1
    slice: int
    array_axis: int
    done: int
    total: int
    mask: RunLengths


class DoneEvent(BaseModel):
    """Event `done`: the propagation finished."""

    propagation: str
    slices: int


class CancelledEvent(BaseModel):
    """Event `cancelled`: the propagation stopped on request; its finished slices are kept."""

    propagation: str
    slices: int


class ErrorEvent(BaseModel):
    """Event `error`: the propagation failed; the slices it finished are kept."""

    propagation: str
    kind: str
    message: str
    slices_kept: int | None = None


EVENT_PAYLOADS: dict[str, type[BaseModel]] = {"state": StateEvent, "slice": SliceEvent, "done": DoneEvent,
                                              "cancelled": CancelledEvent, "error": ErrorEvent}
