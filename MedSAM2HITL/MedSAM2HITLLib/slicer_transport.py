"""Worker transport inside 3D Slicer: the worker as a long-lived `qt.QProcess` running `PythonSlicer worker.py`.

Qt reads the worker's output on the main thread (readyRead signals), so frames are decoded and dispatched there
and request callbacks may touch MRML. Decoding, the stderr tail and exit reporting are `Transport`'s, shared with
the subprocess transport. A plain QProcess, not ParallelProcessing's `Process`: that class runs one pickled job
per process and only its `ProcessesLogic` (which this worker would bypass) shows processes in its panel, so the
extension would be a dependency in name only. qt is imported only when a transport is made, so this module
imports anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from .process_tree import kill_tree
from .worker_transport import Transport

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
WRITE_CHUNK_BYTES = 16 << 20


def chunks(buffers: list, size: int = WRITE_CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of `buffers` in pieces of at most `size`: a volume reaches Qt's write buffer with one copy
    alive at a time beside it, not joined into a second whole copy first."""
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        for offset in range(0, len(view), size):
            yield bytes(view[offset:offset + size])


def slicer_transport_factory(python: str = "PythonSlicer", script: Path = WORKER_SCRIPT) -> Callable:
    """A `WorkerClient(transport_factory=...)` argument that runs `PythonSlicer worker.py` in a kept-alive QProcess."""
    try:
        import qt
    except ImportError as exc:
        raise ImportError(f"the Slicer worker transport needs 3D Slicer's qt ({exc}); outside Slicer use the "
                          "default SubprocessTransport") from exc

    class WorkerProcess(qt.QProcess):
        """The worker process; its output is handed to the transport as it arrives."""

        def __init__(self, transport: "SlicerTransport"):
            super().__init__()
            self.transport = transport
            self.connect("readyReadStandardOutput()", self.onStandardOutput)
            self.connect("readyReadStandardError()", self.onStandardError)
            self.connect("finished(int,QProcess::ExitStatus)", self.onExited)
            self.connect("errorOccurred(QProcess::ProcessError)", self.onError)

        def onStandardOutput(self) -> None:
            self.transport.received(self.readAllStandardOutput().data())

        def onStandardError(self) -> None:
            self.transport.received_stderr(self.readAllStandardError().data())

        def onExited(self, exitCode: int, exitStatus) -> None:
            self.onStandardError()
            self.onStandardOutput()
            crashed = exitStatus == qt.QProcess.CrashExit
            self.transport.ended("the worker crashed or was killed" if crashed else Transport.describe_exit(exitCode))

        def onError(self, error) -> None:
            if error == qt.QProcess.FailedToStart:
                self.transport.ended(f"could not start the worker with {python}: {self.errorString()}")

    class SlicerTransport(Transport):
        def __init__(self, handler):
            super().__init__(handler)
            self.process = WorkerProcess(self)

        def start(self) -> None:
            self.process.start(python, [str(script)])

        def send(self, buffers: list) -> None:
            for piece in chunks(buffers):
                self.process.write(qt.QByteArray(piece))

        def pump(self, timeout: float) -> None:
            """For scripts that wait(): run Qt's queued events, then wait for output."""
            qt.QCoreApplication.processEvents()
            if not self._ended:
                self.process.waitForReadyRead(max(1, int(timeout * 1000)))
                qt.QCoreApplication.processEvents()

        def call_later(self, seconds: float, callback: Callable[[], None]) -> None:
            qt.QTimer.singleShot(int(seconds * 1000), callback)

        def kill(self) -> None:
            pid = self.process.processId()
            if pid:
                kill_tree(pid)  # QProcess.kill() would stop only the PythonSlicer launcher

        def close(self, timeout: float) -> None:
            self.process.closeWriteChannel()
            if not self.process.waitForFinished(int(timeout * 1000)):
                self.kill()
                self.process.waitForFinished(2000)

    return SlicerTransport
