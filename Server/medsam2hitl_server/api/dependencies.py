"""What routes receive: the app's settings, job store and dispatcher (made once in `create_app`, kept on
`app.state`), the caller, and the caller's job."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from ..auth import caller
from ..errors import Expired, NotFound
from ..jobs import Dispatcher
from ..settings import Settings
from ..store import JobRecord, JobStore


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def store_of(request: Request) -> JobStore:
    return request.app.state.store


def dispatcher_of(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(settings_of)]
StoreDep = Annotated[JobStore, Depends(store_of)]
DispatcherDep = Annotated[Dispatcher, Depends(dispatcher_of)]
CallerDep = Annotated[str, Depends(caller)]


def callers_job(job_id: uuid.UUID, owner: CallerDep, store: StoreDep) -> JobRecord:
    """The caller's job, or 404 (also for another caller's job) / 410 (expired)."""
    record = store.get(str(job_id))
    if record is None or record.owner != owner:
        if record is None and store.is_expired(str(job_id)):
            raise Expired("the job expired and its files were deleted; upload the volume again")
        raise NotFound("no such job")
    return record


JobDep = Annotated[JobRecord, Depends(callers_job)]
