"""Client of the background worker: asynchronous requests, streamed slices, cancel, and restart after crashes.

Requests return at once with a `Request`; results and per-slice masks arrive through callbacks that run on the
thread that pumps the transport (the caller of `Request.wait()` for subprocess pipes, Qt's main thread in
Slicer). Transports only move bytes; the decoding and dispatching below is shared by all of them.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BadInputError, MedSAM2Error, ModelError, OutOfMemoryError, PropagationCancelled
from .process_tree import kill_tree, own_group_options
from .protocol import HEARTBEAT_SECONDS, PROTOCOL_VERSION, Frame, FrameReader, ProtocolError, encode

log = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = 5.0
HEARTBEAT_TIMEOUT_SECONDS = 30.0
STDERR_TAIL_LINES = 20
MAX_LINE_BYTES = 2000
BACKGROUND_REQUESTS = ("status", "prefetch")  # never make the worker "busy", never cancelled
ERRORS_BY_KIND = {cls.kind: cls for cls in (BadInputError, ModelError, OutOfMemoryError)}


class WorkerError(MedSAM2Error):
    """The worker process failed as a whole (died, was killed, or sent something unreadable)."""

    kind = "internal"


class Request:
    """One request to the worker; `done` becomes True with either `result` or `error` set."""

    def __init__(self, client: "WorkerClient", type: str, on_done=None, on_error=None, on_slice=None):
        self.client, self.type = client, type
        self.id: int | None = None
        self.done = False
        self.result = None
        self.error: MedSAM2Error | None = None
        self.fields: dict = {}  # what was sent
        self.reply: dict = {}  # fields of the final answer (e.g. `seconds` the worker spent on a 2D request)
        self.completed: list[int] = []  # propagate: slices received so far
        self.cancelling = False  # cancel was requested and the worker was killed for not stopping
        self.on_slice = on_slice
        self._on_done = [on_done] if on_done else []
        self._on_error = [on_error] if on_error else []

    def then(self, on_done: Callable | None = None, on_error: Callable | None = None) -> "Request":
        """Add callbacks; if the request already finished, the matching one runs now."""
        if on_done:
            self._on_done.append(on_done)
        if on_error:
            self._on_error.append(on_error)
        if self.done:
            _call(on_done if self.error is None else on_error, self.result if self.error is None else self.error)
        return self

    def wait(self, timeout: float | None = None):
        """The result, or raise the error; pumps the transport while waiting unless an event loop drives it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{self.type} request did not finish within {timeout} s")
            self.client.pump(0.1 if remaining is None else min(0.1, remaining))
        if self.error is not None:
            raise self.error
        return self.result

    def _slice(self, item) -> None:
        if item.index not in self.completed:
            self.completed.append(item.index)
        _call(self.on_slice, item)

    def finish(self, result) -> None:
        """End with a result (also used by requests that the logic composes from worker requests)."""
        if not self.done:
            self.done, self.result = True, result
            for callback in self._on_done:
                _call(callback, result)

    def fail(self, error: MedSAM2Error) -> None:
        """End with an error; the first of finish/fail wins."""
        if not self.done:
            self.done, self.error = True, error
            for callback in self._on_error:
                _call(callback, error)


def _call(callback, argument) -> None:
    """Run a caller's callback; its exception is logged so it cannot break frame dispatch."""
    if callback is None:
        return
    try:
        callback(argument)
    except Exception:
        log.exception("callback %r failed", callback)


class Transport:
    """One worker process. Subclasses start it and move bytes; this base turns them into client events.

    `handler` receives on_frame(frame) and on_exit(message), always on the pumping thread.
    """

    def __init__(self, handler):
        self.handler = handler
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._frames = FrameReader()
        self._partial_line = b""
        self._ended = False
        self.last_heard = time.monotonic()  # when the worker's stdout last brought anything

    def received(self, data: bytes) -> None:
        """Bytes from the worker's stdout: decode and dispatch every complete frame except heartbeats."""
        if self._ended:
            return
        self.last_heard = time.monotonic()
        self._frames.feed(data)
        while True:
            try:
                frame = self._frames.next_frame()
            except ProtocolError as exc:
                self.kill()
                self.ended(f"the worker's output is unreadable ({exc})")
                return
            if frame is None:
                return
            if frame.type != "heartbeat":
                self.handler.on_frame(frame)

    def received_stderr(self, data: bytes) -> None:
        """Bytes from the worker's stderr: log them and keep the last lines for error messages."""
        lines = (self._partial_line + data).split(b"\n")
        self._partial_line = lines.pop()[:MAX_LINE_BYTES]  # an endless line keeps its beginning
        for line in lines:
            text = line[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r")
            self.stderr_tail.append(text)
            log.debug("worker: %s", text)

    def ended(self, reason: str) -> None:
        """The process is gone (or unusable): tell the client once, with the stderr tail."""
        if self._ended:
            return
        self._ended = True
        if self._partial_line:
            self.stderr_tail.append(self._partial_line.decode("utf-8", "replace"))
            self._partial_line = b""
        tail = "\n".join(self.stderr_tail)
        self.handler.on_exit(f"{reason}; last worker output:\n{tail}" if tail else reason)

    @staticmethod
    def describe_exit(code: int | None) -> str:
        if code is None:
            return "the worker stopped"
        if code < 0:
            import signal

            try:
                return f"the worker was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"the worker was killed by signal {-code}"
        return f"the worker exited with code {code}"

    # Implemented by each transport:
    def start(self) -> None:
        raise NotImplementedError

    def send(self, buffers: list) -> None:
        raise NotImplementedError

    def pump(self, timeout: float) -> None:
        """Dispatch what arrived, waiting at most `timeout` seconds for something to arrive."""
        raise NotImplementedError

    def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """Stop the whole process tree now; on_exit follows."""
        raise NotImplementedError

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` for the process to exit on its own, then kill it."""
        raise NotImplementedError


class SubprocessTransport(Transport):
    """Pipes to `python -m MedSAM2HITLLib.worker`.

    Threads only move bytes: readers queue what arrives, a writer sends queued frames (so a caller never blocks
    on a worker that stopped reading); pump() dispatches on the caller's thread.
    """

    def __init__(self, handler, command: list[str] | None = None, env: dict | None = None):
        super().__init__(handler)
        self.command = command or [sys.executable, "-m", "MedSAM2HITLLib.worker"]
        self.env = dict(os.environ if env is None else env)
        package_parent = str(Path(__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, self.env.get("PYTHONPATH")) if p)
        self.process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._timers: list[tuple[float, Callable]] = []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            env=self.env,
            **own_group_options(),
        )
        stdout = threading.Thread(target=self._read, args=(self.process.stdout, "out"), daemon=True)
        stderr = threading.Thread(target=self._read, args=(self.process.stderr, "err"), daemon=True)
        for thread in (stdout, stderr):
            thread.start()
        threading.Thread(target=self._watch, args=(stdout, stderr), daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _write(self) -> None:
        """Send queued frames in order; None closes the worker's stdin. After a write error, drop the rest."""
        fd = self.process.stdin.fileno()
        while (buffers := self._outbox.get()) is not None:
            try:
                for buffer in buffers:
                    view = memoryview(buffer).cast("B")
                    while len(view):
                        view = view[os.write(fd, view) :]
            except OSError:
                pass  # the worker is gone; its exit event is on the way and fails the requests
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def _read(self, pipe, channel: str) -> None:
        while True:
            try:
                data = os.read(pipe.fileno(), 1 << 20)
            except (OSError, ValueError):
                data = b""
            if not data:
                return
            self._events.put((channel, data))

    def _watch(self, stdout: threading.Thread, stderr: threading.Thread) -> None:
        """Report the exit once the process is gone and its remaining output is queued (or 1 s has passed)."""
        code = self.process.wait()
        stdout.join(1.0)
        stderr.join(0.5)
        self._events.put(("exit", code))

    def send(self, buffers: list) -> None:
        self._outbox.put(buffers)

    def close_input(self) -> None:
        """Close the worker's stdin after the frames already queued (the worker exits at end of input)."""
        self._outbox.put(None)

    def pump(self, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._fire_timers()
            if self._ended:
                return
            wait = deadline - time.monotonic()
            if self._timers:
                wait = min(wait, self._timers[0][0] - time.monotonic())
            try:
                event = self._events.get(timeout=max(0.0, wait)) if wait > 0 else self._events.get_nowait()
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return
                continue
            self._dispatch(event)
            while not self._ended:  # everything else already queued, without waiting
                try:
                    self._dispatch(self._events.get_nowait())
                except queue.Empty:
                    break
            return

    def _dispatch(self, event) -> None:
        channel, data = event
        if channel == "out":
            self.received(data)
        elif channel == "err":
            self.received_stderr(data)
        else:
            self.ended(self.describe_exit(data))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        due = [callback for when, callback in self._timers if when <= now]
        self._timers = [(when, callback) for when, callback in self._timers if when > now]
        for callback in due:
            callback()

    def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
        self._timers.append((time.monotonic() + seconds, callback))
        self._timers.sort(key=lambda timer: timer[0])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            kill_tree(self.process.pid)

    def close(self, timeout: float) -> None:
        if self.process is None:
            return
        self.close_input()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.process.pid)
            self.process.wait()
        deadline = time.monotonic() + 2.0
        while not self._ended and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())


class WorkerClient:
    """Requests to a background worker, which is started on demand and restarted after it dies.

    The client remembers the last load_model arguments and every volume given to set_volume (by reference, never
    modified) and re-sends them to a fresh worker before the first request that needs them.
    """

    def __init__(self, transport_factory: Callable | None = None):
        self.transport_factory = transport_factory or SubprocessTransport
        self.state = "stopped"
        self.on_state_changed: Callable[[str], None] | None = None
        self.worker_info: dict | None = None
        self.notice = ""  # what the worker last said of its state (the service: its queue), for the status line
        self.cancel_grace = CANCEL_GRACE_SECONDS  # seconds a cancelled request may take before the worker is killed
        self.heartbeat_timeout = HEARTBEAT_TIMEOUT_SECONDS  # seconds of silence after which the worker is killed
        self._transport: Transport | None = None
        self._pending: dict[int, Request] = {}
        self._next_id = 1
        self._volumes: dict[str, np.ndarray] = {}
        self._model_args: dict | None = None
        self._previous_model: tuple[dict | None, bool] = (None, False)  # what a failed load_model returns to
        self._worker_volumes: set[str] = set()
        self._worker_has_model = False
        self._hello_done = False

    # ---- requests ----

    def load_model(
        self, checkpoint, config=None, device: str = "auto", threads: int | None = None, precision: str = "auto",
        **callbacks,
    ) -> Request:
        """Load (or replace) the worker's model; `result` is its info dict. Re-sent to restarted workers.

        If the checkpoint cannot load, the model loaded before stays in use.
        """
        config = str(config) if config else None
        args = {"checkpoint": str(checkpoint), "config": config, "device": device, "threads": threads,
                "precision": precision}
        self._previous_model = (self._model_args, self._worker_has_model)
        self._model_args = args
        request = self._request("load_model", callbacks)
        self._start_worker(request)
        self._worker_has_model = self._transport is not None
        self._send(request, args)
        return request

    def set_volume(self, volume_id: str, array: np.ndarray, **callbacks) -> Request:
        request = self._request("set_volume", callbacks)
        if not isinstance(array, np.ndarray):
            request.fail(BadInputError(f"the volume must be a numpy array, got {type(array).__name__}"))
            return request
        self._volumes[volume_id] = array
        self._start_worker(request)
        self._send_volume(request, volume_id)
        return request

    def forget_volume(self, volume_id: str, **callbacks) -> Request:
        """The volume is no longer needed: the worker drops its copy and a restarted worker does not get it."""
        request = self._request("forget_volume", callbacks)
        self._volumes.pop(volume_id, None)
        if volume_id in self._worker_volumes:
            self._worker_volumes.discard(volume_id)
            self._send(request, {"volume_id": volume_id})
        else:
            request.finish({})
        return request

    def segment_slice(self, volume_id: str, axis: int, index: int, box, window="mr", points=None, mask=None,
                      **callbacks) -> Request:
        """Mask of one slice for a box (x_min, y_min, x_max, y_max) and/or clicks (x, y, 1 positive | 0 negative),
        correcting `mask` (the slice's current mask) when given; `result` is a bool array of the slice shape."""

        def fields():
            values = {"volume_id": volume_id, "axis": int(axis), "index": int(index), "window": _window(window),
                      "box": None if box is None else _numbers(box)}
            if points:
                values["points"] = [_numbers(point) for point in points]
            return values, {} if mask is None else {"mask": np.asarray(mask, dtype=bool)}

        return self._submit(self._request("segment_2d", callbacks), volume_id, fields)

    def propagate(
        self,
        volume_id: str,
        axis: int,
        key_index: int,
        prompt,
        start: int | None = None,
        end: int | None = None,
        window="mr",
        largest_component: bool = False,
        on_slice: Callable | None = None,
        conditioning: dict | None = None,
        early_stop: bool = False,
        **callbacks,
    ) -> Request:
        """Track from the key slice through start..end; each slice goes to `on_slice(SliceMask)` as it arrives.

        `prompt` is a box or a 2D bool mask of the key slice, `conditioning` more slices' masks (index → mask)
        that condition the tracking too; `result` lists the completed slice indices. With `early_stop`, each
        direction stops where the object has ended (engine.EARLY_STOP_PATIENCE empty slices); `reply` then
        has `ended_early` (direction → last slice done) for the directions that stopped before the range's end.
        """
        prompts = {**(conditioning or {}), key_index: prompt}
        return self.propagate_objects(volume_id, axis, [prompts], start, end, window, largest_component, on_slice,
                                      early_stop, **callbacks)

    def propagate_objects(self, volume_id: str, axis: int, objects: list[dict], start: int | None = None,
                          end: int | None = None, window="mr", largest_component: bool = False,
                          on_slice: Callable | None = None, early_stop: bool = False, **callbacks) -> Request:
        """Several objects in one pass, each from its conditioning slices (index → box or mask); SliceMask.object
        tells whose a slice is. `early_stop`: as in `propagate`, stopping when every object has ended."""

        def fields():
            arrays, described = {}, []
            for number, prompts in enumerate(objects):
                boxes, masks = [], []
                for index, prompt in sorted(prompts.items()):
                    if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
                        masks.append(int(index))
                        arrays[f"mask{number}_{int(index)}"] = prompt.astype(bool, copy=False)
                    else:
                        boxes.append([int(index), *_numbers(prompt)])
                described.append({"boxes": boxes, "masks": masks})
            values = {
                "volume_id": volume_id,
                "axis": int(axis),
                "objects": described,
                "start": None if start is None else int(start),
                "end": None if end is None else int(end),
                "window": _window(window),
                "largest_component": bool(largest_component),
                "early_stop": bool(early_stop),
            }
            return values, arrays

        return self._submit(self._request("propagate", callbacks, on_slice=on_slice), volume_id, fields)

    def prefetch(self, volume_id: str, axis: int, index: int, window="mr", neighbours: int = 1,
                 **callbacks) -> Request:
        """Have the worker encode slice `index` (and `neighbours` on each side, at most 2) while it is idle, so a
        box drawn there costs only the mask decoder. It never delays another request: the worker abandons it
        when one arrives. `result`: {"encoded": slices now in its cache, "gave_way": whether it stopped early}.
        Not counted as busy, and not stopped by `cancel()`."""

        def fields():
            return {"volume_id": volume_id, "axis": int(axis), "index": int(index), "window": _window(window),
                    "neighbours": int(neighbours)}, {}

        return self._submit(self._request("prefetch", callbacks), volume_id, fields)

    def status(self, **callbacks) -> Request:
        """Worker pid, model info, volumes and the running request (answered even while it propagates)."""
        request = self._request("status", callbacks)
        self._start_worker(request)
        self._send(request, {})
        return request

    def cancel(self) -> bool:
        """Ask the worker to stop what it is doing; if it has not answered within 5 s, kill it.

        Propagations stop before their next slice and fail with PropagationCancelled(completed). Returns False
        when nothing was pending.
        """
        targets = [r for r in self._pending.values() if r.type not in BACKGROUND_REQUESTS + ("hello",)]
        if not targets or self._transport is None:
            return False
        for request in targets:
            self._transport.send(encode("cancel", None, {"request": request.id}))
        transport = self._transport
        transport.call_later(self.cancel_grace, lambda: self._kill_if_pending(transport, targets))
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the worker (politely, then by force after `timeout`); pending requests fail."""
        transport = self._transport
        if transport is None:
            return
        request = self._request("shutdown", {})
        self._send(request, {})
        try:
            request.wait(timeout)
        except (MedSAM2Error, TimeoutError):
            pass
        if self._transport is transport:
            transport.close(timeout=2.0)
        if self._transport is transport:  # close() normally reports the exit; make sure we end stopped
            self.on_exit("the worker was shut down")

    def kill(self) -> None:
        """Stop the worker at once, process tree and all (Slicer closing or reloading must not wait on it)."""
        transport = self._transport
        if transport is not None:
            transport.kill()
            if self._transport is transport:
                self.on_exit("the worker was stopped")

    def pump(self, timeout: float = 0.0) -> None:
        """Dispatch what the worker sent (used by Request.wait(); Qt's event loop does this in Slicer)."""
        if self._transport is None:
            time.sleep(min(timeout, 0.01))
            return
        self._transport.pump(timeout)

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._transport.stderr_tail) if self._transport else []

    # ---- events from the transport ----

    def on_frame(self, frame: Frame) -> None:
        if frame.type == "notice":  # a word on the state, e.g. the service's queue; "" when it no longer holds
            self.notice = frame.fields.get("message", "")
            return
        request = self._pending.get(frame.id)
        if request is None:
            if frame.type == "error":
                log.warning("worker: %s", frame.fields.get("message"))
            return
        if frame.type == "slice":
            from .engine import SliceMask

            f = frame.fields
            request._slice(SliceMask(f["index"], frame.arrays["mask"], f["completed"], f["total"], f.get("object", 0)))
            return
        del self._pending[frame.id]
        request.reply = frame.fields
        if frame.type == "done":
            self._done(request, frame)
        elif frame.type == "cancelled":
            request.fail(PropagationCancelled(frame.fields.get("completed", request.completed)))
        elif frame.type == "error":
            kind = frame.fields.get("kind")
            message = frame.fields.get("message") or f"{request.type} failed"
            self._failed(request, ERRORS_BY_KIND.get(kind, MedSAM2Error)(message))
        else:
            self._failed(request, WorkerError(f"unexpected '{frame.type}' reply to {request.type}"))
        self._update_state()

    def on_exit(self, message: str) -> None:
        """The worker is gone: every pending request fails now; the next request starts a new worker."""
        self._transport = None
        self._hello_done = False
        self._worker_has_model = False
        self._worker_volumes.clear()
        pending, self._pending = list(self._pending.values()), {}
        for request in pending:
            if request.cancelling and request.type == "propagate":
                request.fail(PropagationCancelled(request.completed))
            elif request.cancelling:
                request.fail(WorkerError(f"{request.type} cancelled: the worker did not stop in time and was killed"))
            else:
                what = "starting the worker" if request.type == "hello" else request.type
                request.fail(WorkerError(f"{what} failed: {message}"))
        self._update_state()

    # ---- internals ----

    def _request(self, type: str, callbacks: dict, on_slice=None) -> Request:
        unknown = set(callbacks) - {"on_done", "on_error"}
        if unknown:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(unknown))}")
        request = Request(self, type, on_slice=on_slice, **callbacks)
        request.id, self._next_id = self._next_id, self._next_id + 1
        return request

    def _send(self, request: Request, fields: dict, arrays: dict | None = None) -> None:
        if request.done or self._transport is None:
            return
        request.fields = fields
        self._pending[request.id] = request
        self._update_state()
        self._transport.send(encode(request.type, request.id, fields, arrays))

    def _start_worker(self, parent: Request) -> None:
        """Start a worker if none runs; the handshake runs first and its failure fails `parent`."""
        if self._transport is not None:
            return
        self._transport = self.transport_factory(self)
        self._update_state()
        try:
            self._transport.start()
        except OSError as exc:  # e.g. the Python executable is missing
            self._transport = None
            self._update_state()
            parent.fail(WorkerError(f"could not start the worker: {exc}"))
            return
        hello = self._internal("hello", parent)
        self._send(hello, {"version": PROTOCOL_VERSION})
        self._check_heartbeat(self._transport, time.monotonic())

    def _submit(self, request: Request, volume_id: str, fields: Callable[[], tuple[dict, dict]]) -> Request:
        """Check the arguments (failing the request on bad ones), then send it after what the worker lacks."""
        try:
            values, arrays = fields()
        except (TypeError, ValueError) as exc:  # BadInputError is a ValueError
            request.fail(exc if isinstance(exc, BadInputError) else BadInputError(f"{request.type}: {exc}"))
            return request
        if self._prepare(request, volume_id):
            self._send(request, values, arrays)
        return request

    def _prepare(self, request: Request, volume_id: str) -> bool:
        """Start the worker and (re)send the model and the volume it lacks; False if the request failed."""
        if volume_id not in self._volumes:
            request.fail(BadInputError(f"unknown volume '{volume_id}': call set_volume first"))
            return False
        self._start_worker(request)
        if request.done:
            return False
        if not self._worker_has_model and self._model_args is not None:
            self._worker_has_model = True
            self._send(self._internal("load_model", request), self._model_args)
        if volume_id not in self._worker_volumes:
            self._send_volume(self._internal("set_volume", request), volume_id)
        return not request.done

    def _send_volume(self, request: Request, volume_id: str) -> None:
        if self._transport is not None:
            self._worker_volumes.add(volume_id)
        self._send(request, {"volume_id": volume_id}, {"volume": self._volumes[volume_id]})

    def _internal(self, type: str, parent: Request) -> Request:
        """A request the client sends on its own; if it fails, `parent` fails with the same error."""
        request = self._request(type, {})
        request.then(on_error=parent.fail)
        return request

    def _done(self, request: Request, frame: Frame) -> None:
        if request.type == "hello":
            self._hello_done = True
            self.worker_info = frame.fields
            request.finish(frame.fields)
        elif request.type == "segment_2d":
            request.finish(frame.arrays["mask"])
        elif request.type == "propagate":
            request.finish(list(frame.fields.get("completed", request.completed)))
        else:
            request.finish(frame.fields)

    def _failed(self, request: Request, error: MedSAM2Error) -> None:
        """Fail a request and forget what the worker did not take from it."""
        if request.type == "load_model" and self._model_args is request.fields:
            if isinstance(error, OutOfMemoryError):
                self._worker_has_model = False  # tried again before the next request
            else:  # a checkpoint that cannot load is not re-sent; the worker kept the model it had
                self._model_args, self._worker_has_model = self._previous_model
        elif request.type == "set_volume":
            self._worker_volumes.discard(request.fields.get("volume_id"))
            if isinstance(error, BadInputError):
                self._volumes.pop(request.fields.get("volume_id"), None)
        request.fail(error)
        if request.type == "hello" and self._transport is not None:
            self._transport.kill()  # a worker that speaks another protocol version is of no use

    def _kill_if_pending(self, transport: Transport, targets: list[Request]) -> None:
        if self._transport is transport and any(not r.done for r in targets):
            for request in targets:
                request.cancelling = True
            log.warning("the worker did not stop within %.1f s of cancel: killing it", self.cancel_grace)
            transport.kill()

    def _check_heartbeat(self, transport: Transport, due: float) -> None:
        """Every second: a worker silent for heartbeat_timeout s is stopped or hung, so kill it and fail its requests.

        Its heartbeat comes from a thread of its own, so a long computation does not silence it.
        """
        if self._transport is not transport:
            return
        now = time.monotonic()
        if now - due > HEARTBEAT_SECONDS:  # this check ran late: we were not reading, so the silence may be ours
            transport.last_heard = now
        silence = now - transport.last_heard
        if silence < self.heartbeat_timeout:
            transport.call_later(HEARTBEAT_SECONDS, lambda: self._check_heartbeat(transport, now + HEARTBEAT_SECONDS))
            return
        log.warning("the worker sent nothing for %.0f s: killing it", silence)
        transport.kill()
        transport.ended(f"the worker stopped answering (no heartbeat for {silence:.0f} s) and was killed")

    def _update_state(self) -> None:
        if self._transport is None:
            state = "stopped"
        elif not self._hello_done:
            state = "starting"
        elif any(r.type == "load_model" for r in self._pending.values()):
            state = "loading"
        elif any(r.type not in BACKGROUND_REQUESTS for r in self._pending.values()):
            state = "busy"
        else:
            state = "ready"
        if state != self.state:
            self.state = state
            _call(self.on_state_changed, state)


def _numbers(values) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise BadInputError(f"expected a list of numbers, got {values!r}") from None


def _window(window):
    return list(window) if isinstance(window, (tuple, list)) else str(window)
