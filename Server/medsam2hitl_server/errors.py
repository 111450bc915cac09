"""What can go wrong with a request, in the service's own terms; `api/errors.py` is the one place that maps these
to HTTP. Each message is one line for the client: what is wrong and what to do."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service cannot serve. `retry_after`: seconds after which the same request may succeed."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequest(ServiceError):
    """The request contradicts the job's volume or is malformed in a way validation cannot see."""


class Unauthenticated(ServiceError):
    """No token, or not one of the service's tokens."""


class NotAllowed(ServiceError):
    """The service's settings forbid this (e.g. storing on the PACS)."""


class NotFound(ServiceError):
    """No such job, file or series (also another caller's job: its existence is not revealed)."""


class UploadStalled(ServiceError):
    """The client stopped sending the upload's bytes."""


class Conflict(ServiceError):
    """The job is not in a state for this: a propagation runs, nothing runs, or it has no DICOM source."""


class Expired(ServiceError):
    """The job's time ran out and its files were deleted."""


class TooLarge(ServiceError):
    """A body or file over the service's limits."""


class NotAVolume(ServiceError):
    """The upload is in a format the service does not read."""


class IncompleteRequest(ServiceError):
    """A well-formed body that lacks what the request needs (e.g. a form without its file)."""


class WorkerFailed(ServiceError):
    """The model worker raised while serving the request."""


class UpstreamRefused(ServiceError):
    """The PACS answered, but refused what the service sent."""


class Unavailable(ServiceError):
    """Something the request needs is not there now: a model worker, the PACS, a file on this server's disk."""


class WorkerTimedOut(ServiceError):
    """The model worker did not answer in time."""


def worker_failure(kind: str, message: str) -> ServiceError:
    """The error for a failure a worker replied with (its `kind` says whose fault it is)."""
    error = {"bad_input": InvalidRequest, "out_of_memory": Unavailable, "cancelled": Conflict}.get(kind, WorkerFailed)
    return error(message)
