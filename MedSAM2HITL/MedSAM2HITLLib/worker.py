"""The background worker: one long-lived process keeping the model, the volumes and the embedding cache warm.

Run as `python -m MedSAM2HITLLib.worker`, or as `PythonSlicer <path>/worker.py` inside Slicer. stdin and stdout
carry protocol frames only: at start-up the real stdout is kept for frames and fd 1 is pointed at stderr, so
prints from Python, torch, sam2 or C code end up in the log instead of corrupting the stream.

Requests run one at a time on the main thread. A reader thread decodes stdin, so `cancel` (and `status`) are seen
while a propagation runs; cancelling is checked before each slice. A third thread sends a heartbeat every second,
so the client can tell a busy worker from a stopped one, and ends the process once its parent is gone.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import sys
import threading
import time

if __package__ in (None, ""):  # run as a script path: import the package from its parent folder
    _package_dir = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _package_dir:
        sys.path.pop(0)  # the package folder itself must not shadow top-level modules (e.g. `model`)
    sys.path.insert(0, os.path.dirname(_package_dir))

from MedSAM2HITLLib import __version__
from MedSAM2HITLLib.device import free_cached_memory, is_out_of_memory
from MedSAM2HITLLib.errors import BadInputError, MedSAM2Error, ModelError, OutOfMemoryError, PropagationCancelled
from MedSAM2HITLLib.process_tree import parent_watch
from MedSAM2HITLLib.protocol import (
    HEARTBEAT_SECONDS,
    PROTOCOL_VERSION,
    Frame,
    FrameReader,
    FrameTooLarge,
    ProtocolError,
    encode,
)
from MedSAM2HITLLib.slice_rules import note_completed

READ_CHUNK = 1 << 20
FINAL_REPLIES = ("done", "error", "cancelled")
log = logging.getLogger("MedSAM2HITLLib.worker")


def take_over_stdout() -> int:
    """A private descriptor for frames; fd 1 and sys.stdout now go to stderr (also for C-level writes)."""
    sys.stdout.flush()
    frames_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if os.name == "nt":
        import msvcrt

        msvcrt.setmode(frames_fd, os.O_BINARY)
        msvcrt.setmode(0, os.O_BINARY)
    return frames_fd


def integer(frame: Frame, name: str, default=...):
    """An integer field of a request, or a BadInputError naming it."""
    value = frame.fields.get(name, default)
    if value is ...:
        raise BadInputError(f"{frame.type} needs an integer '{name}'")
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInputError(f"{frame.type}: '{name}' must be an integer, got {value!r}")
    return value


def conditioning_prompts(frame: Frame) -> list[dict]:
    """A propagate request's objects as the engine takes them: per object, slice index → box or mask.

    Wire form (protocol.py): field `objects` = [{"boxes": [[index, x0, y0, x1, y1], ...], "masks": [index, ...]}],
    with each mask in array `mask<object>_<index>`.
    """
    objects = frame.fields.get("objects")
    if not isinstance(objects, list) or not objects:
        raise BadInputError("propagate needs 'objects': a list with each object's conditioning slices")
    prompts = []
    for number, described in enumerate(objects):
        if not isinstance(described, dict):
            raise BadInputError(f"propagate: object {number} must be a dictionary of 'boxes' and 'masks'")
        slices = {}
        for box in described.get("boxes") or []:
            if not isinstance(box, list) or len(box) != 5 or not isinstance(box[0], int):
                raise BadInputError(f"propagate: a box is [slice index, x_min, y_min, x_max, y_max], got {box!r}")
            slices[box[0]] = box[1:]
        for index in described.get("masks") or []:
            name = f"mask{number}_{index}"
            if name not in frame.arrays:
                raise BadInputError(f"propagate: object {number} names a mask on slice {index} but sent no '{name}'")
            slices[index] = frame.arrays[name]
        prompts.append(slices)
    return prompts


class Channel:
    """Writes whole frames to the frame descriptor; a lock keeps frames from two threads apart."""

    def __init__(self, fd: int):
        self.fd = fd
        self.lock = threading.Lock()
        self.on_final = None  # called with the request id before its final reply goes out

    def send(self, type: str, id: int | None = None, fields: dict | None = None, arrays: dict | None = None) -> None:
        buffers = encode(type, id, fields, arrays)
        if type in FINAL_REPLIES and self.on_final is not None:
            self.on_final(id)
        with self.lock:
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                while len(view):
                    view = view[os.write(self.fd, view) :]

    def error(self, id: int | None, kind: str, message: str) -> None:
        self.send("error", id, {"kind": kind, "message": message})


class Stop:
    """Queued by the reader when input ends; `reason` is set when the stream broke."""

    def __init__(self, reason: str | None = None):
        self.reason = reason


class Worker:
    def __init__(self, channel: Channel):
        self.channel = channel
        self.engine = None
        self.volumes: dict = {}  # volume_id -> array
        self._engine_keys: dict = {}  # volume_id -> id given to the engine, new for each set_volume
        self.cancelled: set[int] = set()
        self.closing = threading.Event()
        self.inbox: queue.Queue = queue.Queue()
        self.current: Frame | None = None
        channel.on_final = self._finished

    # ---- input side (reader thread) ----

    def read_requests(self, fd: int) -> None:
        """Decode stdin; answer cancel and status at once, queue the rest. Never raises."""
        reader = FrameReader()
        chunk = bytearray(READ_CHUNK)  # reused: reading allocates nothing, even when memory runs out
        source = io.FileIO(fd, "rb", closefd=False)
        try:
            while True:
                size = source.readinto(chunk)
                if size:
                    reader.feed(memoryview(chunk)[:size])
                self._dispatch_frames(reader)
                if not size:
                    reader.close()
                    self._stop(None)
                    return
        except ProtocolError as exc:
            self._stop(f"{exc}; the worker stops because it cannot find the next frame")
        except OSError as exc:
            self._stop(f"reading requests failed: {exc}")
        except BaseException as exc:  # the reader must always unblock the main thread
            self._stop(f"internal error while reading requests: {exc!r}")

    def _dispatch_frames(self, reader: FrameReader) -> None:
        while True:
            try:
                frame = reader.next_frame()
            except FrameTooLarge as exc:
                self.channel.error(exc.frame_id, OutOfMemoryError.kind, f"{exc}: free memory or send a smaller volume")
                continue
            except ProtocolError as exc:
                if not exc.recoverable:
                    raise
                self.channel.error(exc.frame_id, BadInputError.kind, f"malformed request skipped: {exc}")
                continue
            if frame is None:
                return
            if frame.type == "cancel":
                self.cancelled.add(frame.fields.get("request"))
            elif frame.type == "status":
                self.channel.send("done", frame.id, self.status())
            else:
                self.inbox.put(frame)

    def _stop(self, reason: str | None) -> None:
        self.closing.set()
        self.inbox.put(Stop(reason))

    def keep_alive(self, parent_alive) -> None:
        """Beat until the process ends, even while the main thread computes; exit at once when the client is gone.

        The end of input is not enough: another process may hold the pipes open, and the main thread may be busy.
        """
        while True:
            if not parent_alive():
                log.info("the client is gone: exiting")
                os._exit(1)
            try:
                self.channel.send("heartbeat")
            except OSError:  # nobody reads the frames any more
                os._exit(1)
            time.sleep(HEARTBEAT_SECONDS)

    def status(self) -> dict:
        engine, current = self.engine, self.current
        return {
            "pid": os.getpid(),
            "model": engine.info() if engine is not None else None,
            "volumes": {key: {"shape": list(v.shape), "dtype": str(v.dtype)} for key, v in list(self.volumes.items())},
            "running": {"type": current.type, "id": current.id} if current is not None else None,
        }

    # ---- request side (main thread) ----

    def serve(self) -> int:
        """Answer requests until shutdown or the end of input; the exit code of the process."""
        while True:
            item = self.inbox.get()
            if isinstance(item, Stop):
                if item.reason is None:
                    return 0
                self.channel.error(None, BadInputError.kind, item.reason)
                return 2
            self.current = item
            try:
                if self.handle(item) == "shutdown":
                    return 0
            finally:
                self.current = None

    def _finished(self, request_id) -> None:
        """A request whose final reply is going out is no longer running (status must not say otherwise)."""
        current = self.current
        if current is not None and current.id == request_id:
            self.current = None

    def handle(self, frame: Frame) -> str | None:
        started = time.perf_counter()
        try:
            handler = getattr(self, "on_" + frame.type, None)
            if handler is None:
                raise BadInputError(f"unknown request type '{frame.type}'")
            return handler(frame)
        except PropagationCancelled as exc:
            self.channel.send("cancelled", frame.id, {"completed": exc.completed})
        except Exception as exc:
            self.channel.error(frame.id, *self.describe_failure(exc, frame.type))
        finally:
            self.cancelled.discard(frame.id)
            log.info("%s #%s took %.3f s", frame.type, frame.id, time.perf_counter() - started)
        return None

    def describe_failure(self, exc: BaseException, request: str) -> tuple[str, str]:
        """(kind, message) for an error frame; out-of-memory frees cached memory first."""
        if is_out_of_memory(exc):
            if self.engine is not None:
                free_cached_memory(self.engine.model.device)
            if isinstance(exc, OutOfMemoryError):
                return OutOfMemoryError.kind, str(exc)
            return (
                OutOfMemoryError.kind,
                f"out of memory during {request}: propagate a smaller range of slices, or use the CPU device",
            )
        if isinstance(exc, MedSAM2Error):
            return exc.kind, str(exc)
        log.exception("%s failed", request)
        return MedSAM2Error.kind, f"{request} failed: {exc.__class__.__name__}: {exc}"

    def on_hello(self, frame: Frame) -> None:
        version = frame.fields.get("version")
        if version != PROTOCOL_VERSION:
            raise BadInputError(
                f"protocol version mismatch: the client speaks version {version}, this worker speaks "
                f"{PROTOCOL_VERSION}; both come from the MedSAM2HITL install, so reinstall or restart Slicer"
            )
        self.channel.send(
            "done",
            frame.id,
            {"version": PROTOCOL_VERSION, "package": __version__, "pid": os.getpid(), "python": sys.version},
        )

    def on_load_model(self, frame: Frame) -> None:
        from MedSAM2HITLLib.engine import Engine

        f = frame.fields
        if not f.get("checkpoint"):
            raise BadInputError("load_model needs a 'checkpoint' path")
        # The old model stays until the new one has loaded: a checkpoint that fails to load must not unload it.
        self.engine = Engine.load(f["checkpoint"], f.get("config"), f.get("device") or "auto", f.get("threads"),
                                  precision=f.get("precision") or "auto")
        log.info("model loaded: %s", self.engine.info())
        self.channel.send("done", frame.id, self.engine.info())

    def on_set_volume(self, frame: Frame) -> None:
        from MedSAM2HITLLib.engine import check_volume

        volume_id = frame.fields.get("volume_id")
        if not isinstance(volume_id, str) or not volume_id:
            raise BadInputError("set_volume needs a non-empty string 'volume_id'")
        if "volume" not in frame.arrays:
            raise BadInputError("set_volume needs a 'volume' array")
        volume = check_volume(frame.arrays["volume"])
        self.volumes[volume_id] = volume
        # New content under a known id must not reuse the engine's embeddings of the old content.
        self._engine_keys[volume_id] = f"{volume_id}#{frame.id}"
        described = {"volume_id": volume_id, "shape": list(volume.shape), "dtype": str(volume.dtype)}
        self.channel.send("done", frame.id, described)

    def on_segment_2d(self, frame: Frame) -> None:
        f = frame.fields
        engine = self._engine_for(f.get("volume_id"))
        started = time.perf_counter()
        axis, index = integer(frame, "axis"), integer(frame, "index")
        cached = engine.is_cached(axis, index, f.get("window", "mr")) if axis in (0, 1, 2) else False
        mask = engine.segment_slice(axis, index, f.get("box"), f.get("window", "mr"), f.get("points"),
                                    frame.arrays.get("mask"))
        self.channel.send("done", frame.id, {"seconds": time.perf_counter() - started, "embedding_cached": cached},
                          {"mask": mask})

    def on_propagate(self, frame: Frame) -> None:
        f = frame.fields
        engine = self._engine_for(f.get("volume_id"))

        def should_cancel() -> bool:
            return frame.id in self.cancelled or self.closing.is_set()

        from MedSAM2HITLLib.engine import EARLY_STOP_PATIENCE

        completed: list[int] = []
        slices = engine.propagate_objects(
            integer(frame, "axis"),
            conditioning_prompts(frame),
            integer(frame, "start", None),
            integer(frame, "end", None),
            f.get("window", "mr"),
            bool(f.get("largest_component", False)),
            should_cancel,
            EARLY_STOP_PATIENCE if f.get("early_stop") is True else None,
        )
        for item in slices:
            note_completed(completed, item.index)
            fields = {"index": item.index, "completed": item.completed, "total": item.total, "object": item.object}
            self.channel.send("slice", frame.id, fields, {"mask": item.mask})
        self.channel.send("done", frame.id, {"completed": completed, "ended_early": slices.ended_early})

    def on_prefetch(self, frame: Frame) -> None:
        """Encode the slice the user is looking at, then its neighbours (nearest first), while nothing else waits.

        Any request that arrives meanwhile (another prefetch too) is never delayed by more than one block of the
        image encoder: the encoding is abandoned and the reply says `gave_way`. A prefetch that finds another
        request queued behind it is dropped at once.
        """
        f = frame.fields
        engine = self._engine_for(f.get("volume_id"))

        def gives_way() -> bool:
            return not self.inbox.empty() or frame.id in self.cancelled or self.closing.is_set()

        encoded, gave_way = engine.prefetch_around(integer(frame, "axis"), integer(frame, "index"),
                                                   f.get("window", "mr"), integer(frame, "neighbours", 1), gives_way)
        self.channel.send("done", frame.id, {"encoded": encoded, "gave_way": gave_way})

    def on_forget_volume(self, frame: Frame) -> None:
        """Drop a volume the client no longer uses (the engine may still hold its current one)."""
        volume_id = frame.fields.get("volume_id")
        self.volumes.pop(volume_id, None)
        self._engine_keys.pop(volume_id, None)
        self.channel.send("done", frame.id, {})

    def on_shutdown(self, frame: Frame) -> str:
        self.channel.send("done", frame.id, {})
        return "shutdown"

    def _engine_for(self, volume_id):
        """The engine with `volume_id` as its current volume."""
        if self.engine is None:
            raise ModelError("no model is loaded in the worker: load a checkpoint first")
        if volume_id not in self.volumes:
            raise BadInputError(f"unknown volume '{volume_id}': send it with set_volume first")
        key = self._engine_keys[volume_id]
        if self.engine.volume_id != key:
            self.engine.set_volume(self.volumes[volume_id], key)
        return self.engine


def main() -> int:
    frames_fd = take_over_stdout()
    os.environ.setdefault("TQDM_DISABLE", "1")  # sam2's per-slice progress bars would crowd the log tail
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s worker %(process)d: %(message)s")
    log.info("started (protocol %s, Python %s)", PROTOCOL_VERSION, sys.version.split()[0])
    worker = Worker(Channel(frames_fd))
    threading.Thread(target=worker.read_requests, args=(sys.stdin.fileno(),), name="requests", daemon=True).start()
    threading.Thread(target=worker.keep_alive, args=(parent_watch(),), name="heartbeat", daemon=True).start()
    try:
        return worker.serve()
    except BrokenPipeError:
        return 0  # the client went away: nobody is left to answer


if __name__ == "__main__":
    sys.exit(main())
