"""Uploads streamed to disk under a server-made name, capped while they arrive, then checked by MedSAM2HITLLib.

The format comes from the file's own bytes; no client file name ever becomes a path or reaches a log.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.volume_file import VolumeHeader, check_volume_file

SNIFF_BYTES = 352  # a NIfTI-1 header


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


async def stream_to_file(request: Request, path: Path, max_bytes: int) -> int:
    """Write the request body to `path` as it arrives; 413 as soon as it passes `max_bytes`. Returns its size."""
    received = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise HTTPException(413, f"the request body is over the limit of {max_bytes} bytes")
            f.write(chunk)
    return received


async def receive_volume(request: Request, folder: Path, max_bytes: int, max_volume_bytes: int
                         ) -> tuple[str, VolumeHeader]:
    """Stream the request body into `folder` and check it; returns the stored file name and its header.

    The file must hold its voxels itself (a header naming a data file elsewhere is refused), with finite values.
    Any failure removes the folder: nothing of a refused upload stays on disk.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"upload of {int(declared)} bytes is over the limit of {max_bytes} bytes")
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise HTTPException(415, "send the volume file itself as the request body "
                                 "(e.g. curl --data-binary @scan.nii.gz), not as a form")
    folder.mkdir(parents=True)
    upload = folder / "upload"
    try:
        if await stream_to_file(request, upload, max_bytes) == 0:
            raise HTTPException(400, "the upload is empty: send a NIfTI, NRRD or MHA file as the request body")
        with open(upload, "rb") as f:
            head = f.read(SNIFF_BYTES)
        suffix = sniff_suffix(head)
        if suffix == ".nii.gz" and sniff_suffix(await run_in_threadpool(gzip_head, upload)) != ".nii":
            suffix = None
        if suffix is None:
            raise HTTPException(415, "not a NIfTI (.nii/.nii.gz), NRRD or MHA volume; upload one of those")
        name = "volume" + suffix
        upload.rename(folder / name)
        try:
            header = await run_in_threadpool(check_volume_file, folder / name, max_volume_bytes, True)
        except BadInputError as error:
            raise HTTPException(400, str(error)) from None
        return name, header
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
