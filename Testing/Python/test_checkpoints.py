"""Checkpoint registry, cache folder and resumable download, against a loopback HTTP server."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO
from MedSAM2HITLLib import checkpoints
from MedSAM2HITLLib.checkpoints import (
    CACHE_ENV,
    REGISTRY,
    BackgroundDownload,
    Checkpoint,
    DownloadCancelled,
    cache_dir,
    download,
    list_models,
    resolve_checkpoint,
)
from MedSAM2HITLLib.errors import BadInputError, ModelError

pytestmark = pytest.mark.slow

NAME = "Test_model"


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.payload` at /file (Range-aware unless told not to), redirects /moved there."""

    server: "_Server"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        wanted = self.headers.get("Range")
        srv.requests.append((self.path, wanted))
        srv.if_range.append(self.headers.get("If-Range"))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/file")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/file":
            self.send_error(404)
            return
        data = srv.payload
        start = 0
        unchanged = self.headers.get("If-Range") in (None, srv.etag)
        if wanted and srv.honour_range and unchanged:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", srv.etag)
        self.end_headers()
        stop = len(data) if srv.cut_at is None else max(start, srv.cut_at)
        try:
            self.wfile.write(memoryview(data)[start:stop])
        except ConnectionError:  # the client cancelled
            pass
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    payload = b""
    honour_range = True
    cut_at: int | None = None  # close the connection once the file's byte `cut_at` is reached
    etag = '"v1"'

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.if_range: list[str | None] = []

    def url(self, path: str = "/file") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> bytes:
    """A small real checkpoint file ({"model": state_dict}, ~4 MB) written by the project's saver."""
    import torch

    from MedSAM2HITLLib.model import save_checkpoint

    torch.manual_seed(0)
    path = save_checkpoint(torch.nn.Linear(1024, 1024), tmp_path_factory.mktemp("small") / "small.pt")
    return path.read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def entry(server, small_checkpoint, cache, monkeypatch) -> Checkpoint:
    """A registry entry whose URL is the loopback server, which serves the small checkpoint."""
    server.payload = small_checkpoint
    made = Checkpoint(NAME, f"{NAME}.pt", server.url(), 256, "loopback test file", "MIT", len(small_checkpoint))
    monkeypatch.setitem(REGISTRY, NAME, made)
    return made


def _recorder():
    calls: list[tuple[int, int | None]] = []
    return calls, lambda done, total: calls.append((done, total))


def _partial(cache: Path) -> Path:
    return cache / f"{NAME}.pt.partial"


def test_full_download_reports_monotonic_progress_ending_at_total(entry, server, cache, small_checkpoint):
    calls, progress = _recorder()
    path = download(NAME, progress)
    assert path == cache / entry.file
    assert path.read_bytes() == small_checkpoint
    assert not _partial(cache).exists()
    size = len(small_checkpoint)
    assert len(calls) >= 3
    assert all(total == size for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] == 0 and done[-1] == size
    assert server.requests == [("/file", None)]
    assert sorted(p.name for p in cache.iterdir()) == [entry.file, f"{entry.file}.lock"]  # the lock is kept, empty
    assert download(NAME) == path and len(server.requests) == 1  # cached: no second transfer


@pytest.mark.parametrize("path", ["/file", "/moved"])
def test_interrupted_download_keeps_partial_and_resumes_with_range(entry, server, cache, small_checkpoint, path):
    cut = 1_500_000
    server.cut_at = cut
    with pytest.raises(ModelError) as failure:
        download(NAME, url=server.url(path))
    message = str(failure.value)
    assert str(_partial(cache)) in message and "resumes" in message
    assert _partial(cache).stat().st_size == cut
    assert not (cache / entry.file).exists()

    server.cut_at = None
    calls, progress = _recorder()
    result = download(NAME, progress, url=server.url(path))
    assert server.requests[-1] == ("/file", f"bytes={cut}-")  # kept across the redirect too
    assert server.if_range[-1] == server.etag
    assert result.read_bytes() == small_checkpoint
    assert calls[0] == (cut, len(small_checkpoint)) and calls[-1][0] == len(small_checkpoint)
    assert not _partial(cache).exists()


def test_file_changed_upstream_is_downloaded_again_not_glued(entry, server, cache, small_checkpoint):
    """Same size, new content (a retrained `latest`): If-Range makes the server send the new file whole."""
    server.cut_at = 1_000_000
    with pytest.raises(ModelError):
        download(NAME)
    server.cut_at = None
    server.payload = small_checkpoint[::-1]
    server.etag = '"v2"'
    result = download(NAME)
    assert server.requests[-1] == ("/file", "bytes=1000000-") and server.if_range[-1] == '"v1"'
    assert result.read_bytes() == small_checkpoint[::-1]


def test_server_ignoring_range_restarts_from_zero(entry, server, cache, small_checkpoint):
    cache.mkdir()
    _partial(cache).write_bytes(b"x" * 700_000)  # would corrupt the result if it were kept
    server.honour_range = False
    calls, progress = _recorder()
    result = download(NAME, progress)
    assert server.requests == [("/file", "bytes=700000-")]
    assert result.read_bytes() == small_checkpoint
    assert calls[0][0] == 0


def test_range_not_satisfiable_finishes_complete_partial_and_restarts_longer_one(
    entry, server, cache, small_checkpoint
):
    size = len(small_checkpoint)
    cache.mkdir()
    _partial(cache).write_bytes(small_checkpoint)  # e.g. the process stopped before the rename
    assert download(NAME).read_bytes() == small_checkpoint
    assert server.requests == [("/file", f"bytes={size}-")]

    (cache / entry.file).unlink()
    _partial(cache).write_bytes(small_checkpoint + b"junk")
    assert download(NAME).read_bytes() == small_checkpoint
    assert server.requests[1:] == [("/file", f"bytes={size + 4}-"), ("/file", None)]


@pytest.mark.parametrize(
    "change",
    [{"size": 1}, {"sha256": "0" * 64}],
    ids=["size", "sha256"],
)
def test_mismatch_with_registry_is_rejected_and_nothing_is_installed(
    entry, cache, small_checkpoint, monkeypatch, change
):
    wrong = {"size": len(small_checkpoint) + change.get("size", 0), "sha256": change.get("sha256")}
    monkeypatch.setitem(REGISTRY, NAME, dataclasses.replace(entry, **wrong))
    with pytest.raises(ModelError, match=f"{entry.file}: .*discarded"):
        download(NAME)
    assert not (cache / entry.file).exists()
    assert not _partial(cache).exists()


def test_matching_size_and_checksum_are_accepted(entry, cache, small_checkpoint, monkeypatch):
    exact = {"size": len(small_checkpoint), "sha256": hashlib.sha256(small_checkpoint).hexdigest().upper()}
    monkeypatch.setitem(REGISTRY, NAME, dataclasses.replace(entry, **exact))
    assert download(NAME).read_bytes() == small_checkpoint


def test_short_body_without_error_is_not_installed(entry, server, cache, small_checkpoint):
    """A server that announces N bytes and closes early is an interruption, even if no socket error occurs."""
    server.cut_at = 10
    with pytest.raises(ModelError, match="offline|unreachable|connection"):
        download(NAME)
    assert not (cache / entry.file).exists()
    assert _partial(cache).read_bytes() == small_checkpoint[:10]


def test_unreachable_server_says_which_file_to_put_where(entry, cache, monkeypatch):
    with socket.socket() as probe:  # a port that was just free: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{entry.file}"
    monkeypatch.setitem(REGISTRY, NAME, dataclasses.replace(entry, url=url))
    with pytest.raises(ModelError) as failure:
        download(NAME, timeout=5)
    message = str(failure.value)
    assert "offline" in message and url in message and str(cache / entry.file) in message
    assert not (cache / entry.file).exists()


def test_http_error_is_reported_with_status(entry, server, cache):
    with pytest.raises(ModelError, match="HTTP 404"):
        download(NAME, url=server.url("/missing"))


def test_cancel_keeps_partial_and_next_download_resumes(entry, server, cache, small_checkpoint):
    chunks = []
    with pytest.raises(DownloadCancelled):
        download(NAME, lambda done, total: chunks.append(done), should_cancel=lambda: len(chunks) > 1)
    kept = _partial(cache).stat().st_size
    assert kept == checkpoints.CHUNK
    assert download(NAME).read_bytes() == small_checkpoint
    assert server.requests[-1] == ("/file", f"bytes={kept}-")


def _lock(cache: Path) -> Path:
    return cache / f"{NAME}.pt.lock"


def test_second_download_of_the_same_file_is_refused_while_the_first_runs(entry, cache, small_checkpoint):
    """Slicer and the CLI share the cache: two writers on one partial file would corrupt it."""
    started, release = threading.Event(), threading.Event()
    results: list[Path] = []

    def slow(done, total):
        if done:
            started.set()
            release.wait(10)

    first = threading.Thread(target=lambda: results.append(download(NAME, slow)))
    first.start()
    try:
        assert started.wait(10)
        with pytest.raises(ModelError, match="being downloaded by another MedSAM2HITL process"):
            download(NAME)
    finally:
        release.set()
        first.join(10)
    assert results and results[0].read_bytes() == small_checkpoint
    assert (cache / f"{NAME}.pt").read_bytes() == small_checkpoint


HOLD_LOCK = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from MedSAM2HITLLib.checkpoints import _DownloadLock
with _DownloadLock(Path(sys.argv[2])):
    print("locked", flush=True)
    time.sleep(60)
"""


@contextlib.contextmanager
def lock_held_by_another_process(cache: Path):
    """Another process holds the download lock of NAME's file until the block ends (then it is killed)."""
    cache.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(REPO / "MedSAM2HITL"), str(cache / f"{NAME}.pt")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait(10)


def test_lock_of_a_killed_process_does_not_block_the_next_download(entry, cache, small_checkpoint):
    """The OS drops the lock with its process: a crashed or killed download leaves nothing to clean up."""
    with lock_held_by_another_process(cache), pytest.raises(ModelError, match="being downloaded by another"):
        download(NAME)
    assert _lock(cache).is_file()  # left behind by the killed process, and harmless
    assert download(NAME).read_bytes() == small_checkpoint


def test_unwritable_cache_folder_says_what_to_do(entry, cache):
    cache.write_text("a file where the folder should be")
    with pytest.raises(ModelError, match=f"cannot write to the checkpoint folder .*{CACHE_ENV}"):
        download(NAME)


def test_failed_download_leaves_the_file_free_for_the_next_one(entry, server, cache, small_checkpoint):
    with pytest.raises(ModelError, match="HTTP 404"):
        download(NAME, url=server.url("/missing"))
    assert download(NAME).read_bytes() == small_checkpoint


def test_background_download_reports_progress_and_the_path(entry, cache, small_checkpoint):
    job = BackgroundDownload(NAME)
    assert not job.done
    job.start()
    job.join(10)
    assert job.done and job.error is None
    assert job.path.read_bytes() == small_checkpoint
    assert job.received == job.total == len(small_checkpoint)


def test_background_download_cancelled_or_failed_keeps_the_error_for_the_panel(entry, server, cache):
    cancelled = BackgroundDownload(NAME)
    cancelled.cancel()
    cancelled.start()
    cancelled.join(10)
    assert cancelled.done and cancelled.path is None
    assert isinstance(cancelled.error, DownloadCancelled) and cancelled.error.kind == "cancelled"
    failed = BackgroundDownload(NAME, url=server.url("/missing"))
    failed.start()
    failed.join(10)
    assert failed.done and isinstance(failed.error, ModelError) and "HTTP 404" in str(failed.error)
    assert not (cache / f"{NAME}.pt").exists()


def test_cache_dir_override_and_platform_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "medsam2hitl" / "checkpoints"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # invalid per the XDG spec
    assert cache_dir() == tmp_path / "home" / ".cache" / "medsam2hitl" / "checkpoints"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cache_dir() == tmp_path / "home" / "Library" / "Caches" / "MedSAM2HITL" / "checkpoints"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_dir() == tmp_path / "local" / "MedSAM2HITL" / "checkpoints"


def test_resolve_checkpoint(entry, cache, tmp_path):
    own = tmp_path / "own.pt"
    own.write_bytes(b"x")
    assert resolve_checkpoint(own) == own and resolve_checkpoint(str(own)) == own

    with pytest.raises(ModelError) as failure:
        resolve_checkpoint(NAME)
    message = str(failure.value)
    assert f"medsam2hitl models download {NAME}" in message
    assert entry.url in message and str(cache / entry.file) in message

    download(NAME)
    assert resolve_checkpoint(NAME) == cache / entry.file
    assert resolve_checkpoint(entry.file) == cache / entry.file

    with pytest.raises(BadInputError, match="unknown checkpoint 'MedSAM2_newest'.*MedSAM2_latest"):
        resolve_checkpoint("MedSAM2_newest")
    with pytest.raises(ModelError, match="not found: .*missing.pt.*MedSAM2_latest"):
        resolve_checkpoint(tmp_path / "missing.pt")


def test_registry_and_list_models(entry, cache):
    medsam2 = {"MedSAM2_latest", "MedSAM2_2411", "MedSAM2_CTLesion", "MedSAM2_MRI_LiverLesion", "MedSAM2_US_Heart"}
    assert medsam2 <= set(REGISTRY)
    latest = REGISTRY["MedSAM2_latest"]
    assert latest.url == ("https://huggingface.co/wanglab/MedSAM2/resolve/e4a6f35edd7e091619cbc0750f462f1574e23955/"
                          "MedSAM2_latest.pt")
    assert all("/resolve/main/" not in entry.url for entry in REGISTRY.values())
    assert latest.image_size == 512 and "CC-BY-SA-4.0" in latest.licence
    assert REGISTRY["sam2.1_hiera_tiny"].image_size == 1024

    rows = {row["name"]: row for row in list_models()}
    assert rows["MedSAM2_latest"]["default"] and not rows[NAME]["cached"]
    download(NAME)
    row = {row["name"]: row for row in list_models()}[NAME]
    assert row["cached"] and row["path"] == str(cache / entry.file) and row["licence"] == "MIT"


def test_real_checkpoint_downloads_and_loads(random_checkpoint, server, cache):
    """The random-init MedSAM2 checkpoint, fetched under a registry name, loads through the real loader."""
    from MedSAM2HITLLib.model import load_model

    server.payload = random_checkpoint.read_bytes()
    server.cut_at = len(server.payload) // 3
    with pytest.raises(ModelError):
        download("MedSAM2_latest", url=server.url())
    server.cut_at = None
    path = download("MedSAM2_latest", url=server.url())
    assert server.requests[-1][1] == f"bytes={len(server.payload) // 3}-"
    assert resolve_checkpoint("MedSAM2_latest") == path == cache / "MedSAM2_latest.pt"
    assert path.read_bytes() == server.payload
    loaded = load_model(path, config=random_checkpoint.with_suffix(".yaml"), device="cpu")
    assert loaded.image_size == 256 and loaded.checkpoint == path


def test_truncated_checkpoint_fails_to_load_naming_the_file(random_checkpoint, cache):
    from MedSAM2HITLLib.model import load_model

    cache.mkdir()
    truncated = cache / "MedSAM2_latest.pt"
    with open(random_checkpoint, "rb") as f:
        truncated.write_bytes(f.read(random_checkpoint.stat().st_size // 2))
    with pytest.raises(ModelError, match=re.escape(str(truncated)) + ".*truncated"):
        load_model(resolve_checkpoint("MedSAM2_latest"), random_checkpoint.with_suffix(".yaml"), device="cpu")


def test_cache_size_and_removing_a_downloaded_checkpoint(entry, cache, small_checkpoint, server):
    from MedSAM2HITLLib.checkpoints import cache_size, remove_cached

    assert cache_size() == 0  # no folder yet
    path = download(NAME)
    (cache / "other.pt.partial").write_bytes(b"x" * 1000)
    assert cache_size() == len(small_checkpoint) + 1000 + _lock(cache).stat().st_size
    assert remove_cached(NAME) == len(small_checkpoint)
    assert not path.exists() and (cache / "other.pt.partial").is_file()
    assert remove_cached(NAME) == 0
    assert [row for row in list_models() if row["name"] == NAME][0]["cached"] is False


def test_a_checkpoint_being_downloaded_is_not_removed(entry, cache, small_checkpoint):
    from MedSAM2HITLLib.checkpoints import remove_cached

    cache.mkdir(parents=True)
    (cache / f"{NAME}.pt.partial").write_bytes(small_checkpoint[:100])
    with lock_held_by_another_process(cache), pytest.raises(ModelError, match="being downloaded by another"):
        remove_cached(NAME)
    assert (cache / f"{NAME}.pt.partial").is_file()


def test_a_file_far_from_the_checkpoints_size_is_refused_when_no_exact_size_is_known(server, cache, monkeypatch):
    """The MedSAM2 entries publish no exact size: a 2 KB page instead of a ~156 MB file must not be kept."""
    server.payload = b"<html>rate limited</html>" * 80
    made = Checkpoint(NAME, f"{NAME}.pt", server.url(), 512, "no exact size", "MIT", 156_000_000)
    monkeypatch.setitem(REGISTRY, NAME, made)
    with pytest.raises(ModelError, match="not about 156 MB"):
        download(NAME)
    assert not (cache / f"{NAME}.pt").exists() and not (cache / f"{NAME}.pt.partial").exists()
