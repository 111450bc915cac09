"""Frame encoding and the incremental reader: round trips, chunking, and every kind of broken input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from MedSAM2HITLLib.protocol import (
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX,
    FrameReader,
    ProtocolError,
    encode,
    encode_bytes,
)

pytestmark = pytest.mark.unit


def read_all(data: bytes, chunk: int | None = None) -> list:
    reader = FrameReader()
    frames = []
    step = chunk or len(data) or 1
    for offset in range(0, len(data), step):
        reader.feed(data[offset : offset + step])
        while (frame := reader.next_frame()) is not None:
            frames.append(frame)
    reader.close()
    return frames


def raw_frame(header: dict, body: bytes = b"") -> bytes:
    """A frame built by hand, to send what encode() would refuse to produce."""
    text = json.dumps(header).encode()
    return PREFIX.pack(MAGIC, len(text), len(body)) + text + body


ARRAYS = {
    "volume": np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 7,
    "mask": np.eye(5, dtype=bool),
    "strided": np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::3],  # not C-contiguous
    "big_endian": np.arange(6, dtype=">u4").reshape(2, 3),
    "empty": np.zeros((0, 4), np.float64),
    "scalar": np.array(3.5, np.float16),
}


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_round_trip_any_chunking(chunk):
    stream = encode_bytes("set_volume", 12, {"volume_id": "ct", "spacing": [1.0, 0.5]}, ARRAYS)
    stream += encode_bytes("status", 13)
    first, second = read_all(stream, chunk)
    assert (first.type, first.id, first.fields) == ("set_volume", 12, {"volume_id": "ct", "spacing": [1.0, 0.5]})
    assert list(first.arrays) == list(ARRAYS)
    for name, array in ARRAYS.items():
        assert first.arrays[name].dtype == array.dtype and first.arrays[name].shape == array.shape
        np.testing.assert_array_equal(first.arrays[name], array)
    assert (second.type, second.id, second.fields, second.arrays) == ("status", 13, {}, {})


def test_encode_does_not_copy_contiguous_arrays():
    volume = np.zeros((4, 8, 8), np.int16)
    buffers = encode("set_volume", 1, {}, {"volume": volume})
    assert np.shares_memory(np.frombuffer(buffers[1], np.int16), volume)


def test_decoded_arrays_are_writable_and_independent_of_the_stream():
    stream = bytearray(encode_bytes("mask", 1, arrays={"mask": np.zeros((3, 3), bool)}))
    (frame,) = read_all(bytes(stream))
    frame.arrays["mask"][0, 0] = True  # a caller may edit what it received
    assert frame.arrays["mask"].sum() == 1


@pytest.mark.parametrize("dtype", [object, np.complex64, "U4", [("a", "i4")]])
def test_encode_refuses_non_numeric_arrays(dtype):
    with pytest.raises(ValueError, match="numeric or bool"):
        encode("x", 1, arrays={"a": np.zeros(2, dtype=dtype)})


def test_bad_magic_breaks_the_stream_for_good():
    reader = FrameReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n" + encode_bytes("status", 1))
    with pytest.raises(ProtocolError, match="bad frame magic") as info:
        reader.next_frame()
    assert not info.value.recoverable
    with pytest.raises(ProtocolError, match="bad frame magic"):
        reader.next_frame()


def test_oversized_header_is_rejected_before_reading_it():
    reader = FrameReader()
    reader.feed(PREFIX.pack(MAGIC, MAX_HEADER_BYTES + 1, 0))
    with pytest.raises(ProtocolError, match="too large") as info:
        reader.next_frame()
    assert not info.value.recoverable


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"name": "a", "dtype": "|O", "shape": [2], "nbytes": 16}, "unsupported dtype"),
        ({"name": "a", "dtype": "<c8", "shape": [2], "nbytes": 16}, "unsupported dtype"),
        ({"name": "a", "dtype": "<i3", "shape": [2], "nbytes": 6}, "unsupported dtype"),
        ({"name": "a", "dtype": "<f8", "shape": [3], "nbytes": 16}, "has 24"),
        ({"name": "a", "dtype": "<f8", "shape": [-2, -1], "nbytes": 16}, "invalid shape"),
        ({"name": "a", "dtype": "<f8", "shape": "2", "nbytes": 16}, "invalid shape"),
    ],
)
def test_invalid_payload_description_skips_that_frame_only(payload, message):
    broken = raw_frame({"type": "set_volume", "id": 5, "fields": {}, "payloads": [payload]}, bytes(16))
    reader = FrameReader()
    reader.feed(broken + encode_bytes("status", 6))
    with pytest.raises(ProtocolError, match=message) as info:
        reader.next_frame()
    assert info.value.recoverable and (info.value.frame_type, info.value.frame_id) == ("set_volume", 5)
    frame = reader.next_frame()
    assert (frame.type, frame.id) == ("status", 6)
    reader.close()


def test_payloads_must_fill_the_body_exactly_even_when_fed_byte_by_byte():
    header = {"type": "x", "id": 1, "payloads": [{"name": "a", "dtype": "|u1", "shape": [4], "nbytes": 4}]}
    stream = raw_frame(header, bytes(6)) + encode_bytes("ok", 2, arrays={"a": np.arange(3)})
    reader = FrameReader()
    errors, frames = [], []
    for offset in range(len(stream)):
        reader.feed(stream[offset : offset + 1])
        try:
            frame = reader.next_frame()
        except ProtocolError as exc:
            errors.append(str(exc))
            continue
        if frame is not None:
            frames.append(frame)
    assert len(errors) == 1 and "add up to 4 bytes but the frame body has 6" in errors[0]
    assert [f.id for f in frames] == [2] and frames[0].arrays["a"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("text", [b"{not json", b"[1, 2]", b'{"id": 1}', b"\xff\xfe", b'{"type": "x", "id": "1"}'])
def test_unusable_header_skips_that_frame_only(text):
    reader = FrameReader()
    reader.feed(PREFIX.pack(MAGIC, len(text), 3) + text + b"abc" + encode_bytes("status", 9))
    with pytest.raises(ProtocolError) as info:
        reader.next_frame()
    assert info.value.recoverable
    assert reader.next_frame().id == 9


@pytest.mark.parametrize("cut", [3, PREFIX.size + 2, -1])
def test_truncated_stream_is_reported_at_close(cut):
    data = encode_bytes("mask", 1, arrays={"mask": np.ones((8, 8), bool)})
    reader = FrameReader()
    reader.feed(data[:cut])
    assert reader.next_frame() is None
    assert not reader.idle
    with pytest.raises(ProtocolError, match="truncated"):
        reader.close()


def test_stream_ending_between_frames_is_clean():
    reader = FrameReader()
    reader.feed(encode_bytes("status", 1))
    assert reader.next_frame().type == "status"
    assert reader.idle
    reader.close()


def test_prefix_layout_is_fixed():
    """The prefix is part of the protocol: magic, little-endian u32 header length, u64 body length."""
    data = encode_bytes("t", 1, arrays={"a": np.zeros(3, np.uint8)})
    magic, header_bytes, body_bytes = struct.unpack_from("<4sIQ", data)
    assert (magic, body_bytes) == (b"MS2H", 3)
    payloads = json.loads(data[16 : 16 + header_bytes])["payloads"]
    assert payloads == [{"name": "a", "dtype": "|u1", "shape": [3], "nbytes": 3}]
