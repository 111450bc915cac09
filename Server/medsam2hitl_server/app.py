"""The FastAPI application: the routers of api/, health probes, OpenAPI at /docs, the web viewer at /."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
import redis
from fastapi import FastAPI, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from . import __version__
from .api import errors, health, internal, jobs
from .errors import TooLarge
from .jobs import Dispatcher
from .schemas import EVENT_PAYLOADS
from .settings import Settings, load
from .store import JobStore, connect

log = logging.getLogger("medsam2hitl_server.api")
MAX_JSON_BYTES = 16 << 20
WEB_VIEWER = Path(__file__).with_name("web")


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
    errors.install(app)
    app.include_router(health.router)
    bearer = HTTPBearer(scheme_name="token", auto_error=False,  # `caller` checks it; this is /docs' Authorize
                        description="one of MEDSAM2HITL_TOKENS (none needed on loopback without tokens)")
    app.include_router(jobs.router, prefix="/api/v1", dependencies=[Security(bearer)])
    app.include_router(internal.router, prefix="/api/v1/internal")
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
                raise TooLarge(f"request body over {self.limit} bytes")
            return message

        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            response = errors.detail(f"request body over {self.limit} bytes", 413)
            return await response(scope, receive, send)
        return await self.app(scope, limited, send)
