"""Kill a process together with everything it started, and notice a parent that is gone, on Windows, Linux and macOS.

Needed because the worker may sit behind a launcher (PythonSlicer starts the real Python as its child):
killing only the process we started would leave the model-holding child running.
"""

from __future__ import annotations

import os
import subprocess


def own_group_options() -> dict:
    """Popen keyword arguments that give the child its own process group, so its whole tree can be signalled."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (children first), from psutil when installed, else from `ps`; [] if neither works."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    if os.name == "nt":
        return []  # taskkill /T walks the tree itself
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """Forcefully stop `pid` and all its descendants; processes already gone are ignored."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False,
                       creationflags=subprocess.CREATE_NO_WINDOW)  # no console window flashing up in Slicer
        return
    import signal

    tree = [pid, *descendants(pid)]  # listed before killing: orphans get re-parented and the links are lost
    try:
        if os.getpgid(pid) == pid:  # a group leader (started with own_group_options): catches unlisted members too
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def parent_watch():
    """A function telling whether this process's parent still runs; lets a worker outlive no client.

    POSIX hands an orphan to another parent, so its parent pid changes. Windows does not, and reuses pids, so
    there a handle to the parent, opened now, is asked whether it has exited.
    """
    parent = os.getppid()
    if os.name != "nt":
        return lambda: os.getppid() == parent
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.OpenProcess.restype = ctypes.c_void_p
    kernel32.WaitForSingleObject.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    handle = kernel32.OpenProcess(0x00100000, False, parent)  # SYNCHRONIZE: enough to wait on it
    if not handle:
        return lambda: True  # not ours to watch: the end of input still tells
    return lambda: kernel32.WaitForSingleObject(handle, 0) != 0  # 0 (WAIT_OBJECT_0): it has exited
