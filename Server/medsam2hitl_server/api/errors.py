"""The one place where errors become HTTP replies: each is `{"detail": "<one line>"}` with its status."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from MedSAM2HITLLib.errors import BadInputError

from .. import errors
from ..schemas import ErrorDetail

log = logging.getLogger("medsam2hitl_server.api")
HTTP_STATUS: dict[type[errors.ServiceError], int] = {
    errors.InvalidRequest: 400, errors.Unauthenticated: 401, errors.NotAllowed: 403, errors.NotFound: 404,
    errors.UploadStalled: 408, errors.Conflict: 409, errors.Expired: 410, errors.TooLarge: 413,
    errors.NotAVolume: 415, errors.IncompleteRequest: 422, errors.WorkerFailed: 500, errors.UpstreamRefused: 502,
    errors.Unavailable: 503, errors.WorkerTimedOut: 504,
}
EXTRA_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 408: {"Connection": "close"}}


def responses(*codes: int) -> dict:
    """OpenAPI entries for a route's error replies."""
    return {code: {"model": ErrorDetail} for code in codes}


def detail(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.ServiceError)
    async def _service_error(_request, error: errors.ServiceError):
        status = HTTP_STATUS[type(error)]
        headers = dict(EXTRA_HEADERS.get(status, {}))
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return detail(str(error), status, headers)

    @app.exception_handler(BadInputError)
    async def _bad_input(_request, error: BadInputError):
        """The library's checks of what a request asks of the volume (range, slice, mask shape)."""
        return detail(str(error), 400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            problems.append(f"{where}: {item.get('msg', 'invalid')}" if where else item.get("msg", "invalid"))
        return detail("; ".join(problems) or "invalid request", 422)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _error):
        """A client that went away mid-request (e.g. an upload cancelled) is one log line, not a traceback."""
        log.warning("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(redis.RedisError)
    async def _store_down(_request, _error):
        return detail("the job store (Redis) is unreachable; retry in a few seconds", 503, {"Retry-After": "5"})
