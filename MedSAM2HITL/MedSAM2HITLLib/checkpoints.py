"""Known checkpoints, the per-user cache they live in, and a resumable download into it.

Standard library only: the Slicer Download button and the CLI use this before torch is installed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import BadInputError, MedSAM2Error, ModelError

CACHE_ENV = "MEDSAM2HITL_CACHE"  # a directory that holds the checkpoint files themselves
CHUNK = 1 << 20
# Pinned to one revision of the model repository: "main" could change under a user between two downloads.
MEDSAM2_REVISION = "e4a6f35edd7e091619cbc0750f462f1574e23955"
MEDSAM2_URL = f"https://huggingface.co/wanglab/MedSAM2/resolve/{MEDSAM2_REVISION}/"
MEDSAM2_SIZE = 156_000_000  # approximate: 38.96 M float32 parameters plus the zip container
MEDSAM2_LICENCE = "weights CC-BY-SA-4.0, code Apache-2.0"

Progress = Callable[[int, "int | None"], None]  # (done bytes, total bytes or None)


@dataclass(frozen=True)
class Checkpoint:
    """One downloadable checkpoint; `size`/`sha256` are set only when known exactly, and then enforced."""

    name: str
    file: str
    url: str
    image_size: int
    description: str
    licence: str
    approx_size: int
    size: int | None = None
    sha256: str | None = None


def _medsam2(name: str, description: str) -> Checkpoint:
    file = f"{name}.pt"
    return Checkpoint(name, file, MEDSAM2_URL + file, 512, description, MEDSAM2_LICENCE, MEDSAM2_SIZE)


REGISTRY: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        _medsam2(
            "MedSAM2_latest",
            "Recommended. Trained on public data sets plus newly annotated CT, MRI, PET, ultrasound and video",
        ),
        _medsam2("MedSAM2_2411", "Base model trained in November 2024"),
        _medsam2("MedSAM2_CTLesion", "Fine-tuned for lesions in CT"),
        _medsam2("MedSAM2_MRI_LiverLesion", "Fine-tuned for liver lesions in MRI"),
        _medsam2("MedSAM2_US_Heart", "Fine-tuned for heart ultrasound (echocardiography)"),
        Checkpoint(
            "sam2.1_hiera_tiny",
            "sam2.1_hiera_tiny.pt",
            "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt",
            1024,
            "Meta's SAM 2.1 Hiera-Tiny (natural images, not medical); same architecture at 1024",
            "Apache-2.0",
            156_000_000,
        ),
    )
}
DEFAULT_MODEL = "MedSAM2_latest"


class DownloadCancelled(MedSAM2Error):
    """The user stopped a download; the partial file is kept so the next download resumes it."""

    kind = "cancelled"


def cache_dir() -> Path:
    """Where checkpoints are kept: $MEDSAM2HITL_CACHE, else the platform's per-user cache folder."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = Path(local) if local else Path.home() / "AppData" / "Local"
        return base / "MedSAM2HITL" / "checkpoints"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "MedSAM2HITL" / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative → ignore
    return base / "medsam2hitl" / "checkpoints"


def lookup(name: str) -> Checkpoint:
    """The registry entry for a name (or its file name), or a BadInputError listing the known names."""
    for entry in REGISTRY.values():
        if name in (entry.name, entry.file):
            return entry
    raise BadInputError(f"unknown checkpoint '{name}'; known checkpoints: {', '.join(REGISTRY)}")


def cached_path(entry: Checkpoint) -> Path:
    return cache_dir() / entry.file


def _manual_install(entry: Checkpoint) -> str:
    return (
        f"if this computer has no internet access, download {entry.url} on one that has "
        f"and put the file at {cached_path(entry)}"
    )


def resolve_checkpoint(name_or_path: str | Path = DEFAULT_MODEL) -> Path:
    """A checkpoint file: an existing path as given, or a registry name's file in the cache."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    looks_like_path = isinstance(name_or_path, Path) or len(path.parts) > 1 or path.suffix in (".pt", ".pth")
    try:
        entry = lookup(str(name_or_path))
    except BadInputError:
        if looks_like_path:
            raise ModelError(
                f"checkpoint file not found: {path}; give an existing file or one of: {', '.join(REGISTRY)}"
            ) from None
        raise
    cached = cached_path(entry)
    if cached.is_file():
        return cached
    raise ModelError(
        f"checkpoint '{entry.name}' is not downloaded yet. Download it with `medsam2hitl models download "
        f"{entry.name}` or the Download button of the MedSAM2HITL module; {_manual_install(entry)}"
    )


def list_models() -> list[dict]:
    """One row per registry entry, for `medsam2hitl models list` and the module's model selector."""
    rows = []
    for entry in REGISTRY.values():
        path = cached_path(entry)
        cached = path.is_file()
        rows.append(
            {
                "name": entry.name,
                "default": entry.name == DEFAULT_MODEL,
                "file": entry.file,
                "size": f"{path.stat().st_size / 1e6:.0f} MB" if cached else f"~{entry.approx_size / 1e6:.0f} MB",
                "cached": cached,
                "path": str(path),
                "image_size": entry.image_size,
                "licence": entry.licence,
                "description": entry.description,
            }
        )
    return rows


def cache_size() -> int:
    """Bytes in the cache folder: checkpoints, partial downloads and lock files."""
    folder = cache_dir()
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file()) if folder.is_dir() else 0


def remove_cached(name: str) -> int:
    """Delete a downloaded checkpoint and its partial download; the bytes freed (0 if it was not there).

    Refused while another process downloads it (its lock is held), so a running download is not corrupted.
    """
    entry = lookup(name)
    final = cached_path(entry)
    partial = final.with_name(final.name + ".partial")
    freed = 0
    with _DownloadLock(final):
        for path in (final, partial, _if_range_file(partial)):
            if path.is_file():
                freed += path.stat().st_size
                path.unlink()
    return freed


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None where absent or '*'."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None, None
    first, _, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _int_header(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _if_range_file(partial: Path) -> Path:
    """Beside the partial file: the version (ETag or Last-Modified) its bytes came from."""
    return partial.with_name(partial.name + ".if-range")


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _if_range_file(partial).unlink(missing_ok=True)


def _reject(partial: Path, problem: str) -> ModelError:
    """A finished transfer that is wrong cannot be resumed into something right: drop it."""
    _discard(partial)
    return ModelError(f"{problem}; the download was discarded, try again")


def _remember_version(partial: Path, headers) -> None:
    """Keep what If-Range needs, so a resume never glues two versions of a file together.

    Weak ETags are not allowed in If-Range; Last-Modified is the fallback.
    """
    etag = headers.get("ETag")
    version = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    if version:
        _if_range_file(partial).write_text(version, encoding="utf-8")
    else:
        _if_range_file(partial).unlink(missing_ok=True)


class _DownloadLock:
    """An OS lock on `<file>.lock` beside a download: one writer per cache file, across processes (the Slicer
    panel and the CLI share the cache). The OS drops it when its holder exits or is killed, so a crash never
    leaves the cache locked; the empty file itself stays and is harmless."""

    def __init__(self, final: Path):
        self.final = final
        self.path = final.with_name(final.name + ".lock")

    def __enter__(self) -> "_DownloadLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a+b")
        except OSError as exc:
            raise ModelError(
                f"cannot write to the checkpoint folder {self.path.parent} ({exc.strerror}); make it writable, "
                f"or choose another folder with the {CACHE_ENV} environment variable"
            ) from exc
        try:
            _lock_file(self.handle)
        except OSError:
            self.handle.close()
            raise ModelError(
                f"{self.final.name} is being downloaded by another MedSAM2HITL process (Slicer or the "
                f"medsam2hitl command); wait for it to finish, or stop it, then try again"
            ) from None
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()  # closing releases the lock on every OS


def _lock_file(handle) -> None:
    """Lock an open file without waiting; OSError if another handle holds it."""
    if sys.platform == "win32":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _open(url: str, partial: Path, offset: int, timeout: float):
    headers = {"User-Agent": f"MedSAM2HITL/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        version = _if_range_file(partial)
        if version.is_file():
            headers["If-Range"] = version.read_text(encoding="utf-8").strip()
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def download(
    name: str,
    progress: Progress | None = None,
    *,
    url: str | None = None,
    timeout: float = 30.0,
    should_cancel: Callable[[], bool] | None = None,
) -> Path:
    """Download a registry checkpoint into the cache (resuming `<file>.partial`) and return its path.

    `progress(done_bytes, total_bytes_or_None)` is called as bytes arrive; `should_cancel()` is checked
    between chunks and stops with DownloadCancelled, keeping the partial file. `url` replaces the
    registry URL (mirrors, tests). Failures raise ModelError saying what to do next, as does a download of
    the same file already running in another process.
    """
    entry = lookup(name)
    final = cached_path(entry)
    if not final.is_file():
        with _DownloadLock(final):
            if not final.is_file():  # another process may have finished it before we took the lock
                return _download_locked(entry, final, url or entry.url, timeout, progress, should_cancel)
    size = final.stat().st_size
    if progress:
        progress(size, size)
    return final


def _download_locked(
    entry: Checkpoint,
    final: Path,
    source: str,
    timeout: float,
    progress: Progress | None,
    should_cancel: Callable[[], bool] | None,
) -> Path:
    partial = final.with_name(final.name + ".partial")
    offset = partial.stat().st_size if partial.is_file() else 0
    if entry.size is not None and offset > entry.size:
        _discard(partial)
        offset = 0
    try:
        total = _transfer(source, partial, offset, timeout, progress, should_cancel)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            problem = f"the server answered HTTP {exc.code} {exc.reason} for {source}"
        else:
            reason = getattr(exc, "reason", None) or repr(exc)
            problem = (
                f"could not download {source} "
                f"(computer offline, server unreachable or connection lost: {reason})"
            )
        kept = partial.stat().st_size if partial.is_file() else 0
        resume = f"; the {kept} bytes received are kept in {partial} and the next download resumes" if kept else ""
        raise ModelError(f"{problem}; {_manual_install(entry)}{resume}") from exc
    size = partial.stat().st_size
    for wanted in (total, entry.size):
        if wanted is not None and size != wanted:
            raise _reject(partial, f"{entry.file}: received {size} bytes, expected {wanted}")
    if entry.size is None and source == entry.url and not entry.approx_size / 2 <= size <= entry.approx_size * 2:
        # e.g. an error page instead of the file; a mirror the user names (--url) is taken at its word
        raise _reject(partial, f"{entry.file}: received {size} bytes, not about {entry.approx_size / 1e6:.0f} MB "
                               "as this checkpoint is")
    if entry.sha256 and _sha256(partial) != entry.sha256.lower():
        raise _reject(partial, f"{entry.file}: SHA-256 differs from the published checksum")
    partial.replace(final)
    _if_range_file(partial).unlink(missing_ok=True)
    return final


def _transfer(
    url: str,
    partial: Path,
    offset: int,
    timeout: float,
    progress: Progress | None,
    should_cancel: Callable[[], bool] | None,
) -> int | None:
    """Write `url` into `partial`, keeping its first `offset` bytes if the server sends only the rest
    (and, when the version of those bytes is known, only if the file has not changed since).

    Returns the size the server announced for the whole file (None if it did not say).
    """

    def restart() -> int | None:
        _discard(partial)
        return _transfer(url, partial, 0, timeout, progress, should_cancel)

    try:
        response = _open(url, partial, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Range not satisfiable: the partial file is already complete, or longer than the source.
        _, total = _parse_content_range(exc.headers.get("Content-Range"))
        exc.close()
        return total if total == offset else restart()
    with response:
        length = _int_header(response.headers.get("Content-Length"))
        if response.status == 206:
            content_range = response.headers.get("Content-Range")
            start, total = _parse_content_range(content_range)
            if start is None or start > offset:
                if not offset:
                    raise ModelError(f"{url} answered a request for the whole file with bytes {content_range}")
                return restart()
            if total is None and length is not None:
                total = start + length
        else:  # 200: the whole file, because the server ignores ranges or the file changed (If-Range)
            start, total = 0, length
        if start == 0:
            _remember_version(partial, response.headers)
        done = start
        with open(partial, "r+b" if start else "wb") as f:
            f.seek(start)
            f.truncate()
            if progress:
                progress(done, total)
            while True:
                if should_cancel and should_cancel():
                    raise DownloadCancelled(
                        f"download of {partial.name} cancelled after {done} bytes; the next download resumes it"
                    )
                block = response.read(CHUNK)
                if not block:
                    break
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    if total is not None and done < total:
        raise http.client.IncompleteRead(b"", total - done)
    return total


class BackgroundDownload:
    """`download` on a plain thread, for a GUI to poll (`received`, `total`, `done`, `path`, `error`): Qt
    must not be touched off the main thread, so nothing calls back into the GUI from here."""

    def __init__(self, name: str, *, url: str | None = None):
        self.name, self.url = name, url
        self.received, self.total = 0, None
        self.path: Path | None = None
        self.error: Exception | None = None
        self._cancel = False
        self._thread = threading.Thread(target=self._run, name="MedSAM2HITL download", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        def progress(done: int, total: int | None) -> None:
            self.received, self.total = done, total

        try:
            self.path = download(self.name, progress, url=self.url, should_cancel=lambda: self._cancel)
        except Exception as exc:  # handed to the GUI, which shows the library's message
            self.error = exc

    @property
    def done(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def cancel(self) -> None:
        """Stop at the next chunk, keeping the partial file for the next download to resume."""
        self._cancel = True
