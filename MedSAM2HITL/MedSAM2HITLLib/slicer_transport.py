"""Worker transport inside 3D Slicer: the worker as a long-lived ParallelProcessing `Processes.Process` (QProcess).

Qt reads the worker's output on the main thread (readyRead signals), so frames are decoded and dispatched there
and request callbacks may touch MRML. Decoding, the stderr tail and exit reporting are `Transport`'s, shared with
the subprocess transport. qt and Processes are imported only when a transport is made, so this module imports
anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .client import Transport
from .process_tree import kill_tree

WORKER_SCRIPT = Path(__file__).with_name("worker.py")


def slicer_transport_factory(python: str = "PythonSlicer", script: Path = WORKER_SCRIPT) -> Callable:
    """A `WorkerClient(transport_factory=...)` argument that runs `PythonSlicer worker.py` as a kept-alive Process."""
    try:
        import qt
        from Processes import Process
    except ImportError as exc:
        raise ImportError(
            f"the Slicer worker transport needs 3D Slicer with the ParallelProcessing extension ({exc}); "
            "outside Slicer use the default SubprocessTransport"
        ) from exc

    class WorkerProcess(Process):
        """A Process that stays alive: requests are written while it runs, output is read as it arrives.

        Process.run() would write one pickled input, close stdin and read stdout once at exit; this class starts
        the process itself and never uses those steps.
        """

        def __init__(self, transport: "SlicerTransport"):
            super().__init__(str(script))
            self.name = "MedSAM2 worker"
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

        def prepareProcessInput(self) -> bytes:
            return b""  # requests are sent one by one through SlicerTransport.send

        def useProcessOutput(self, processOutput) -> None:
            pass  # output is dispatched as it arrives

    class SlicerTransport(Transport):
        def __init__(self, handler):
            super().__init__(handler)
            self.process = WorkerProcess(self)

        def start(self) -> None:
            self.process.start(python, [str(script)])

        def send(self, buffers: list) -> None:
            self.process.write(qt.QByteArray(b"".join(bytes(buffer) for buffer in buffers)))

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
