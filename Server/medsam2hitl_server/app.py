"""The FastAPI application: the jobs API under /api/v1, health probes, OpenAPI at /docs."""

from __future__ import annotations

import hmac
import json
import logging
import os
import shutil
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import fastapi_offline
import redis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import StringConstraints
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from MedSAM2HITLLib.errors import BadInputError

from . import __version__, dicomweb_jobs
from .auth import Caller
from .jobs import Dispatcher
from .schemas import (EVENT_PAYLOADS, Cancelling, ErrorDetail, Health, JobCreated, JobStatus, Models,
                      PropagationStarted, Propagate, Readiness, SegmentedSlice, Segment2D, SliceWrite, StoredResult,
                      WrittenSlice,
                      Prefetch, PrefetchQueued,
                      check_against_volume)
from .schemas import PacsSeriesList
from .session import LABELS_FILE, job_dir
from .shared_files import WORKER_FILES
from .settings import Settings, load
from .store import JobStore, connect
from .uploads import receive_volume, stream_to_file

log = logging.getLogger("medsam2hitl_server.api")
ERROR_STATUS = {"bad_input": 400, "out_of_memory": 503, "cancelled": 409, "model": 500, "internal": 500}
MAX_JSON_BYTES = 16 << 20
WEB_VIEWER = Path(__file__).with_name("web")
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


def errors(*codes: int) -> dict:
    """OpenAPI entries for error replies: each is `{detail}` with one line."""
    return {code: {"model": ErrorDetail} for code in codes}


def _with_event_schemas(app: FastAPI) -> None:
    """Add the event payload models to the OpenAPI components (no route returns them as JSON)."""
    from pydantic.json_schema import models_json_schema

    build = app.openapi

    def openapi() -> dict:
        schema = build()
        found = schema.setdefault("components", {}).setdefault("schemas", {})
        if not all(name in found for name in (m.__name__ for m in EVENT_PAYLOADS.values())):
            _, events = models_json_schema([(model, "serialization") for model in EVENT_PAYLOADS.values()],
                                           ref_template="#/components/schemas/{model}")
            found.update(events["$defs"])
        return schema

    app.openapi = openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load()
    settings.check_bind()
    store = JobStore(connect(settings.redis_url), settings.job_ttl_seconds, settings.worker_dead_after_seconds)
    dispatcher = Dispatcher(store, settings)

    @asynccontextmanager
    async def lifespan(_app):
        stop = threading.Event()
        reaper = threading.Thread(target=_reap_forever, args=(dispatcher, stop), name="reaper", daemon=True)
        reaper.start()
        yield
        stop.set()

    app = FastAPI(title="MedSAM2HITL inference service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # FastAPI's pages load scripts from a CDN; /docs is below, ReDoc
                  # is off (its bundle still fetches a logo from cdn.redoc.ly)
                  description="Box-prompted 3D segmentation with MedSAM2: upload a volume, segment a slice, "
                              "propagate through the volume, download the mask.")
    app.state.settings, app.state.store, app.state.dispatcher = settings, store, dispatcher
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type",
                                                                                  "Last-Event-ID"])
    app.add_middleware(BodyLimit, limit=MAX_JSON_BYTES,
                       exempt=lambda path: path == "/api/v1/jobs" or path.startswith("/api/v1/internal/"))
    _error_handlers(app)
    app.include_router(_health(store))
    bearer = HTTPBearer(scheme_name="token", auto_error=False,  # `caller` checks it; this is /docs' Authorize
                        description="one of MEDSAM2HITL_TOKENS (none needed on loopback without tokens)")
    app.include_router(_jobs_router(store, dispatcher, settings), prefix="/api/v1", dependencies=[Security(bearer)])
    app.include_router(_worker_files_router(store, settings), prefix="/api/v1/internal")
    docs_assets = "/docs/assets"  # fastapi-offline's copy of Swagger UI 5: /docs works without internet
    app.mount(docs_assets, StaticFiles(directory=Path(fastapi_offline.__file__).with_name("static")),
              name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{docs_assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{docs_assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{docs_assets}/favicon.png")

    app.mount("/", StaticFiles(directory=WEB_VIEWER, html=True), name="web-viewer")  # last: the API routes win
    _with_event_schemas(app)
    return app


def _reap_forever(dispatcher: Dispatcher, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            dispatcher.reap()
        except redis.RedisError as error:
            log.warning("housekeeping skipped: Redis unreachable (%s)", error.__class__.__name__)
        except Exception:
            log.exception("housekeeping failed")


class BodyLimit:
    """Refuse request bodies over `limit` bytes while they arrive (Starlette has no limit of its own)."""

    def __init__(self, app, limit: int, exempt):
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.exempt(scope["path"]):
            return await self.app(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
            return await response(scope, receive, send)
        return await self.app(scope, limited, send)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            problems.append(f"{where}: {item.get('msg', 'invalid')}" if where else item.get("msg", "invalid"))
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _error):
        """A client that went away mid-request (e.g. an upload cancelled) is one log line, not a traceback."""
        log.warning("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(redis.RedisError)
    async def _store_down(_request, _error):
        return JSONResponse({"detail": "the job store (Redis) is unreachable; retry in a few seconds"},
                            status_code=503, headers={"Retry-After": "5"})


def _health(store: JobStore) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health)
    def healthz() -> dict:
        """The API process answers."""
        return {"status": "ok", "version": __version__}

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    def readyz(response: Response) -> dict:
        """Redis answers and at least one model worker is alive."""
        try:
            store.redis.ping()
            workers = len(store.workers())
        except redis.RedisError:
            response.status_code = 503
            return {"ready": False, "redis": False, "workers": 0}
        response.status_code = 200 if workers else 503
        return {"ready": bool(workers), "redis": True, "workers": workers}

    return router


def _jobs_router(store: JobStore, dispatcher: Dispatcher, settings: Settings) -> APIRouter:
    router = APIRouter(tags=["jobs"], responses=errors(401, 404, 410, 422, 503))

    def job(job_id: uuid.UUID, owner: str = Caller) -> dict:
        """The caller's job, or 404 (also for another caller's job) / 410 (expired)."""
        record = store.get(str(job_id))
        if record is None or record["owner"] != owner:
            if record is None and store.is_expired(str(job_id)):
                raise HTTPException(410, "the job expired and its files were deleted; upload the volume again")
            raise HTTPException(404, "no such job")
        record["id"] = str(job_id)
        return record

    Job = Depends(job)

    def checked(body, record: dict) -> dict:
        try:
            check_against_volume(body, json.loads(record["geometry"]) if record.get("geometry") else None)
        except BadInputError as error:
            raise HTTPException(400, str(error)) from None
        return body.params() if isinstance(body, Propagate) else body.model_dump()

    def raise_failure(reply: dict) -> dict:
        if "error" in reply:
            failure = reply["error"]
            raise HTTPException(ERROR_STATUS.get(failure["kind"], 500), failure["message"])
        return reply["ok"]

    @router.get("/models", response_model=Models)
    def models(owner: str = Caller) -> dict:
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
                             "queued_tasks": store.redis.llen(w.queue)} for w in workers]}

    @router.post("/jobs", status_code=201, response_model=JobCreated, responses=errors(400, 408, 413, 415),
                 openapi_extra={"requestBody": UPLOAD_BODY})
    async def create_job(request: Request, owner: str = Caller,
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
    def status(record: dict = Job) -> dict:
        """State, progress, the worker holding the job and its place in that worker's queue."""
        position = None
        if record["state"] == "queued" or record["loaded"] != "1":
            worker = next((w for w in store.workers() if w.name == record["worker"]), None)
            position = store.queue_position(worker.queue, record.get("task", "")) if worker else None
        geometry = record.get("geometry")
        return {"id": record["id"], "state": record["state"],
                "progress": {"done": int(record["done"]), "total": int(record["total"])},
                "worker": record["worker"] or None, "loaded": record["loaded"] == "1",
                "queue_position": position, "error": record["error"] or None,
                "created": float(record["created"]), "expires": float(record["expires"]),
                "volume": json.loads(geometry) if geometry else json.loads(record["header"]),
                "objects": json.loads(record.get("objects") or "[]")}

    def call_when_idle(record: dict, task: str, body) -> dict:
        """Run a short task on the job's worker and return its reply; 409 while a propagation holds the job."""
        if store.holder(record["id"]):
            raise HTTPException(409, "a propagation is running on this job; wait for it or cancel it")
        return raise_failure(dispatcher.call(record["id"], task, checked(body, record)))

    @router.post("/jobs/{job_id}/segment-2d", response_model=SegmentedSlice, responses=errors(400, 409, 500))
    def segment_2d(body: Segment2D, record: dict = Job) -> dict:
        """Segment one slice from a box and/or clicks: the mask comes back run-length encoded (see the README)."""
        return call_when_idle(record, "medsam2hitl.segment_2d", body)

    @router.put("/jobs/{job_id}/slices", response_model=WrittenSlice, responses=errors(400, 409, 500))
    def write_slice(body: SliceWrite, record: dict = Job) -> dict:
        """Replace one slice of the job's labels with the client's mask (empty clears it): an undo or an edit."""
        return call_when_idle(record, "medsam2hitl.write_slice", body)

    @router.post("/jobs/{job_id}/propagate", status_code=202, response_model=PropagationStarted,
                 responses=errors(400, 409))
    def propagate(body: Propagate, record: dict = Job) -> dict:
        """Start filling the range from the key slice of each object (one, or several in `objects`, tracked in one
        pass); follow it on /events or /status. 409 if one runs."""
        params = checked(body, record)
        propagation_id = str(uuid.uuid4())
        if not store.try_lock(record["id"], propagation_id):
            raise HTTPException(409, "a propagation is already running on this job; wait for it or cancel it")
        try:  # running before the send: a worker that fails at once must not have its "failed" overwritten
            after = store.last_event_id(record["id"])
            store.update(record["id"], state="running", done=0, total=0, error="")
            worker = dispatcher.worker_of(record["id"])
            task_id = dispatcher.send(worker, "medsam2hitl.propagate", record["id"], propagation_id,
                                      params)
        except BaseException:
            store.update(record["id"], state=record["state"], error=record["error"])
            store.unlock(record["id"], propagation_id)
            raise
        store.update(record["id"], task=task_id)
        return {"propagation": propagation_id, "events_after": after,
                "events": f"/api/v1/jobs/{record['id']}/events?after={after}"}

    @router.post("/jobs/{job_id}/prefetch", status_code=202, response_model=PrefetchQueued,
                 responses=errors(400, 409))
    def prefetch(body: Prefetch, record: dict = Job) -> dict:
        """Encode this slice (and its neighbours) ahead while the user draws, so the box costs only the mask
        decoder. It never delays a real request: dropped when one waits, abandoned when one arrives."""
        if store.holder(record["id"]):
            raise HTTPException(409, "a propagation is running on this job; prefetch when it has finished")
        return {"prefetch": dispatcher.prefetch(record["id"], checked(body, record))}

    @router.post("/jobs/{job_id}/cancel", status_code=202, response_model=Cancelling, responses=errors(409))
    def cancel(record: dict = Job) -> dict:
        """Stop the running propagation within one slice; the finished slices are kept."""
        if not store.request_cancel(record["id"]):
            raise HTTPException(409, "no propagation is running on this job")
        return {"cancelling": True}

    @router.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses=EVENT_STREAM)
    def events(record: dict = Job, after: str | None = Query(None, pattern=r"^\d{1,20}-\d{1,20}$"),
               last_event_id: str | None = Header(None, pattern=r"^\d{1,20}-\d{1,20}$")):
        """Server-Sent Events: state changes and each slice as it is made; resumable with Last-Event-ID."""
        job_id = record["id"]

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

    def exported(record: dict, format: str, number: int | None = None, names: list[str] | None = None,
                 colors: list[str] | None = None) -> dict:
        """The exported file's path, the objects it holds and their segment names."""
        if store.holder(record["id"]):
            raise HTTPException(409, "a propagation is running on this job; download when it has finished")
        reply = raise_failure(dispatcher.call(record["id"], "medsam2hitl.export", format, number, names, colors))
        path = job_dir(settings, record["id"]) / reply["file"]
        if not path.is_file():
            raise HTTPException(503, "the result file is not on this server's disk; see the README on "
                                     "workers without a shared data folder")
        return {**reply, "path": path}

    def dicom_seg(record: dict, number: int | None, names: list[str]) -> Path:
        made = exported(record, "nii.gz", number, names)
        defaults = ["Object" if len(made["objects"]) == 1 else f"Object {n}" for n in made["objects"]]
        named = names + defaults[len(names):]
        segments = {1: named[0]} if number is not None else dict(zip(made["objects"], named))
        return dicomweb_jobs.dicom_seg(settings, record["id"], lambda: made["path"], segments)

    @router.get("/jobs/{job_id}/result", response_class=FileResponse,
                responses={**RESULT_FILE, **errors(409, 500, 503)})
    def result(record: dict = Job, format: Literal["nii.gz", "seg.nrrd", "dicom-seg"] = "nii.gz",
               object: int | None = OBJECT, segment_name: list[SegmentName] = SEGMENT_NAMES,
               segment_color: list[SegmentColor] = SEGMENT_COLORS):
        """The 3D mask of one `object` (0/1), or of all the job's objects (label value = object number; one
        segment per object in .seg.nrrd and DICOM SEG): NIfTI with the input's affine and voxel order, Slicer's
        .seg.nrrd (segments named and coloured as given, e.g. as the web viewer shows them), or for a job read
        from DICOM a DICOM SEG linked to its series."""
        if format == "dicom-seg":
            return FileResponse(dicom_seg(record, object, segment_name), media_type="application/dicom",
                                filename=f"{record['id']}.dcm")
        path = exported(record, format, object, segment_name, segment_color)["path"]
        media = "application/gzip" if format == "nii.gz" else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=f"{record['id']}.{format}")

    @router.post("/jobs/{job_id}/result/store", response_model=StoredResult, responses=errors(403, 409, 502, 503))
    def store_result(record: dict = Job, object: int | None = OBJECT,
                     segment_name: list[SegmentName] = SEGMENT_NAMES) -> dict:
        """Store the result as a DICOM SEG on the service's DICOMweb server (STOW-RS; off unless
        MEDSAM2HITL_DICOMWEB_STORE=1)."""
        return dicomweb_jobs.store_seg(settings, lambda: dicom_seg(record, object, segment_name))

    @router.get("/jobs/{job_id}/volume", response_class=FileResponse,
                responses={200: {"description": "the volume file", "content": {"application/octet-stream": BINARY}},
                           **errors(503)})
    def volume(record: dict = Job):
        """The job's volume as the worker reads it: the upload, or for a DICOMweb job the volume.nrrd made from
        its series (the viewer shows it)."""
        name = record["volume_file"]
        return FileResponse(dicomweb_jobs.volume_file(settings, record["id"], name),
                            media_type="application/octet-stream", filename=name)

    @router.get("/dicomweb/series", response_model=PacsSeriesList, tags=["dicomweb"], responses=errors(503))
    def dicomweb_series(owner: str = Caller,
                        study: str | None = Query(None, pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64,
                                                  description="only this study's series"),
                        limit: int = Query(100, ge=1, le=500), offset: int = Query(0, ge=0)) -> dict:
        """The image series on the service's DICOMweb server (QIDO-RS), without patient names or IDs: what
        `POST /jobs` with {"dicomweb": {"series": ...}} can open. 503 when no server is configured or it is
        unreachable."""
        return dicomweb_jobs.list_series(settings, study, limit, offset)

    @router.delete("/jobs/{job_id}", status_code=204)
    def delete(record: dict = Job) -> Response:
        """Delete the job now: its files, its keys and the worker's copy of the volume."""
        holder = store.holder(record["id"])
        if holder:
            store.request_cancel(record["id"])
        dispatcher.purge(record["id"], expired=False)
        return Response(status_code=204)

    return router


def _worker_files_router(store: JobStore, settings: Settings) -> APIRouter:
    """Files of a job for model workers whose data folder is not the API's (see shared_files.py)."""
    router = APIRouter(include_in_schema=False)

    def worker(request: Request) -> None:
        token = request.headers.get("authorization", "").partition(" ")[2]
        if not settings.worker_token or not hmac.compare_digest(token.encode(), settings.worker_token.encode()):
            raise HTTPException(404, "Not Found")

    def known(job_id: uuid.UUID, name: str, allowed: tuple[str, ...]) -> Path:
        record = store.get(str(job_id))
        if record is None or name not in allowed + (record["volume_file"],):
            raise HTTPException(404, "no such file")
        return job_dir(settings, str(job_id)) / name

    @router.get("/jobs/{job_id}/files/{name}", dependencies=[Depends(worker)])
    def fetch(job_id: uuid.UUID, name: str):
        path = known(job_id, name, (LABELS_FILE,))
        if not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path, media_type="application/octet-stream")

    @router.put("/jobs/{job_id}/files/{name}", status_code=204, dependencies=[Depends(worker)])
    async def receive(job_id: uuid.UUID, name: str, request: Request) -> Response:
        path = known(job_id, name, WORKER_FILES)
        if name not in WORKER_FILES:
            raise HTTPException(403, "the uploaded volume cannot be replaced")
        partial = path.with_name(f".{name}.partial")
        try:
            await stream_to_file(request, partial, settings.max_volume_bytes + (1 << 20),
                                 settings.upload_idle_timeout_seconds)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return Response(status_code=204)

    return router
