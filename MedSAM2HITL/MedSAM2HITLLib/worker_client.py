"""Client of the long-lived background worker: asynchronous requests, streamed slices, cancel, and restart.

Requests return at once with a `Request`; results and per-slice masks arrive through callbacks that run on the
thread that pumps the transport (the caller of `Request.wait()` for subprocess pipes, Qt's main thread in
Slicer). The client starts the worker on demand, re-sends the model and volumes to a restarted one, kills a
worker that ignores cancel or stops its heartbeat, and fails the requests of one that died.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from .errors import BadInputError, MedSAM2Error, ModelError, OutOfMemoryError, PropagationCancelled
from .protocol import HEARTBEAT_SECONDS, PROTOCOL_VERSION, Frame, encode
from .subprocess_transport import SubprocessTransport
from .worker_request import Request, run_callback
from .worker_transport import Transport

log = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = 5.0
HEARTBEAT_TIMEOUT_SECONDS = 30.0
BACKGROUND_REQUESTS = ("status", "prefetch")  # never make the worker "busy", never cancelled
ERRORS_BY_KIND = {cls.kind: cls for cls in (BadInputError, ModelError, OutOfMemoryError)}


class WorkerError(MedSAM2Error):
    """The worker process failed as a whole (died, was killed, or sent something unreadable)."""

    kind = "internal"


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
            run_callback(self.on_state_changed, state)


def _numbers(values) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise BadInputError(f"expected a list of numbers, got {values!r}") from None


def _window(window):
    return list(window) if isinstance(window, (tuple, list)) else str(window)
