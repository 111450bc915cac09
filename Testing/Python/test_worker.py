"""The background worker as a real subprocess with the random-init MedSAM2: requests, streaming, cancel, faults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from MedSAM2HITLLib.errors import BadInputError, OutOfMemoryError, PropagationCancelled
from MedSAM2HITLLib.process_tree import kill_tree
from MedSAM2HITLLib.protocol import MAGIC, PREFIX, PROTOCOL_VERSION, encode, encode_bytes
from MedSAM2HITLLib.subprocess_transport import SubprocessTransport
from MedSAM2HITLLib.worker_client import WorkerClient, WorkerError

pytestmark = pytest.mark.slow

THREADS = 2
BOX = (16, 16, 47, 47)


def phantom() -> np.ndarray:
    """8 slices of 64x64 MR-like intensities with a bright blob in the middle."""
    z, y, x = np.mgrid[:8, :64, :64]
    blob = ((x - 32) / 14) ** 2 + ((y - 32) / 10) ** 2 + ((z - 4) / 5) ** 2 < 1
    noise = np.random.default_rng(1).normal(0, 20, blob.shape)
    return (200 + 600 * blob + noise).astype(np.int16)


VOLUME = phantom()


@pytest.fixture(scope="module")
def client(random_checkpoint):
    worker = WorkerClient()
    worker.load_model(random_checkpoint, device="cpu", threads=THREADS).wait(180)
    worker.set_volume("phantom", VOLUME).wait(30)
    yield worker
    worker.shutdown()


def worker_pid(client: WorkerClient) -> int:
    return client.status().wait(10)["pid"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # zombies are dead


class Recorder:
    """Transport handler that keeps what a raw worker sends, for requests the client would never make."""

    def __init__(self):
        self.frames, self.exit = [], None

    def on_frame(self, frame):
        self.frames.append(frame)

    def on_exit(self, message):
        self.exit = message


def raw_worker() -> tuple[SubprocessTransport, Recorder]:
    recorder = Recorder()
    transport = SubprocessTransport(recorder)
    transport.start()
    return transport, recorder


def pump_until(transport, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the worker did not answer in time"
        transport.pump(0.1)


# ---- handshake ----


def test_handshake_reports_protocol_version_and_worker_pid(client):
    assert client.worker_info["version"] == PROTOCOL_VERSION
    assert client.worker_info["pid"] == worker_pid(client)
    assert client.state == "ready"


def test_version_mismatch_is_a_clear_error_and_the_worker_keeps_serving():
    transport, recorder = raw_worker()
    try:
        transport.send(encode("hello", 1, {"version": PROTOCOL_VERSION + 1}))
        transport.send(encode("hello", 2, {"version": PROTOCOL_VERSION}))
        pump_until(transport, lambda: len(recorder.frames) == 2)
        mismatch, ok = recorder.frames
        assert (mismatch.type, mismatch.id, mismatch.fields["kind"]) == ("error", 1, "bad_input")
        assert "protocol version mismatch" in mismatch.fields["message"]
        assert f"version {PROTOCOL_VERSION + 1}" in mismatch.fields["message"]
        assert (ok.type, ok.fields["version"]) == ("done", PROTOCOL_VERSION)
    finally:
        transport.close(5)


# ---- requests ----


def test_segment_slice_equals_the_in_process_engine(client, random_checkpoint):
    from MedSAM2HITLLib.engine import Engine

    engine = Engine.load(random_checkpoint, device="cpu", threads=THREADS)
    engine.set_volume(VOLUME, "phantom")
    expected = engine.segment_slice(0, 4, BOX)
    for _ in range(2):  # embedding cache miss, then hit
        mask = client.segment_slice("phantom", 0, 4, BOX).wait(60)
        assert mask.dtype == bool and mask.shape == (64, 64)
        np.testing.assert_array_equal(mask, expected)
    sagittal = client.segment_slice("phantom", 2, 30, (1, 1, 60, 6)).wait(60)
    assert sagittal.shape == (8, 64)
    # New content under a known id: the worker must not answer from the old content's embeddings.
    moved = np.ascontiguousarray(np.roll(VOLUME, 20, axis=2))
    engine.set_volume(moved, "moved")
    expected_moved = engine.segment_slice(0, 4, BOX)
    assert not np.array_equal(expected_moved, expected)
    client.set_volume("swap", VOLUME).wait(30)
    np.testing.assert_array_equal(client.segment_slice("swap", 0, 4, BOX).wait(60), expected)
    client.set_volume("swap", moved).wait(30)
    np.testing.assert_array_equal(client.segment_slice("swap", 0, 4, BOX).wait(60), expected_moved)
    client.forget_volume("swap").wait(10)
    assert set(client.status().wait(10)["volumes"]) == {"phantom"}


def test_worker_that_cannot_start_fails_the_request():
    missing = WorkerClient(lambda handler: SubprocessTransport(handler, command=["/nonexistent/python", "-m", "x"]))
    request = missing.segment_slice("v", 0, 0, BOX)
    assert isinstance(request.error, BadInputError)  # no volume: checked before starting anything
    missing.set_volume("v", VOLUME)
    with pytest.raises(WorkerError, match="could not start the worker"):
        missing.segment_slice("v", 0, 0, BOX).wait(5)
    assert missing.state == "stopped"


def test_bad_request_fails_with_the_engine_message_and_the_worker_keeps_serving(client):
    with pytest.raises(BadInputError, match="outside the volume"):
        client.segment_slice("phantom", 0, 99, BOX).wait(30)
    with pytest.raises(BadInputError, match="unknown volume 'nothing'"):
        client.segment_slice("nothing", 0, 1, BOX).wait(30)
    assert client.status().wait(10)["volumes"]["phantom"] == {"shape": [8, 64, 64], "dtype": "int16"}


def test_propagation_streams_every_slice_in_order(client):
    received, states, statuses = [], [], []

    def on_slice(item):
        received.append(item)
        if len(received) == 1:
            client.status(on_done=statuses.append)  # answered while the propagation runs

    client.on_state_changed = states.append
    try:
        request = client.propagate("phantom", 0, 3, BOX, start=2, end=5, on_slice=on_slice)
        completed = request.wait(120)
    finally:
        client.on_state_changed = None
    assert statuses[0]["running"] == {"type": "propagate", "id": request.id}
    assert [s.index for s in received] == [3, 4, 5, 2]  # key slice, forward, backward
    assert [(s.completed, s.total) for s in received] == [(n, 4) for n in range(1, 5)]
    assert all(s.mask.shape == (64, 64) and s.mask.dtype == bool for s in received)
    assert completed == [3, 4, 5, 2]
    assert states == ["busy", "ready"]


def test_propagation_with_a_mask_prompt(client):
    prompt = np.zeros((64, 64), bool)
    prompt[24:40, 20:44] = True
    assert client.propagate("phantom", 0, 4, prompt, start=3, end=4).wait(120) == [4, 3]


def test_cancel_stops_propagation_cooperatively(client):
    pid = worker_pid(client)
    received, cancel_accepted = [], []

    def on_slice(item):
        received.append(item.index)
        if len(received) == 2:
            cancel_accepted.append(client.cancel())

    client.cancel_grace = 60.0  # on a loaded machine one slice can take longer than the default grace
    try:
        request = client.propagate("phantom", 0, 1, BOX, on_slice=on_slice)
        with pytest.raises(PropagationCancelled) as info:
            request.wait(120)
    finally:
        client.cancel_grace = 5.0
    assert cancel_accepted == [True]
    assert info.value.completed == received and 2 <= len(received) < 8
    client.pump(0.5)
    assert received == info.value.completed  # nothing after the acknowledgement
    assert worker_pid(client) == pid  # stopped by the worker itself, not killed
    assert client.state == "ready"


def test_cancel_kills_a_worker_that_does_not_answer(client):
    """A stopped (hung) worker gets the grace period, then its process tree is killed; the next request recovers."""
    import signal

    if not hasattr(signal, "SIGSTOP"):
        pytest.skip("needs SIGSTOP to hang the worker")
    pid = worker_pid(client)
    client.cancel_grace = 1.0
    received, queued = [], []

    def on_slice(item):
        received.append(item.index)
        if len(received) == 1:
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()  # sending to a worker that reads nothing must not block the caller
            queued.append(client.set_volume("large", np.zeros((64, 512, 512), np.int16)))
            queued.append(time.monotonic() - started)
            client.cancel()

    try:
        with pytest.raises(PropagationCancelled) as info:
            client.propagate("phantom", 0, 2, BOX, on_slice=on_slice).wait(60)
    finally:
        client.cancel_grace = 5.0
        client.forget_volume("large")
    assert info.value.completed == received == [2]
    assert queued[1] < 0.5
    assert isinstance(queued[0].error, WorkerError)
    assert client.state == "stopped"
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert client.segment_slice("phantom", 0, 4, BOX).wait(180).shape == (64, 64)
    assert worker_pid(client) != pid


def test_killed_worker_fails_the_request_within_2_s_and_is_restarted(client):
    pid = worker_pid(client)
    killed_at = []

    def on_slice(item):
        if not killed_at:
            kill_tree(pid)
            killed_at.append(time.monotonic())

    request = client.propagate("phantom", 0, 4, BOX, on_slice=on_slice)
    with pytest.raises(WorkerError) as info:
        request.wait(120)
    assert time.monotonic() - killed_at[0] < 2.0
    message = str(info.value)
    assert "killed by SIGKILL" in message or "exited" in message
    assert f"worker {pid}: propagate" not in message and f"worker {pid}: started" in message  # the stderr tail
    assert client.state == "stopped"
    # The next request starts a new worker and re-sends the model and the volume on its own.
    assert client.segment_slice("phantom", 0, 4, BOX).wait(180).shape == (64, 64)
    assert worker_pid(client) != pid and client.state == "ready"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits another process's memory with prlimit")
def test_out_of_memory_is_reported_and_the_worker_keeps_serving(client):
    """Real allocation failures: the worker's address space is capped at what it uses now."""
    import resource

    pid = worker_pid(client)
    client.segment_slice("phantom", 0, 4, BOX).wait(60)
    in_use = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmSize"))
    resource.prlimit(pid, resource.RLIMIT_AS, (in_use + (2 << 20), resource.RLIM_INFINITY))
    try:
        with pytest.raises(OutOfMemoryError, match="not enough memory to receive a 256 MB set_volume"):
            client.set_volume("large", np.zeros((512, 512, 512), np.int16)).wait(60)
        with pytest.raises(OutOfMemoryError, match="smaller range.*CPU"):
            client.segment_slice("phantom", 0, 6, BOX).wait(60)  # not cached: needs the image encoder
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        client.forget_volume("large")
    assert client.segment_slice("phantom", 0, 6, BOX).wait(60).shape == (64, 64)
    assert worker_pid(client) == pid


# ---- broken input and output ----


def test_malformed_frames_are_answered_then_garbage_stops_the_worker():
    transport, recorder = raw_worker()
    try:
        bad_json = b"{not json"
        transport.send([PREFIX.pack(MAGIC, len(bad_json), 0) + bad_json])
        odd = encode_bytes("set_volume", 7, {"volume_id": "x"}, {"volume": np.zeros((2, 2, 2), np.uint8)})
        transport.send([odd.replace(b'"|u1"', b'"|O8"')])
        transport.send(encode("teleport", 8))
        transport.send(encode("set_volume", 9, {"volume_id": "flat"}, {"volume": np.zeros((4, 4), np.float32)}))
        transport.send(encode("segment_2d", 10, {"volume_id": "x", "axis": 0, "index": 0, "box": [0, 0, 1, 1]}))
        transport.send(encode("status", 11))
        pump_until(transport, lambda: len(recorder.frames) == 6)
        by_id = {f.id: f for f in recorder.frames}
        assert by_id[None].fields["kind"] == "bad_input" and "not valid JSON" in by_id[None].fields["message"]
        assert "unsupported dtype '|O8'" in by_id[7].fields["message"]
        assert "unknown request type 'teleport'" in by_id[8].fields["message"]
        assert "scalar 3D array" in by_id[9].fields["message"]
        assert by_id[10].fields["kind"] == "model"
        assert by_id[10].fields["message"] == "no model is loaded in the worker: load a checkpoint first"
        assert by_id[11].type == "done" and by_id[11].fields["running"] is None
        transport.send([b"GET / HTTP/1.1\r\nHost: worker\r\n\r\n"])
        pump_until(transport, lambda: recorder.exit is not None, timeout=10)
        assert "bad frame magic" in recorder.frames[-1].fields["message"]
        assert "exited with code 2" in recorder.exit
    finally:
        transport.close(5)


def test_truncated_request_stream_is_reported_and_the_worker_exits():
    transport, recorder = raw_worker()
    try:
        frame = encode_bytes("set_volume", 1, {"volume_id": "v"}, {"volume": np.ones((4, 16, 16), np.int16)})
        transport.send([frame[: len(frame) // 2]])
        transport.close_input()
        pump_until(transport, lambda: recorder.exit is not None, timeout=10)
        assert "truncated" in recorder.frames[-1].fields["message"]
        assert "exited with code 2" in recorder.exit
    finally:
        transport.close(5)


def test_unreadable_worker_output_fails_the_request_quickly_and_kills_it():
    script = "import time; print('Traceback (most recent call last):', flush=True); time.sleep(60)"
    created = []

    def factory(handler):
        created.append(SubprocessTransport(handler, command=[sys.executable, "-c", script]))
        return created[-1]

    started = time.monotonic()
    with pytest.raises(WorkerError, match="output is unreadable.*bad frame magic"):
        WorkerClient(factory).status().wait(10)
    assert time.monotonic() - started < 5
    created[0].process.wait(5)


def test_prints_from_model_code_go_to_stderr_not_into_frames(random_checkpoint, tmp_path):
    """An image encoder that prints from Python and writes to fd 1 directly, like C extensions do.

    It is patched in at the worker's start (sitecustomize): configs may name only sam2's own classes.
    """
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os
            from sam2.modeling.backbones.image_encoder import ImageEncoder

            quiet_forward = ImageEncoder.forward

            def noisy_forward(self, sample):
                print("python print from model code", "x" * 200_000)  # more than a pipe buffer
                os.write(1, b"C-level write to fd 1\\n")
                return quiet_forward(self, sample)

            ImageEncoder.forward = noisy_forward
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    worker = WorkerClient(lambda handler: SubprocessTransport(handler, env=env))
    try:
        worker.load_model(random_checkpoint, device="cpu", threads=THREADS).wait(180)
        worker.set_volume("phantom", VOLUME)
        assert worker.segment_slice("phantom", 0, 4, BOX).wait(60).shape == (64, 64)
        assert worker.propagate("phantom", 0, 4, BOX, start=4, end=5).wait(60) == [4, 5]
        deadline = time.monotonic() + 5
        while not any("C-level write" in line for line in worker.stderr_tail) and time.monotonic() < deadline:
            worker.pump(0.1)
        assert any("C-level write to fd 1" in line for line in worker.stderr_tail)
        assert any(line.startswith("python print from model code") for line in worker.stderr_tail)
    finally:
        worker.shutdown()


# ---- process trees ----


def test_kill_tree_reaches_descendants_that_left_the_process_group():
    grandchild = "import time; time.sleep(60)"
    child = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild_pid = int(parent.stdout.readline())
    assert alive(grandchild_pid)
    kill_tree(parent.pid)
    parent.wait(5)
    deadline = time.monotonic() + 5
    while alive(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild_pid)


# ---- running inside Slicer ----


def test_worker_runs_as_a_script_path_like_pythonslicer_starts_it():
    from MedSAM2HITLLib.slicer_transport import WORKER_SCRIPT

    recorder = Recorder()
    transport = SubprocessTransport(recorder, command=[sys.executable, "-I", str(WORKER_SCRIPT)])  # -I: no PYTHONPATH
    transport.start()
    try:
        transport.send(encode("hello", 1, {"version": PROTOCOL_VERSION}))
        pump_until(transport, lambda: recorder.frames or recorder.exit)
        assert recorder.frames[0].type == "done" and recorder.frames[0].fields["version"] == PROTOCOL_VERSION
    finally:
        transport.close(5)


def test_slicer_transport_imports_outside_slicer_and_says_what_it_needs():
    from MedSAM2HITLLib import slicer_transport

    with pytest.raises(ImportError, match="needs 3D Slicer"):
        slicer_transport.slicer_transport_factory()


def test_slicer_transport_hands_a_volume_to_qt_in_bounded_pieces():
    """No joined second copy of the volume: what is alive beside the array is one piece at a time."""
    import tracemalloc

    from MedSAM2HITLLib.slicer_transport import chunks

    volume = np.arange(12 << 20, dtype=np.int16)  # 24 MiB
    header = b"frame header"
    sent = bytearray()
    tracemalloc.start()
    try:
        for piece in chunks([header, memoryview(volume)], size=1 << 20):
            assert len(piece) <= 1 << 20
            sent += piece  # stands for Qt's write buffer, the one copy that has to exist
            del piece
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bytes(sent) == header + volume.tobytes()
    assert peak < len(sent) + (3 << 20), f"peak {peak / 2**20:.1f} MiB for a {len(sent) / 2**20:.1f} MiB volume"
