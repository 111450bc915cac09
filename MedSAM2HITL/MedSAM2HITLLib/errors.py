"""Errors a user can act on. Each has a `kind` that the worker protocol carries over the wire."""


class MedSAM2Error(Exception):
    """Base class; `kind` names the category shown to the user and sent in error frames."""

    kind = "internal"


class BadInputError(MedSAM2Error, ValueError):
    """The request itself is wrong (box outside the slice, unknown preset, wrong array shape...)."""

    kind = "bad_input"


class ModelError(MedSAM2Error):
    """The model or its checkpoint cannot be used (missing file, wrong keys, truncated download...)."""

    kind = "model"


class OutOfMemoryError(MedSAM2Error):
    """Inference ran out of (GPU or host) memory; caches were freed and the engine still works."""

    kind = "out_of_memory"


class PropagationCancelled(MedSAM2Error):
    """Propagation stopped on request; `completed` lists the slice indices already delivered."""

    kind = "cancelled"

    def __init__(self, completed: list[int]):
        super().__init__(f"propagation cancelled after {len(completed)} slice(s)")
        self.completed = list(completed)
