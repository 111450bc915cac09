"""Checks of a volume file before any reader allocates its voxels: header, size, data integrity.

Readers trust the header: a 78-byte .nii.gz that claims 2000³ int16 makes them allocate 16 GB, and ITK's NIfTI
reader fills what a truncated .nii.gz lacks with zeros, silently. So the header is read alone (SimpleITK's
`ReadImageInformation`), its size is held against a limit and against free memory, and compressed data are
inflated once in CHUNK pieces, which verifies their checksum and length, before the real read.
"""

from __future__ import annotations

import ctypes
import gzip
import itertools
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError

DEFAULT_MAX_VOLUME_BYTES = 4 * 2**30  # eight 512 x 512 x 1000 int16 CTs; callers such as a server pass less
MAX_VOLUME_BYTES_ENV = "MEDSAM2HITL_MAX_VOLUME_BYTES"
CHUNK = 1 << 20
IMAGE_IOS = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
             ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}
VOLUME_SUFFIXES = tuple(IMAGE_IOS)
# sizeof_hdr → (dim type, dim offset, bitpix offset, vox_offset type, vox_offset offset)
_NIFTI_LAYOUTS = {348: ("h", 40, 72, "f", 108), 540: ("q", 16, 14, "q", 168)}
_NIFTI_HEADER_BYTES = max(_NIFTI_LAYOUTS)
_REDO = "copy or export the file again"


@dataclass(frozen=True)
class VolumeHeader:
    """What the header promises, as the reader will hold it in memory (ITK reads scaled NIfTI data as float32)."""

    shape_ijk: tuple[int, int, int]
    dtype: str
    components: int
    nbytes: int  # voxels * bytes per voxel * components


def max_volume_bytes() -> int:
    """The size limit for volumes: MEDSAM2HITL_MAX_VOLUME_BYTES when set, else DEFAULT_MAX_VOLUME_BYTES."""
    value = os.environ.get(MAX_VOLUME_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_VOLUME_BYTES
    if not value.isdigit() or int(value) == 0:
        raise BadInputError(f"{MAX_VOLUME_BYTES_ENV}={value!r} is not a positive whole number of bytes; fix or "
                            "unset it")
    return int(value)


def check_volume_file(path: str | Path, max_bytes: int | None = None, self_contained: bool = False) -> VolumeHeader:
    """The header of a NIfTI, NRRD or MetaImage file, once it is safe to hand the file to a reader.

    Raises BadInputError for an unsupported suffix, a file that is not an image, one that is not a scalar 3D
    volume, one larger than `max_bytes` (default `max_volume_bytes()`) or than free memory, truncated or corrupt
    data, data beyond the header's extent in a .nii.gz, and NaN or infinite voxels. NRRD needs no integrity pass:
    its reader already refuses truncated and corrupt data. With `self_contained` (the service: files that arrived
    over the network), a header that names a detached data file is refused as well (`check_self_contained`).
    """
    path = Path(path)
    image_io = next((io for suffix, io in IMAGE_IOS.items() if path.name.lower().endswith(suffix)), None)
    if image_io is None:
        raise BadInputError(f"'{path.name}' is not a supported volume file; use one of {', '.join(VOLUME_SUFFIXES)} "
                            "or a folder with one DICOM series")
    if not path.is_file():
        raise BadInputError(f"volume '{path}' is not a file; check the path")
    what = f"volume '{path.name}'"
    if self_contained:
        check_self_contained(path)
    if image_io == "NiftiImageIO":  # ITK reads no NIfTI-2, and not every NIfTI-1 as nibabel does (nifti_volume)
        header = _nifti_header(path, what)
    else:
        reader = _read_header(path, image_io, what)
        header = volume_header(reader.GetSize(), _sitk_dtype(reader.GetPixelID()), reader.GetNumberOfComponents(),
                                what)
    check_size(header, max_bytes, what)
    if image_io == "NiftiImageIO":
        _check_nifti_data(path, what)
    elif image_io == "MetaImageIO":
        _check_metaimage_data(path, header.nbytes, what)
    if header.dtype.startswith("float"):
        check_finite(path, header.dtype)
    return header


def check_self_contained(path: str | Path) -> None:
    """Refuse a header that names another file for its data: NRRD `data file` (or `datafile`, LIST, a pattern),
    MetaImage `ElementDataFile` other than LOCAL, a NIfTI header of a .hdr/.img pair.

    Readers follow such names wherever they point (`/etc/passwd`, `../../x`), so a server must not hand them a file
    that arrived over the network. Only the header is read.
    """
    path = Path(path)
    with path.open("rb") as file:
        head = file.read(_NIFTI_HEADER_BYTES)
    if head.startswith(b"\x1f\x8b"):
        with gzip.open(path, "rb") as stream:
            try:
                head = stream.read(_NIFTI_HEADER_BYTES)
            except (OSError, EOFError, zlib.error):
                return  # not a gzip stream the NIfTI reader could follow either; the data pass reports it
    name = path.name.lower()
    detached = None
    if head[:4] == b"NRRD" or name.endswith((".nrrd", ".nhdr")):
        fields = _text_header(path, lambda line: not line.strip(), ":")
        detached = next((f"'{key}: {value}'" for key, value in fields.items()
                         if key.replace(" ", "").lower() == "datafile"), None)
    elif head[344:348] == b"ni1\0" or head[4:8] == b"ni2\0":
        detached = "a NIfTI header whose voxels are in a separate .img file"
    elif name.endswith((".mha", ".mhd")) or head[:64].lstrip().lower().startswith((b"objecttype", b"ndims")):
        fields = _text_header(path, lambda line: line.split("=")[0].strip().lower() == "elementdatafile", "=")
        data_file = next((value for key, value in fields.items() if key.lower() == "elementdatafile"), "LOCAL")
        if data_file.upper() != "LOCAL":
            detached = f"'ElementDataFile = {data_file}'"
    if detached:
        raise BadInputError(f"volume '{path.name}' names a detached data file ({detached}); send a single "
                            "self-contained file instead (.nii, .nii.gz, .nrrd or .mha with its voxels inside)")


def _text_header(path: Path, ends, separator: str) -> dict[str, str]:
    """The `key<separator>value` fields of a NRRD or MetaImage text header, up to the line where `ends(line)`
    (that line included), at most 1 MB."""
    fields: dict[str, str] = {}
    with path.open("rb") as file:
        for _ in range(CHUNK // 64):
            line = file.readline(4096).decode("latin-1")
            if not line:
                break
            key, _, value = line.partition(separator)
            fields.setdefault(key.strip(), value.strip())
            if ends(line):
                break
    return fields


def check_finite(path: str | Path, dtype: str) -> None:
    """Refuse a float volume with NaN or infinite voxels, counted with numpy over the voxels themselves.

    ITK's NIfTI reader turns NaN and infinity into 0, so a NIfTI file's data are read here from its own bytes;
    ITK's NRRD and MetaImage readers keep them, so those are read with SimpleITK.
    """
    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        bad = _nifti_non_finite(path)
    else:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))  # kept referenced: the array view reads its buffer
        voxels = sitk.GetArrayViewFromImage(image)
        bad = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
    if bad:
        raise BadInputError(f"volume '{path.name}' has {bad:,} {dtype} voxel(s) that are NaN or infinite; replace "
                            "them (e.g. by the background value) and load it again")


def _nifti_non_finite(path: Path) -> int:
    """NaN or infinite voxels of a NIfTI file's float data (0 for other data types), read CHUNK at a time."""
    with path.open("rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
    chunks = _gzip_chunks(path) if gzipped else _file_chunks(path)
    head = next(chunks)
    order, (_, _, _, offset_type, offset_at) = _nifti_layout(head)
    extent = _nifti_extent(head)
    datatype = struct.unpack_from(order + "h", head, 70 if offset_type == "f" else 12)[0]
    dtype = {16: "f4", 64: "f8"}.get(datatype)
    if dtype is None:
        return 0
    dtype = np.dtype(order + dtype)
    skip = int(struct.unpack_from(order + offset_type, head, offset_at)[0])
    bad, pending, seen = 0, b"", 0
    for chunk in itertools.chain([head], chunks):
        if seen >= extent:
            break
        chunk = chunk[: extent - seen]
        seen += len(chunk)
        pending += chunk
        if skip:
            used = min(skip, len(pending))
            pending, skip = pending[used:], skip - used
        whole = len(pending) - len(pending) % dtype.itemsize
        values = np.frombuffer(pending[:whole], dtype)
        bad += values.size - int(np.count_nonzero(np.isfinite(values)))
        pending = pending[whole:]
    return bad


def _file_chunks(path: Path):
    """A file's bytes, CHUNK at a time; the first chunk is a whole NIfTI header."""
    with path.open("rb") as file:
        yield file.read(_NIFTI_HEADER_BYTES)
        while chunk := file.read(CHUNK):
            yield chunk


def available_memory_bytes() -> int | None:
    """Memory free for a new volume now, or None where the system does not say.

    psutil when installed; else Linux's MemAvailable, Windows' GlobalMemoryStatusEx, or the physical memory size
    (macOS compresses and swaps idle pages rather than freeing them, so its free count says little).
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    if sys.platform == "win32":
        return _windows_available_memory()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _windows_available_memory() -> int | None:
    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong)] + [
            (name, ctypes.c_ulonglong) for name in ("total", "available", "page_total", "page_available",
                                                    "virtual_total", "virtual_available", "extended_available")
        ]

    status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
    return int(status.available) if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)) else None


def _read_header(path: Path, image_io: str, what: str):
    """A SimpleITK reader holding `path`'s header only; the IO is chosen by suffix, since ITK would otherwise read a
    PNG renamed .nii.gz as a 2D image."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(image_io)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise BadInputError(f"could not read {what}: it is not a valid image file") from None
    return reader


def _nifti_header(path: Path, what: str) -> VolumeHeader:
    """A NIfTI-1 or NIfTI-2 header as `read_nifti` will hold it: scaled data as float32, trailing single time points
    dropped."""
    from .nifti_volume import nifti_errors, open_nifti

    try:
        image = open_nifti(path)
    except nifti_errors():
        raise BadInputError(f"could not read {what}: it is not a valid image file") from None
    dtype = image.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise BadInputError(f"{what} holds {dtype} voxels; a single-channel (scalar) volume is needed")
    size = list(image.shape)
    while len(size) > 3 and size[-1] == 1:
        size.pop()
    scaled = image.dataobj.slope != 1 or image.dataobj.inter != 0
    return volume_header(size, np.dtype(np.float32) if scaled else dtype, 1, what)


def _sitk_dtype(pixel_id: int) -> np.dtype:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_id, 1)).dtype


def volume_header(size, dtype: np.dtype, components: int, what: str) -> VolumeHeader:
    """The header of a scalar 3D volume; BadInputError for any other image."""
    size = tuple(int(n) for n in size)
    if len(size) != 3:
        raise BadInputError(f"{what} is {len(size)}D ({' x '.join(map(str, size))}); a single 3D volume is needed")
    if components != 1:
        raise BadInputError(
            f"{what} has {components} components per voxel; a single-channel (scalar) volume is needed"
        )
    dtype = np.dtype(dtype).newbyteorder("=")
    return VolumeHeader(size, dtype.name, components, math.prod(size) * dtype.itemsize * components)


def check_size(header: VolumeHeader, max_bytes: int | None, what: str) -> None:
    """Refuse a volume larger than the limit or than free memory, before anything allocates it."""
    limit = max_volume_bytes() if max_bytes is None else max_bytes
    described = f"{what} is {' x '.join(map(str, header.shape_ijk))} {header.dtype}, {_size(header.nbytes)}"
    if header.nbytes > limit:
        advice = (f"if the header is right, set {MAX_VOLUME_BYTES_ENV} to a larger number of bytes" if max_bytes is None
                  else "the caller's max_bytes sets it")
        raise BadInputError(f"{described}: over the {_size(limit)} limit; {advice}")
    available = available_memory_bytes()
    if available is not None and header.nbytes > available:
        raise BadInputError(f"{described}: more than the {_size(available)} of memory available now; close other "
                            "programs or use a machine with more memory")


def _check_nifti_data(path: Path, what: str) -> None:
    """ITK zero-fills what a NIfTI file lacks: inflate gzip data up to the header's extent (and one byte more, to
    refuse trailing data: a valid volume followed by gigabytes of zeros is a bomb), verifying what is read, then
    compare the size with what the header needs. gzip is told by its magic number, as ITK's reader does."""
    with path.open("rb") as file:
        head, size = file.read(_NIFTI_HEADER_BYTES), path.stat().st_size
    if head.startswith(b"\x1f\x8b"):
        chunks = _gzip_chunks(path)
        head = _inflate(chunks, what, 0)[1]
        needed = _nifti_extent(head)
        size = len(head) + _inflate(chunks, what, needed - len(head))[0]
        if size > needed:
            raise BadInputError(f"{what} holds data beyond the {needed:,} bytes its header describes; {_REDO} "
                                "without trailing data")
    _check_length(size, _nifti_extent(head), what)


def _nifti_layout(header: bytes) -> tuple[str, tuple]:
    """Byte order and field layout (`_NIFTI_LAYOUTS`) of a NIfTI-1 or NIfTI-2 header that ITK has read."""
    order = "<" if struct.unpack_from("<i", header)[0] in _NIFTI_LAYOUTS else ">"
    return order, _NIFTI_LAYOUTS[struct.unpack_from(order + "i", header)[0]]


def _nifti_extent(header: bytes) -> int:
    """Bytes a NIfTI-1 or NIfTI-2 file holds: the data's offset plus voxels times bits per voxel."""
    order, (dim_type, dim_at, bitpix_at, offset_type, offset_at) = _nifti_layout(header)
    dims = struct.unpack_from(f"{order}8{dim_type}", header, dim_at)
    bitpix = struct.unpack_from(order + "h", header, bitpix_at)[0]
    offset = struct.unpack_from(order + offset_type, header, offset_at)[0]
    return int(offset) + math.prod(dims[1 : dims[0] + 1]) * bitpix // 8


def _check_metaimage_data(path: Path, nbytes: int, what: str) -> None:
    """ITK inflates a MetaImage's compressed data without checking them (a corrupt file loads as wrong voxels):
    inflate them here, Adler-32 checksum included. Raw data need no pass: ITK refuses short ones itself."""
    fields = {}
    with path.open("rb") as file:
        while "ElementDataFile" not in fields and (line := file.readline(4096)):  # the header's last field
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
        offset = file.tell()
    data_file = fields.get("ElementDataFile", "")
    if fields.get("CompressedData", "").lower() != "true" or data_file.upper() == "LIST":
        return
    if data_file.upper() != "LOCAL":
        path, offset = path.parent / data_file, 0
        if not path.is_file():  # a file pattern, or a missing file that the reader reports
            return
    size = _inflate(_zlib_chunks(path, offset), what, nbytes)[0]
    if size > nbytes:
        raise BadInputError(f"{what} holds compressed data beyond the {nbytes:,} bytes its header describes; {_REDO}")
    _check_length(size, nbytes, what)


def _gzip_chunks(path: Path):
    """A gzip file's data, inflated; the first chunk is a whole NIfTI header."""
    with gzip.open(path) as stream:
        yield stream.read(_NIFTI_HEADER_BYTES)
        while chunk := stream.read(CHUNK):
            yield chunk


def _zlib_chunks(path: Path, offset: int):
    """The zlib stream from `offset`, inflated at most CHUNK at a time; EOFError where it ends early."""
    inflater = zlib.decompressobj()
    with path.open("rb") as file:
        file.seek(offset)
        while not inflater.eof:
            data = inflater.unconsumed_tail or file.read(CHUNK)
            inflated = inflater.decompress(data, CHUNK)
            if not data and not inflated:
                raise EOFError
            yield inflated


def _inflate(chunks, what: str, limit: int) -> tuple[int, bytes]:
    """Size and first chunk of inflated data, read until they end or pass `limit` bytes (then the size is over
    it); reading to their end verifies the stream's checksum and length."""
    size, first = 0, None
    try:
        for chunk in chunks:
            first = chunk if first is None else first
            size += len(chunk)
            if size > limit:
                break
    except EOFError:
        raise BadInputError(f"{what} is truncated: its compressed data end early; {_REDO}") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise BadInputError(f"{what} has corrupt compressed data ({error}); {_REDO}") from None
    return size, first or b""


def _check_length(size: int, needed: int, what: str) -> None:
    if size < needed:
        raise BadInputError(f"{what} is truncated: it holds {size:,} of the {needed:,} bytes its header needs; {_REDO}")


def _size(nbytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"
