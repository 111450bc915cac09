"""The base of every worker transport: bytes from a worker process become frames, a stderr tail and one exit.

Subclasses (a subprocess with pipes, Slicer's QProcess, the inference service) only start the worker and move
bytes; the decoding, the stderr tail kept for error messages and the single exit report are shared here.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from .protocol import FrameReader, ProtocolError

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20
MAX_LINE_BYTES = 2000


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
