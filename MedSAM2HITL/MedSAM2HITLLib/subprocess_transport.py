"""The local worker as a child process: `python -m MedSAM2HITLLib.worker` over stdin/stdout pipes.

The transport of the CLI, the tests and anything outside Slicer, and the base the service transport builds on.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .process_tree import kill_tree, own_group_options
from .worker_transport import Transport


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
