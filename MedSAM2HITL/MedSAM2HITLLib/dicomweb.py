"""A series from a DICOMweb server (QIDO-RS to find it, WADO-RS to fetch it) and a result back (STOW-RS).

dicomweb-client does the protocol. The series is saved as plain files in a folder, so everything after it (the
volume reader, the DICOM SEG's references) is the folder path. Credentials come from the caller (settings or
environment), go only into the HTTP session, and never into a message: server addresses are shown without any
user:password part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import BadInputError

TIMEOUT_SECONDS = 60.0
RETRY_ATTEMPTS, RETRY_WAIT_MS = 3, 500  # dicomweb-client's default (5, 1000 ms) waits 30 s before "unreachable"


class DicomWebUnreachable(BadInputError):
    """The server did not answer, or refused the credentials: nothing about the series is known."""


class SeriesNotFound(BadInputError):
    """The server answered, and holds no such series."""


@dataclass(frozen=True)
class DicomWebServer:
    """Where the PACS is, and how to log in (HTTP basic with `user`/`password`, or a bearer `token`)."""

    url: str
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def shown(self) -> str:
        """The URL for messages: scheme, host, port and path only."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _client(server: DicomWebServer):
    import requests
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(server.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInputError(f"DICOMweb URL '{server.shown()}' must be http(s)://host[:port]/path")
    session = requests.Session()
    user, password = server.user or parts.username, server.password or parts.password
    if server.token:
        session.headers["Authorization"] = f"Bearer {server.token}"
    elif user:
        session.auth = (user, password or "")
    url = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
    client = DICOMwebClient(url, session=session, timeout=TIMEOUT_SECONDS)
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


def _calling(server: DicomWebServer, what: str, call):
    """`call()`, with network and HTTP failures as one-line errors that name the server but no credentials."""
    import requests

    try:
        return call()
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise DicomWebUnreachable(f"DICOMweb server {server.shown()} refused the credentials ({status}) while "
                                      f"{what}; check the user/password or token") from None
        if status == 404:
            raise SeriesNotFound(f"DICOMweb server {server.shown()} has nothing for {what} (404)") from None
        raise DicomWebUnreachable(f"DICOMweb server {server.shown()} failed while {what} (HTTP {status})") from None
    except requests.RequestException as error:
        raise DicomWebUnreachable(f"DICOMweb server {server.shown()} is unreachable while {what} "
                                  f"({type(error).__name__}); check the URL and that the server runs") from None


@dataclass(frozen=True)
class SeriesSummary:
    """A series as a list shows it: UIDs, modality, description, number and instance count, nothing about the
    patient (no name, ID, birth date or study date)."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    number: int | None
    instances: int | None


NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD"})
SERIES_FIELDS = ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                 "NumberOfSeriesRelatedInstances")


def _value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _whole(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def search_series(server: DicomWebServer, study_uid: str | None = None, limit: int = 100,
                  offset: int = 0) -> list[SeriesSummary]:
    """The server's image series (QIDO-RS; all studies, or one), `limit` from `offset` in the server's order.
    Segmentations, reports and other non-image series are left out: nothing there can be segmented."""
    client = _client(server)
    found = _calling(server, "listing series", lambda: client.search_for_series(
        study_instance_uid=study_uid, limit=limit, offset=offset, fields=SERIES_FIELDS))
    listed = []
    for item in found:
        uid, study, modality = _value(item, "0020000E"), _value(item, "0020000D"), _value(item, "00080060") or ""
        if not uid or not study or modality.upper() in NON_IMAGE_MODALITIES:
            continue
        listed.append(SeriesSummary(str(uid), str(study), str(modality), str(_value(item, "0008103E") or ""),
                                    _whole(_value(item, "00200011")), _whole(_value(item, "00201209"))))
    return listed


def find_study(server: DicomWebServer, series_uid: str, study_uid: str | None = None) -> str:
    """The study that holds `series_uid` (QIDO-RS), or SeriesNotFound."""
    client = _client(server)
    found = _calling(server, f"searching series {series_uid}", lambda: client.search_for_series(
        study_instance_uid=study_uid, search_filters={"SeriesInstanceUID": series_uid}))
    studies = {item["0020000D"]["Value"][0] for item in found if item.get("0020000D", {}).get("Value")}
    if not studies:
        where = f" in study {study_uid}" if study_uid else ""
        raise SeriesNotFound(f"DICOMweb server {server.shown()} has no series {series_uid}{where}; check the UID")
    return studies.pop()


def retrieve_series(server: DicomWebServer, series_uid: str, folder: str | Path,
                    study_uid: str | None = None) -> Path:
    """Fetch every instance of the series (WADO-RS) into `folder`, one file each; returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = find_study(server, series_uid, study_uid)
    client = _client(server)

    def save_all() -> int:
        count = 0
        for count, dataset in enumerate(client.iter_series(study_uid, series_uid), start=1):
            dataset.save_as(folder / f"{count:06d}.dcm", enforce_file_format=True)
        return count

    if not _calling(server, f"retrieving series {series_uid}", save_all):
        raise SeriesNotFound(f"DICOMweb server {server.shown()} returned no instances of series {series_uid}")
    return folder


def store_instance(server: DicomWebServer, path: str | Path) -> str:
    """Send one DICOM file to the server (STOW-RS); returns its SOP Instance UID."""
    import pydicom

    dataset = pydicom.dcmread(path)
    client = _client(server)
    _calling(server, f"storing {Path(path).name}", lambda: client.store_instances([dataset]))
    return str(dataset.SOPInstanceUID)
