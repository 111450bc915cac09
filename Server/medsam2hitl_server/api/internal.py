"""Files of a job for model workers whose data folder is not the API's (see shared_files.py): only with the
worker token, and 404 to anyone else so the routes are not revealed."""

from __future__ import annotations

import hmac
import os
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse

from ..errors import NotAllowed, NotFound
from ..session import LABELS_FILE, job_dir
from ..shared_files import WORKER_FILES
from ..uploads import stream_to_file
from .dependencies import SettingsDep, StoreDep


def worker(request: Request, settings: SettingsDep) -> None:
    token = request.headers.get("authorization", "").partition(" ")[2]
    if not settings.worker_token or not hmac.compare_digest(token.encode(), settings.worker_token.encode()):
        raise NotFound("Not Found")


router = APIRouter(include_in_schema=False, dependencies=[Depends(worker)])


def known_file(job_id: uuid.UUID, name: str, allowed: tuple[str, ...], store: StoreDep,
               settings: SettingsDep) -> Path:
    record = store.get(str(job_id))
    if record is None or name not in allowed + (record.volume_file,):
        raise NotFound("no such file")
    return job_dir(settings, str(job_id)) / name


@router.get("/jobs/{job_id}/files/{name}")
def fetch(job_id: uuid.UUID, name: str, store: StoreDep, settings: SettingsDep):
    path = known_file(job_id, name, (LABELS_FILE,), store, settings)
    if not path.is_file():
        raise NotFound("no such file")
    return FileResponse(path, media_type="application/octet-stream")


@router.put("/jobs/{job_id}/files/{name}", status_code=204)
async def receive(job_id: uuid.UUID, name: str, request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    path = known_file(job_id, name, WORKER_FILES, store, settings)
    if name not in WORKER_FILES:
        raise NotAllowed("the uploaded volume cannot be replaced")
    partial = path.with_name(f".{name}.partial")
    try:
        await stream_to_file(request, partial, settings.max_volume_bytes + (1 << 20),
                             settings.upload_idle_timeout_seconds)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return Response(status_code=204)
