"""Jobs on a series of the configured PACS (DICOMweb), and their results as DICOM SEG, stored back on request.

The server's address and login come only from the service's settings (MEDSAM2HITL_DICOMWEB_*), never from a
request, so a client can neither point the service at another host nor learn the credentials. A DICOM job keeps
its series in `<job>/dicom/` (the SEG's references are read from there) and gives the worker a `volume.nrrd` made
from it, so workers handle it like an upload.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Callable

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from MedSAM2HITLLib.dicomweb import DicomWebServer, DicomWebUnreachable, SeriesNotFound, retrieve_series, \
    search_series, store_instance
from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.dicom_series import read_dicom
from MedSAM2HITLLib.volume_file import VolumeHeader, check_volume_file

from .errors import (Conflict, IncompleteRequest, InvalidRequest, NotAllowed, NotFound, TooLarge, Unavailable,
                     UpstreamRefused)
from .session import job_dir
from .settings import Settings

DICOM_FOLDER = "dicom"
VOLUME_FILE = "volume.nrrd"
SEG_FILE = "result.dcm"
MAX_REQUEST_BYTES = 4096
Uid = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]


class DicomWebSeries(BaseModel):
    model_config = ConfigDict(extra="forbid")
    series: Uid
    study: Uid | None = None


class DicomWebJob(BaseModel):
    """`POST /api/v1/jobs` with a JSON body: the series to segment, on the server the settings name."""

    model_config = ConfigDict(extra="forbid")
    dicomweb: DicomWebSeries


def is_dicomweb_request(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


def configured_server(settings: Settings) -> DicomWebServer:
    if not settings.dicomweb_url:
        raise Unavailable("this service has no DICOMweb server configured (MEDSAM2HITL_DICOMWEB_URL)")
    return DicomWebServer(settings.dicomweb_url, settings.dicomweb_user or None, settings.dicomweb_password or None,
                          settings.dicomweb_token or None)


def list_series(settings: Settings, study: str | None, limit: int, offset: int) -> dict:
    """The configured server's image series (QIDO-RS), patient-free; 503 when there is none or it is unreachable,
    404 for a study it lacks."""
    server = configured_server(settings)
    try:
        found = search_series(server, study, limit, offset)
    except SeriesNotFound as error:
        raise NotFound(str(error)) from None
    except DicomWebUnreachable as error:
        raise Unavailable(str(error)) from None
    return {"server": server.shown(), "series": [asdict(series) for series in found]}


def volume_file(settings: Settings, job_id: str, name: str) -> Path:
    """The job's volume as the worker reads it (for a DICOMweb job the volume.nrrd made from its series), so a
    viewer shows the very grid that the masks are on."""
    path = job_dir(settings, job_id) / name
    if not path.is_file():
        raise Unavailable("the job's volume is not on this server's disk; see the README on workers "
                                 "without a shared data folder")
    return path


async def receive_series(request: Request, folder: Path, settings: Settings) -> tuple[str, VolumeHeader]:
    """Fetch the requested series into `folder` and make the worker's volume from it; returns its file name and
    header, as an upload does. 404 for a series the PACS lacks, 503 when the PACS cannot be reached; any failure
    removes the folder."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise TooLarge(f"a DICOMweb job request is a small JSON object (at most {MAX_REQUEST_BYTES} "
                                     "bytes)")
    try:
        source = DicomWebJob.model_validate(json.loads(body or b"null")).dicomweb
    except (ValueError, ValidationError):
        raise IncompleteRequest('send {"dicomweb": {"series": "<SeriesInstanceUID>", "study": "<optional>"}}') \
            from None
    server = configured_server(settings)
    folder.mkdir(parents=True)
    try:
        return await run_in_threadpool(_fetch_and_convert, server, source, folder, settings.max_volume_bytes)
    except SeriesNotFound as error:
        raise NotFound(str(error)) from None
    except DicomWebUnreachable as error:
        raise Unavailable(str(error)) from None
    except BadInputError as error:
        raise InvalidRequest(str(error)) from None
    finally:
        if not (folder / VOLUME_FILE).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def _fetch_and_convert(server: DicomWebServer, source: DicomWebSeries, folder: Path,
                       max_volume_bytes: int) -> tuple[str, VolumeHeader]:
    import SimpleITK as sitk

    series_folder = retrieve_series(server, source.series, folder / DICOM_FOLDER, source.study)
    volume = read_dicom(series_folder, source.series, max_volume_bytes)  # the CLI's checks and tilt resampling
    sitk.WriteImage(volume.sitk_image(), str(folder / VOLUME_FILE), useCompression=True)
    return VOLUME_FILE, check_volume_file(folder / VOLUME_FILE, max_volume_bytes)


def source_folder(settings: Settings, job_id: str) -> Path:
    """The job's DICOM series, or 409 for a job made from an uploaded file."""
    folder = job_dir(settings, job_id) / DICOM_FOLDER
    if not folder.is_dir():
        raise Conflict("this job's volume was uploaded as a file, not read from DICOM: it has no patient, "
                                 "study or instances for a DICOM SEG to link to; download nii.gz or seg.nrrd")
    return folder


def dicom_seg(settings: Settings, job_id: str, nifti_result: Callable[[], Path], segments: dict[int, str]) -> Path:
    """The job's result as a DICOM SEG on its series: label value n of the NIfTI `nifti_result` exports is the
    segment `segments[n]` (numbered 1.. in value order, as DICOM wants them consecutive)."""
    import nibabel as nib
    import numpy as np

    from MedSAM2HITLLib.dicom_seg import write_dicom_seg

    folder = source_folder(settings, job_id)
    result = nib.load(nifti_result())
    labels = np.asarray(result.dataobj).transpose(2, 1, 0)  # NIfTI (i, j, k) → [k, j, i]
    if not labels.any():
        raise Conflict("the job's result is empty: segment something before asking for a DICOM SEG")
    values = sorted(segments)
    numbered = np.zeros(labels.shape, np.uint8)
    for number, value in enumerate(values, start=1):
        numbered[labels == value] = number
    try:
        return write_dicom_seg(numbered, result.affine, {n: segments[v] for n, v in enumerate(values, start=1)},
                               folder, None, job_dir(settings, job_id) / SEG_FILE, Path(settings.checkpoint).stem)
    except BadInputError as error:
        raise InvalidRequest(str(error)) from None


def store_seg(settings: Settings, make_seg: Callable[[], Path]) -> dict:
    """Make the SEG and send it to the configured server (STOW-RS), only when MEDSAM2HITL_DICOMWEB_STORE allows it."""
    if not settings.dicomweb_store:
        raise NotAllowed("storing results on the PACS is off; an administrator can allow it with "
                                 "MEDSAM2HITL_DICOMWEB_STORE=1")
    server = configured_server(settings)
    try:
        uid = store_instance(server, make_seg())
    except DicomWebUnreachable as error:
        raise Unavailable(str(error)) from None
    except BadInputError as error:
        raise UpstreamRefused(str(error)) from None
    return {"stored": uid, "server": server.shown()}
