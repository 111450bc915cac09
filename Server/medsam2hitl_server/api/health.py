"""Liveness and readiness probes for a supervisor or load balancer; no token needed, nothing about jobs."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response

from .. import __version__
from ..schemas import Health, Readiness
from .dependencies import StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> dict:
    """The API process answers."""
    return {"status": "ok", "version": __version__}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(response: Response, store: StoreDep) -> dict:
    """Redis answers and at least one model worker is alive."""
    try:
        store.ping()
        workers = len(store.workers())
    except redis.RedisError:
        response.status_code = 503
        return {"ready": False, "redis": False, "workers": 0}
    response.status_code = 200 if workers else 503
    return {"ready": bool(workers), "redis": True, "workers": workers}
