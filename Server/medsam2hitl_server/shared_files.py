"""A worker on another host, whose data folder is not the API's, exchanges a job's files through the API.

With MEDSAM2HITL_API_URL set, the worker fetches the uploaded volume from the API and sends back what the API
must serve or hand to the next worker (the labels and the exported results). Both sides authenticate with
MEDSAM2HITL_WORKER_TOKEN; without it the API does not offer these routes.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from MedSAM2HITLLib.errors import MedSAM2Error

from .settings import Settings

WORKER_FILES = ("labels.npy", "result.nii.gz", "result.seg.nrrd")
TIMEOUT = httpx.Timeout(30.0, read=300.0, write=300.0)


class TransferError(MedSAM2Error):
    kind = "internal"


def _client(settings: Settings) -> httpx.Client:
    return httpx.Client(base_url=settings.api_url.rstrip("/"), timeout=TIMEOUT,
                        headers={"Authorization": f"Bearer {settings.worker_token}"})


def fetch_file(settings: Settings, job_id: str, destination: Path) -> bool:
    """Download a file of the job (its volume, its labels) from the API into this worker's folder, atomically.

    False when the API has no such file (e.g. no labels yet).
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.partial")
    route = f"/api/v1/internal/jobs/{job_id}/files/{destination.name}"
    with _client(settings) as client, client.stream("GET", route) as response:
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise TransferError(f"could not fetch {destination.name} from the API ({response.status_code})")
        with open(partial, "wb") as f:
            for chunk in response.iter_bytes(1 << 20):
                f.write(chunk)
    os.replace(partial, destination)
    return True


def send_file(settings: Settings, job_id: str, path: Path) -> None:
    """Upload one of WORKER_FILES to the API's copy of the job."""
    with _client(settings) as client, open(path, "rb") as f:
        response = client.put(f"/api/v1/internal/jobs/{job_id}/files/{path.name}", content=f)
    if response.status_code != 204:
        raise TransferError(f"could not send {path.name} to the API ({response.status_code})")
