"""No stuck or orphaned worker: heartbeats, a worker that outlives no client, a CLI that takes its worker down.

Real worker processes with the project's fixture model; the worker is stopped with SIGSTOP and clients are killed
with SIGKILL, so these tests need POSIX signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA
from test_cli import _env
from test_worker import alive

from MedSAM2HITLLib.errors import ModelError
from MedSAM2HITLLib.process_tree import descendants, kill_tree
from MedSAM2HITLLib.worker_client import WorkerClient, WorkerError

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals (SIGSTOP, SIGKILL)")]

PHANTOM = DATA / "phantom_sam2.pt"
HEARTBEAT_TIMEOUT = 3.0  # the worker beats every second
BOX = (16, 16, 47, 47)


def blob(slices: int) -> np.ndarray:
    """`slices` slices of 64x64 with a bright ellipsoid through most of them."""
    z, y, x = np.mgrid[:slices, :64, :64]
    inside = ((x - 32) / 14) ** 2 + ((y - 32) / 10) ** 2 + ((z - slices / 2) / (slices / 2.5)) ** 2 < 1
    return (200 + 600 * inside).astype(np.int16)


VOLUME = blob(60)


@pytest.fixture(scope="module")
def client():
    """A worker with the fixture model, watched with a short timeout from the start: loading the model (seconds of
    imports on the worker's main thread) must not silence its heartbeat."""
    worker = WorkerClient()
    worker.heartbeat_timeout = HEARTBEAT_TIMEOUT
    worker.load_model(PHANTOM, device="cpu", threads=1).wait(120)
    worker.set_volume("blob", VOLUME).wait(30)
    yield worker
    worker.shutdown()


def wait_until_gone(pid: int, seconds: float) -> float:
    """Seconds until `pid` is gone, or fail after `seconds`."""
    started = time.monotonic()
    while alive(pid):
        assert time.monotonic() - started < seconds, f"process {pid} still runs after {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_stopped_worker_fails_the_request_within_the_heartbeat_timeout_and_is_killed(client):
    pid = client.status().wait(10)["pid"]
    stopped_at = []

    def on_slice(item):
        if not stopped_at:
            os.kill(pid, signal.SIGSTOP)
            stopped_at.append(time.monotonic())

    request = client.propagate("blob", 0, 30, BOX, on_slice=on_slice)
    try:
        with pytest.raises(WorkerError, match=r"propagate failed: the worker stopped answering \(no heartbeat for \d s"):
            request.wait(60)
        detected = time.monotonic() - stopped_at[0]
        assert HEARTBEAT_TIMEOUT - 0.5 < detected < HEARTBEAT_TIMEOUT + 2.0  # checked every second
        assert len(request.completed) < VOLUME.shape[0]  # stopped mid-request, not after it
        assert wait_until_gone(pid, 5.0) < 5.0
    finally:
        kill_tree(pid)
    assert client.state == "stopped"
    assert client.segment_slice("blob", 0, 30, BOX).wait(120).shape == (64, 64)  # a fresh worker takes over
    assert client.status().wait(10)["pid"] != pid


def test_a_checkpoint_that_fails_to_load_leaves_the_loaded_model_in_use(client, tmp_path):
    loaded = client.status().wait(10)
    with pytest.raises(ModelError, match=r"checkpoint not found: .*absent\.pt"):
        client.load_model(tmp_path / "absent.pt", device="cpu", threads=1).wait(60)
    assert client.status().wait(10)["model"] == loaded["model"]
    assert client.segment_slice("blob", 0, 30, BOX).wait(60).shape == (64, 64)
    # A restarted worker gets the good model again, not the one that failed and not none.
    kill_tree(loaded["pid"])
    deadline = time.monotonic() + 5
    while client.state != "stopped":
        assert time.monotonic() < deadline, "the killed worker was not noticed"
        client.pump(0.1)
    assert client.segment_slice("blob", 0, 30, BOX).wait(120).shape == (64, 64)
    status = client.status().wait(10)
    assert status["pid"] != loaded["pid"] and status["model"] == loaded["model"]


CLIENT_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, time
    from MedSAM2HITLLib.protocol import PROTOCOL_VERSION, encode
    from MedSAM2HITLLib.subprocess_transport import SubprocessTransport

    class Replies:
        frames = []
        def on_frame(self, frame): self.frames.append(frame)
        def on_exit(self, message): pass

    transport = SubprocessTransport(Replies())
    transport.start()
    transport.send(encode("hello", 1, {"version": PROTOCOL_VERSION}))
    while not Replies.frames:
        transport.pump(0.1)
    pids = [transport.pid]
    if sys.argv[1] == "held":
        pipes = (transport.process.stdin.fileno(), transport.process.stdout.fileno())
        pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=pipes).pid)
    print(*pids, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("pipes", ["alone", "held"])
def test_a_worker_exits_on_its_own_when_its_client_is_killed(pipes):
    """Alone, the worker sees the end of its input. When another process holds its pipes (a child the client
    started that inherited them), no end of input comes, and only the parent watch can tell."""
    process = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, pipes], stdout=subprocess.PIPE, text=True,
                               env=_env())
    pids = [int(pid) for pid in process.stdout.readline().split()]
    try:
        assert alive(pids[0])
        process.kill()
        process.wait(10)
        assert wait_until_gone(pids[0], 5.0) < 3.0  # the parent is checked every second
    finally:
        for pid in pids:
            kill_tree(pid)


def test_sigterm_to_the_cli_kills_its_stopped_worker(tmp_path):
    """A stopped worker cannot notice that its client is gone: the CLI must kill it before exiting."""
    volume = np.zeros((64, 64, 200), np.int16)
    volume[18:46, 14:42, 40:160] = 300
    path = tmp_path / "block.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    args = [sys.executable, "-m", "MedSAM2HITLLib.cli", "segment", str(path), "--box-ras", "18", "14", "100", "46",
            "42", "100", "--propagate", "--checkpoint", str(PHANTOM), "--device", "cpu", "--threads", "1",
            "-o", str(tmp_path / "out.seg.nrrd")]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=_env())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not any("key slice segmented" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            time.sleep(0.02)
        workers = descendants(process.pid)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        assert workers and process.poll() is None, "the propagation ended before its worker could be stopped"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 128 + signal.SIGTERM
        for pid in workers:
            wait_until_gone(pid, 5.0)
    finally:
        process.kill()
        for pid in workers:
            kill_tree(pid)
