"""Wire format between the client and the worker: length-prefixed frames of a JSON header plus raw arrays.

A frame is a 16-byte prefix (magic, header length, body length), a UTF-8 JSON header
`{"type", "id", "fields", "payloads": [{"name", "dtype", "shape", "nbytes"}]}` and a body holding the payload
arrays back to back in C order. No pickle: decoding never executes anything, and arrays cross the pipe as their
own bytes. Body length sits in the prefix so a frame whose header is unusable can still be skipped whole.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

import numpy as np

PROTOCOL_VERSION = 2  # 2: propagate carries objects with conditioning slices; segment_2d points and mask
HEARTBEAT_SECONDS = 1.0  # the worker sends a "heartbeat" frame (no id) this often, from a thread of its own
MAGIC = b"MS2H"
PREFIX = struct.Struct("<4sIQ")  # magic, header bytes, body bytes
MAX_HEADER_BYTES = 1 << 20
MAX_BODY_BYTES = 1 << 40
MAX_DIMENSIONS = 8
_DTYPE = re.compile(r"^[<>|](b1|[iu][1248]|f[248])$")  # numbers and booleans only: no objects, strings or records


class ProtocolError(Exception):
    """The byte stream is not a valid frame sequence.

    `recoverable` is True when the broken frame was skipped whole and the next frame can still be read;
    False when framing itself is lost (bad magic, impossible lengths, stream cut short).
    `frame_type` and `frame_id` name the broken frame when its header could be read.
    """

    def __init__(self, message: str, recoverable: bool = False, frame_type: str | None = None, frame_id=None):
        super().__init__(message)
        self.recoverable = recoverable
        self.frame_type = frame_type
        self.frame_id = frame_id


class FrameTooLarge(ProtocolError):
    """A well-formed frame whose body could not be allocated (out of memory); it was skipped."""

    def __init__(self, message: str, frame_type: str | None, frame_id):
        super().__init__(message, recoverable=True, frame_type=frame_type, frame_id=frame_id)


@dataclass
class Frame:
    """One message: its type, the request id it belongs to, JSON fields and named arrays."""

    type: str
    id: int | None = None
    fields: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def wire_dtype(dtype: np.dtype) -> str:
    """The dtype string sent on the wire, or ValueError for dtypes the protocol does not carry."""
    text = np.dtype(dtype).str
    if not _DTYPE.match(text):
        raise ValueError(f"arrays of dtype {np.dtype(dtype)} cannot be sent: use a numeric or bool dtype")
    return text


def encode(
    type: str, id: int | None = None, fields: dict | None = None, arrays: dict[str, np.ndarray] | None = None
) -> list:
    """The frame as buffers: prefix+header bytes, then one memoryview per array (C-ordered arrays are not copied)."""
    payloads, buffers = [], []
    for name, array in (arrays or {}).items():
        array = np.asarray(array, order="C")  # ascontiguousarray would turn a 0-d array into 1-d
        dtype = wire_dtype(array.dtype)
        payloads.append({"name": name, "dtype": dtype, "shape": list(array.shape), "nbytes": array.nbytes})
        buffers.append(memoryview(array).cast("B") if array.nbytes else b"")
    header = json.dumps(
        {"type": type, "id": id, "fields": fields or {}, "payloads": payloads}, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}: send large data as arrays")
    body_bytes = sum(p["nbytes"] for p in payloads)
    return [PREFIX.pack(MAGIC, len(header), body_bytes) + header, *buffers]


def encode_bytes(type: str, id: int | None = None, fields: dict | None = None, arrays=None) -> bytes:
    """The frame as one bytes object (convenient for small frames and tests)."""
    return b"".join(bytes(b) for b in encode(type, id, fields, arrays))


def _parse_header(raw: bytes, body_bytes: int) -> tuple[dict, list[dict]]:
    """Header dict and checked payload descriptions; ProtocolError(recoverable) on anything invalid."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame header is not valid JSON ({exc})", recoverable=True) from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("frame header must be a JSON object with a string 'type'", recoverable=True)
    kind, frame_id = header["type"], header.get("id")

    def bad(message: str) -> ProtocolError:
        return ProtocolError(f"{kind} frame: {message}", recoverable=True, frame_type=kind, frame_id=frame_id)

    if frame_id is not None and (not isinstance(frame_id, int) or isinstance(frame_id, bool)):
        raise bad(f"id must be an integer or null, got {frame_id!r}")
    if not isinstance(header.get("fields", {}), dict):
        raise bad("'fields' must be an object")
    payloads = header.get("payloads", [])
    if not isinstance(payloads, list):
        raise bad("'payloads' must be a list")
    total = 0
    names = set()
    for p in payloads:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or p["name"] in names:
            raise bad(f"payload description {p!r} needs a unique string 'name'")
        names.add(p["name"])
        match = _DTYPE.match(p.get("dtype")) if isinstance(p.get("dtype"), str) else None
        if match is None:
            raise bad(f"payload '{p['name']}' has unsupported dtype {p.get('dtype')!r} (numeric or bool only)")
        shape = p.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMENSIONS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise bad(f"payload '{p['name']}' has invalid shape {shape!r}")
        itemsize = np.dtype(p["dtype"]).itemsize
        expected = itemsize * int(np.prod(shape, dtype=object))
        if p.get("nbytes") != expected:
            raise bad(f"payload '{p['name']}' declares {p.get('nbytes')!r} bytes, {p['dtype']} {shape} has {expected}")
        total += expected
    if total != body_bytes:
        raise bad(f"payloads add up to {total} bytes but the frame body has {body_bytes}")
    return header, payloads


class FrameReader:
    """Incremental decoder: feed() any chunks of the stream, then next_frame() until it returns None.

    Works the same for a blocking pipe reader and for Qt's readyRead. The body of each frame is allocated once
    and filled in place, so large arrays are copied only from the chunk into their final buffer.
    After a recoverable ProtocolError reading can continue; after any other, every call raises again.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()  # bytes not yet assigned to a frame body
        self._header: dict | None = None
        self._payloads: list[dict] = []
        self._body: bytearray | None = None
        self._body_filled = 0
        self._skip = 0  # body bytes of a rejected frame still to discard
        self._broken: ProtocolError | None = None

    @property
    def idle(self) -> bool:
        """True when no partial frame is pending (the stream may end here without truncation)."""
        return not self._buffer and self._header is None and self._skip == 0 and self._broken is None

    def feed(self, data) -> None:
        if self._broken is not None:
            return
        data = memoryview(data).cast("B")
        if self._skip:
            used = min(self._skip, len(data))
            self._skip -= used
            data = data[used:]
        if self._body is not None:
            used = min(len(self._body) - self._body_filled, len(data))
            self._body[self._body_filled : self._body_filled + used] = data[:used]
            self._body_filled += used
            data = data[used:]
        if len(data):
            self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, None when more bytes are needed, or ProtocolError."""
        if self._broken is not None:
            raise self._broken
        if self._header is None:
            if self._skip:
                return None
            if len(self._buffer) < PREFIX.size:
                return None
            magic, header_bytes, body_bytes = PREFIX.unpack_from(self._buffer)
            if magic != MAGIC:
                raise self._break(
                    f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r}): this is not a MedSAM2HITL protocol stream"
                )
            if header_bytes > MAX_HEADER_BYTES or body_bytes > MAX_BODY_BYTES:
                raise self._break(f"frame header of {header_bytes} bytes or body of {body_bytes} bytes is too large")
            if len(self._buffer) < PREFIX.size + header_bytes:
                return None
            raw = bytes(self._buffer[PREFIX.size : PREFIX.size + header_bytes])
            del self._buffer[: PREFIX.size + header_bytes]
            try:
                header, payloads = _parse_header(raw, body_bytes)
            except ProtocolError:
                self._discard(body_bytes)
                raise
            try:
                body = bytearray(body_bytes)
            except MemoryError:
                self._discard(body_bytes)
                raise FrameTooLarge(
                    f"not enough memory to receive a {body_bytes / 2**20:.0f} MB {header['type']} frame",
                    header["type"],
                    header.get("id"),
                ) from None
            self._header, self._payloads, self._body, self._body_filled = header, payloads, body, 0
            self.feed(self._take_buffer())
        if self._body_filled < len(self._body):
            return None
        return self._finish()

    def close(self) -> None:
        """The stream ended: ProtocolError if it stopped inside a frame."""
        if self._broken is None and not self.idle:
            raise self._break("the stream ended in the middle of a frame (truncated)")

    def _take_buffer(self) -> bytearray:
        data, self._buffer = self._buffer, bytearray()
        return data

    def _discard(self, body_bytes: int) -> None:
        """Skip a rejected frame's body, part of which may already be buffered."""
        self._skip = body_bytes
        self.feed(self._take_buffer())

    def _finish(self) -> Frame:
        header, body = self._header, self._body
        arrays, offset = {}, 0
        for p in self._payloads:
            count = int(np.prod(p["shape"], dtype=np.int64))
            arrays[p["name"]] = np.frombuffer(body, p["dtype"], count, offset).reshape(p["shape"])
            offset += p["nbytes"]
        self._header, self._payloads, self._body, self._body_filled = None, [], None, 0
        return Frame(header["type"], header.get("id"), header.get("fields", {}), arrays)

    def _break(self, message: str) -> ProtocolError:
        self._broken = ProtocolError(message, recoverable=False)
        return self._broken
