"""One request to the worker, as front ends hold it: the callbacks, the result or error, the slices so far.

Its own module because the logic composes requests of its own (several worker requests behind one) and every
transport's replies end here; it knows the client only as the thing that pumps while `wait()` waits.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from . import slice_rules
from .errors import MedSAM2Error

if TYPE_CHECKING:
    from .worker_client import WorkerClient

log = logging.getLogger(__name__)


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
            run_callback(on_done if self.error is None else on_error, self.result if self.error is None else self.error)
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
        slice_rules.note_completed(self.completed, item.index)
        run_callback(self.on_slice, item)

    def finish(self, result) -> None:
        """End with a result (also used by requests that the logic composes from worker requests)."""
        if not self.done:
            self.done, self.result = True, result
            for callback in self._on_done:
                run_callback(callback, result)

    def fail(self, error: MedSAM2Error) -> None:
        """End with an error; the first of finish/fail wins."""
        if not self.done:
            self.done, self.error = True, error
            for callback in self._on_error:
                run_callback(callback, error)


def run_callback(callback, argument) -> None:
    """Run a caller's callback; its exception is logged so it cannot break frame dispatch."""
    if callback is None:
        return
    try:
        callback(argument)
    except Exception:
        log.exception("callback %r failed", callback)
