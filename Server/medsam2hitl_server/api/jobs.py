"""The jobs API under /api/v1: upload a volume (or name a PACS series), segment slices, propagate, follow the
events, download or store the result, delete. Each route turns a request into a task on the job's worker."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, StringConstraints
from starlette.concurrency import run_in_threadpool

from .. import __version__, dicomweb_jobs
from ..errors import Conflict, Unavailable, worker_failure
from ..schemas import (EVENT_PAYLOADS, Cancelling, JobCreated, JobStatus, Models, PacsSeriesList, Prefetch,
                       PrefetchQueued, PropagationStarted, Propagate, SegmentedSlice, Segment2D, SliceWrite,
                       StoredResult, WrittenSlice, check_against_volume)
from ..session import job_dir
from ..store import JobRecord, JobStore
from ..uploads import receive_volume
from .dependencies import CallerDep, DispatcherDep, JobDep, SettingsDep, StoreDep
from .errors import responses

SSE_BLOCK_MS = 4000
VOLUME_FILE = {"type": "string", "format": "binary", "description": "a NIfTI (.nii, .nii.gz), NRRD or MHA volume"}
UPLOAD_BODY = {"required": True, "content": {
    "application/octet-stream": {"schema": VOLUME_FILE},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": VOLUME_FILE}}},
}}
BINARY = {"schema": {"type": "string", "format": "binary"}}
OBJECT = Query(None, ge=1, le=255, description="one object's mask (0/1); without it, all the job's objects")
SEGMENT_NAMES = Query([], description="segment names, one per object of the result in number order (repeat the "
                                      "parameter); default .seg.nrrd Segment_<number>, DICOM SEG Object")
SEGMENT_COLORS = Query([], description="the .seg.nrrd segments' colours, rrggbb hex, one per object in number "
                                       "order (repeat the parameter)")
SegmentName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\w .()+-]+$")]
SegmentColor = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{6}$")]
RESULT_FILE = {200: {"description": "the mask file", "content": {"application/gzip": BINARY,
                                                                 "application/octet-stream": BINARY,
                                                                 "application/dicom": BINARY}}}
EVENT_STREAM = {200: {"description": "`id:`, `event:` (the kind) and `data:` (its JSON payload) per event",
                      "content": {"text/event-stream": {"schema": {"type": "string"}, "itemSchema": {
                          "type": "object", "required": ["event", "data"], "properties": {
                              "id": {"type": "string"}, "event": {"type": "string", "enum": list(EVENT_PAYLOADS)},
                              "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
                                  "oneOf": [{"$ref": f"#/components/schemas/{model.__name__}"}
                                            for model in EVENT_PAYLOADS.values()]}}}}}}}}

router = APIRouter(tags=["jobs"], responses=responses(401, 404, 410, 422, 503))


def checked(body: BaseModel, record: JobRecord) -> dict:
    """The request's parameters for the worker, once they fit the job's volume (else 400)."""
    check_against_volume(body, record.geometry)
    return body.params() if isinstance(body, Propagate) else body.model_dump()


def answer(reply: dict) -> dict:
    """The worker's answer, or its failure as the error it is."""
    if "error" in reply:
        raise worker_failure(reply["error"]["kind"], reply["error"]["message"])
    return reply["ok"]


def refuse_while_propagating(store: JobStore, record: JobRecord, what: str) -> None:
    if store.holder(record.id):
        raise Conflict(f"a propagation is running on this job; {what}")


@router.get("/models", response_model=Models)
def models(_owner: CallerDep, store: StoreDep) -> dict:
    """Server version, the models the live workers hold, and their load."""
    workers = store.workers()
    found: dict[str, dict] = {}
    for worker in workers:
        model = worker.info.get("model", {})
        name = Path(model.get("checkpoint", "?")).stem
        entry = found.setdefault(name, {"name": name, "device": model.get("device"),
                                        "image_size": model.get("image_size"), "workers": 0})
        entry["workers"] += 1
    return {"version": __version__, "models": list(found.values()),
            "workers": [{"name": w.name, "jobs": w.jobs, "busy": w.info.get("busy", False),
                         "queued_tasks": store.queue_length(w.queue)} for w in workers]}


@router.post("/jobs", status_code=201, response_model=JobCreated, responses=responses(400, 408, 413, 415),
             openapi_extra={"requestBody": UPLOAD_BODY})
async def create_job(request: Request, owner: CallerDep, store: StoreDep, dispatcher: DispatcherDep,
                     settings: SettingsDep,
                     ttl: int | None = Query(None, ge=1, description="seconds to keep the job (at most the "
                                                                      "server's MEDSAM2HITL_JOB_TTL_SECONDS)")
                     ) -> dict:
    """Upload a volume (NIfTI, NRRD or MHA) as the raw request body or as a form's `file` field (the seed's
    form, `curl -F file=@scan.nii.gz`), or name a series on the service's DICOMweb server with a JSON body
    {"dicomweb": {"series": UID, "study": UID}}; it is bound to a model worker. The format is read from the bytes."""
    job_id = str(uuid.uuid4())
    if dicomweb_jobs.is_dicomweb_request(request):
        name, header = await dicomweb_jobs.receive_series(request, job_dir(settings, job_id), settings)
    else:
        name, header = await receive_volume(request, job_dir(settings, job_id), settings.max_upload_bytes,
                                            settings.max_volume_bytes, settings.upload_idle_timeout_seconds)
    summary = {"shape_ijk": list(header.shape_ijk), "dtype": header.dtype}
    keep = min(ttl or settings.job_ttl_seconds, settings.job_ttl_seconds)
    try:
        await run_in_threadpool(store.create, job_id, owner, name, summary, keep)
    except BaseException:  # e.g. Redis down: no record, so no file either
        shutil.rmtree(job_dir(settings, job_id), ignore_errors=True)
        raise
    worker = await run_in_threadpool(dispatcher.bind, job_id)
    return {"id": job_id, "state": "queued", "worker": worker, "expires_in": keep, **summary}


@router.get("/jobs/{job_id}/status", response_model=JobStatus)
def status(record: JobDep, store: StoreDep) -> dict:
    """State, progress, the worker holding the job and its place in that worker's queue."""
    position = None
    if record.state == "queued" or not record.loaded:
        worker = next((w for w in store.workers() if w.name == record.worker), None)
        position = store.queue_position(worker.queue, record.task) if worker else None
    return {"id": record.id, "state": record.state, "progress": {"done": record.done, "total": record.total},
            "worker": record.worker or None, "loaded": record.loaded, "queue_position": position,
            "error": record.error or None, "created": record.created, "expires": record.expires,
            "volume": record.geometry or record.header, "objects": record.objects}


@router.post("/jobs/{job_id}/segment-2d", response_model=SegmentedSlice, responses=responses(400, 409, 500))
def segment_2d(body: Segment2D, record: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> dict:
    """Segment one slice from a box and/or clicks: the mask comes back run-length encoded (see the README)."""
    refuse_while_propagating(store, record, "wait for it or cancel it")
    return answer(dispatcher.call(record.id, "medsam2hitl.segment_2d", checked(body, record)))


@router.put("/jobs/{job_id}/slices", response_model=WrittenSlice, responses=responses(400, 409, 500))
def write_slice(body: SliceWrite, record: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> dict:
    """Replace one slice of the job's labels with the client's mask (empty clears it): an undo or an edit."""
    refuse_while_propagating(store, record, "wait for it or cancel it")
    return answer(dispatcher.call(record.id, "medsam2hitl.write_slice", checked(body, record)))


@router.post("/jobs/{job_id}/propagate", status_code=202, response_model=PropagationStarted,
             responses=responses(400, 409))
def propagate(body: Propagate, record: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> dict:
    """Start filling the range from the key slice of each object (one, or several in `objects`, tracked in one
    pass); follow it on /events or /status. 409 if one runs."""
    params = checked(body, record)
    propagation_id = str(uuid.uuid4())
    if not store.try_lock(record.id, propagation_id):
        raise Conflict("a propagation is already running on this job; wait for it or cancel it")
    try:  # running before the send: a worker that fails at once must not have its "failed" overwritten
        after = store.last_event_id(record.id)
        store.update(record.id, state="running", done=0, total=0, error="")
        worker = dispatcher.worker_of(record.id)
        task_id = dispatcher.send(worker, "medsam2hitl.propagate", record.id, propagation_id, params)
    except BaseException:
        store.update(record.id, state=record.state, error=record.error)
        store.unlock(record.id, propagation_id)
        raise
    store.update(record.id, task=task_id)
    return {"propagation": propagation_id, "events_after": after,
            "events": f"/api/v1/jobs/{record.id}/events?after={after}"}


@router.post("/jobs/{job_id}/prefetch", status_code=202, response_model=PrefetchQueued,
             responses=responses(400, 409))
def prefetch(body: Prefetch, record: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> dict:
    """Encode this slice (and its neighbours) ahead while the user draws, so the box costs only the mask
    decoder. It never delays a real request: dropped when one waits, abandoned when one arrives."""
    refuse_while_propagating(store, record, "prefetch when it has finished")
    return {"prefetch": dispatcher.prefetch(record.id, checked(body, record))}


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Cancelling, responses=responses(409))
def cancel(record: JobDep, store: StoreDep) -> dict:
    """Stop the running propagation within one slice; the finished slices are kept."""
    if not store.request_cancel(record.id):
        raise Conflict("no propagation is running on this job")
    return {"cancelling": True}


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses=EVENT_STREAM)
def events(record: JobDep, store: StoreDep, after: str | None = Query(None, pattern=r"^\d{1,20}-\d{1,20}$"),
           last_event_id: str | None = Header(None, pattern=r"^\d{1,20}-\d{1,20}$")):
    """Server-Sent Events: state changes and each slice as it is made; resumable with Last-Event-ID."""
    job_id = record.id

    def stream():
        cursor = last_event_id or after or "0-0"
        yield "retry: 2000\n\n"
        while True:
            found = store.events_after(job_id, cursor, SSE_BLOCK_MS)
            if not found:
                if store.get(job_id) is None:
                    return
                yield ": keep-alive\n\n"
            for entry_id, kind, data in found:
                cursor = entry_id
                yield f"id: {entry_id}\nevent: {kind}\ndata: {data}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


class Results:
    """The job's result files, made by its worker: as exported, and as a DICOM SEG on its series."""

    def __init__(self, record: JobDep, store: StoreDep, dispatcher: DispatcherDep, settings: SettingsDep):
        self.record, self.store, self.dispatcher, self.settings = record, store, dispatcher, settings

    def exported(self, format: str, number: int | None = None, names: list[str] | None = None,
                 colors: list[str] | None = None) -> dict:
        """The exported file's path, the objects it holds and their segment names."""
        refuse_while_propagating(self.store, self.record, "download when it has finished")
        reply = answer(self.dispatcher.call(self.record.id, "medsam2hitl.export", format, number, names, colors))
        path = job_dir(self.settings, self.record.id) / reply["file"]
        if not path.is_file():
            raise Unavailable("the result file is not on this server's disk; see the README on workers without a "
                              "shared data folder")
        return {**reply, "path": path}

    def dicom_seg(self, number: int | None, names: list[str]) -> Path:
        made = self.exported("nii.gz", number, names)
        defaults = ["Object" if len(made["objects"]) == 1 else f"Object {n}" for n in made["objects"]]
        named = names + defaults[len(names):]
        segments = {1: named[0]} if number is not None else dict(zip(made["objects"], named))
        return dicomweb_jobs.dicom_seg(self.settings, self.record.id, lambda: made["path"], segments)


ResultsDep = Annotated[Results, Depends(Results)]


@router.get("/jobs/{job_id}/result", response_class=FileResponse,
            responses={**RESULT_FILE, **responses(409, 500, 503)})
def result(results: ResultsDep, format: Literal["nii.gz", "seg.nrrd", "dicom-seg"] = "nii.gz",
           object: int | None = OBJECT, segment_name: list[SegmentName] = SEGMENT_NAMES,
           segment_color: list[SegmentColor] = SEGMENT_COLORS):
    """The 3D mask of one `object` (0/1), or of all the job's objects (label value = object number; one
    segment per object in .seg.nrrd and DICOM SEG): NIfTI with the input's affine and voxel order, Slicer's
    .seg.nrrd (segments named and coloured as given, e.g. as the web viewer shows them), or for a job read
    from DICOM a DICOM SEG linked to its series."""
    job_id = results.record.id
    if format == "dicom-seg":
        return FileResponse(results.dicom_seg(object, segment_name), media_type="application/dicom",
                            filename=f"{job_id}.dcm")
    path = results.exported(format, object, segment_name, segment_color)["path"]
    media = "application/gzip" if format == "nii.gz" else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=f"{job_id}.{format}")


@router.post("/jobs/{job_id}/result/store", response_model=StoredResult,
             responses=responses(403, 409, 502, 503))
def store_result(results: ResultsDep, settings: SettingsDep, object: int | None = OBJECT,
                 segment_name: list[SegmentName] = SEGMENT_NAMES) -> dict:
    """Store the result as a DICOM SEG on the service's DICOMweb server (STOW-RS; off unless
    MEDSAM2HITL_DICOMWEB_STORE=1)."""
    return dicomweb_jobs.store_seg(settings, lambda: results.dicom_seg(object, segment_name))


@router.get("/jobs/{job_id}/volume", response_class=FileResponse,
            responses={200: {"description": "the volume file", "content": {"application/octet-stream": BINARY}},
                       **responses(503)})
def volume(record: JobDep, settings: SettingsDep):
    """The job's volume as the worker reads it: the upload, or for a DICOMweb job the volume.nrrd made from
    its series (the viewer shows it)."""
    name = record.volume_file
    return FileResponse(dicomweb_jobs.volume_file(settings, record.id, name),
                        media_type="application/octet-stream", filename=name)


@router.get("/dicomweb/series", response_model=PacsSeriesList, tags=["dicomweb"], responses=responses(503))
def dicomweb_series(_owner: CallerDep, settings: SettingsDep,
                    study: str | None = Query(None, pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64,
                                              description="only this study's series"),
                    limit: int = Query(100, ge=1, le=500), offset: int = Query(0, ge=0)) -> dict:
    """The image series on the service's DICOMweb server (QIDO-RS), without patient names or IDs: what
    `POST /jobs` with {"dicomweb": {"series": ...}} can open. 503 when no server is configured or it is
    unreachable."""
    return dicomweb_jobs.list_series(settings, study, limit, offset)


@router.delete("/jobs/{job_id}", status_code=204)
def delete(record: JobDep, store: StoreDep, dispatcher: DispatcherDep) -> Response:
    """Delete the job now: its files, its keys and the worker's copy of the volume."""
    if store.holder(record.id):
        store.request_cancel(record.id)
    dispatcher.purge(record.id, expired=False)
    return Response(status_code=204)
