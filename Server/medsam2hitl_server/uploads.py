"""Uploads streamed to disk under a server-made name, capped while they arrive, then checked by MedSAM2HITLLib.

The format comes from the file's own bytes; no client file name ever becomes a path or reaches a log.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.volume_file import VolumeHeader, check_volume_file

from .errors import IncompleteRequest, InvalidRequest, NotAVolume, TooLarge, UploadStalled

log = logging.getLogger("medsam2hitl_server.api")
SNIFF_BYTES = 352  # a NIfTI-1 header
FORM_FIELD = "file"
FORM_OVERHEAD_BYTES = 64 << 10  # boundaries, part headers and small fields around the file of a form upload


def sniff_suffix(head: bytes) -> str | None:
    """The file suffix that the leading bytes of an upload show (NIfTI, gzipped NIfTI, NRRD, MetaImage)."""
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if head[:4] == b"NRRD":
        return ".nrrd"
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] == b"n+2\0":
        return ".nii"
    text = head[:64].lstrip().lower()
    if text.startswith((b"objecttype", b"ndims", b"comment")):
        return ".mha"
    return None


def gzip_head(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except (OSError, EOFError):
        return b""


class FormFile:
    """The `file` field of a multipart/form-data body, written to `out` while the body streams through the parser.

    Other fields are skipped unread; the part's file name is never used.
    """

    def __init__(self, out: BinaryIO, content_type: str, max_bytes: int):
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if not boundary:
            raise InvalidRequest("the multipart/form-data body has no boundary in its Content-Type")
        self.out, self.max_bytes = out, max_bytes
        self.files = self.size = 0
        self.header, self.disposition, self.in_file, self.ended = b"", b"", False, False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data,
            "on_part_end": self._end, "on_end": self._form_end})

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as error:
            raise InvalidRequest(f"the multipart/form-data body is malformed: {error}") from None

    def finish(self) -> None:
        if not self.ended:
            raise InvalidRequest("the multipart/form-data body ended before its closing boundary; send it again")
        if self.files == 0:
            raise IncompleteRequest(f"the form has no '{FORM_FIELD}' field: send the volume as "
                                     f"{FORM_FIELD}=@scan.nii.gz (curl -F) or as the raw request body")

    def _begin(self) -> None:
        self.header, self.disposition, self.in_file = b"", b"", False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end].lower()
        if len(self.header) > 256:
            raise InvalidRequest("a form part has a header name over 256 bytes")

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        if self.header == b"content-disposition":
            self.disposition += data[start:end]
            if len(self.disposition) > 4096:
                raise InvalidRequest("a form part's Content-Disposition header is over 4096 bytes")

    def _header_end(self) -> None:
        self.header = b""

    def _headers_finished(self) -> None:
        if parse_options_header(self.disposition)[1].get(b"name") == FORM_FIELD.encode():
            self.files += 1
            if self.files > 1:
                raise InvalidRequest(f"the form has more than one '{FORM_FIELD}' field; send one volume")
            self.in_file = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.size += end - start
            if self.size > self.max_bytes:
                raise TooLarge(f"the file is over the limit of {self.max_bytes} bytes")
            self.out.write(data[start:end])

    def _end(self) -> None:
        self.in_file = False

    def _form_end(self) -> None:
        self.ended = True


async def body_chunks(request: Request, idle_seconds: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; 408 (and the connection closed) when no byte comes for `idle_seconds`."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), idle_seconds)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadStalled(f"the upload stalled: no data for {idle_seconds:g} s; send it again") from None
        yield chunk


async def stream_to_file(request: Request, path: Path, max_bytes: int, idle_seconds: float,
                         form: bool = False) -> int:
    """Write the request body (or, with `form`, its multipart `file` field) to `path` as it arrives.

    413 as soon as it passes `max_bytes`; a client that goes away is one log line and a 400 nobody reads.
    Returns the size of the file written.
    """
    received = 0
    limit = max_bytes + FORM_OVERHEAD_BYTES if form else max_bytes
    with open(path, "wb") as f:
        sink = FormFile(f, request.headers.get("content-type", ""), max_bytes) if form else f
        try:
            async for chunk in body_chunks(request, idle_seconds):
                received += len(chunk)
                if received > limit:
                    raise TooLarge(f"the request body is over the limit of {limit} bytes")
                sink.write(chunk)
        except ClientDisconnect:
            log.warning("upload abandoned: the client disconnected after %d bytes", received)
            raise InvalidRequest("the client disconnected during the upload") from None
        if isinstance(sink, FormFile):
            sink.finish()
        return f.tell()


async def receive_volume(request: Request, folder: Path, max_bytes: int, max_volume_bytes: int,
                         idle_seconds: float) -> tuple[str, VolumeHeader]:
    """Stream the upload (the raw body, or a form's `file` field) into `folder` and check it; returns the stored
    file name and its header.

    The file must hold its voxels itself (a header naming a data file elsewhere is refused), with finite values.
    Any failure removes the folder: nothing of a refused upload stays on disk.
    """
    content_type = request.headers.get("content-type", "").lower()
    form = content_type.startswith("multipart/form-data")
    if content_type.startswith("multipart/") and not form:
        raise NotAVolume("send the volume as multipart/form-data with a 'file' field (curl -F "
                                 "file=@scan.nii.gz) or as the raw request body (curl --data-binary @scan.nii.gz)")
    limit = max_bytes + FORM_OVERHEAD_BYTES if form else max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"upload of {int(declared)} bytes is over the limit of {max_bytes} bytes")
    folder.mkdir(parents=True)
    upload = folder / "upload"
    try:
        if await stream_to_file(request, upload, max_bytes, idle_seconds, form) == 0:
            raise InvalidRequest("the upload is empty: send a NIfTI, NRRD or MHA file as the request body "
                                     "or as the form's 'file' field")
        with open(upload, "rb") as f:
            head = f.read(SNIFF_BYTES)
        suffix = sniff_suffix(head)
        if suffix == ".nii.gz" and sniff_suffix(await run_in_threadpool(gzip_head, upload)) != ".nii":
            suffix = None
        if suffix is None:
            raise NotAVolume("not a NIfTI (.nii/.nii.gz), NRRD or MHA volume; upload one of those")
        name = "volume" + suffix
        upload.rename(folder / name)
        try:
            header = await run_in_threadpool(check_volume_file, folder / name, max_volume_bytes, True)
        except BadInputError as error:
            raise InvalidRequest(str(error)) from None
        return name, header
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
