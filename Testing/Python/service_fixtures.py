"""A live inference service for tests: its own redis-server, Celery model worker(s) and API, on loopback.

Everything is a real process started here and stopped at the end. Under CI (CI=true) a missing redis-server is
an error, never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import DATA, REPO

FIXTURE_CHECKPOINT = DATA / "phantom_sam2.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server is not installed: apt-get install redis-server (Debian/Ubuntu), "
                           "brew install redis (macOS); .ci/run installs it")
    return found


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen within {seconds} s")


class Service:
    """Redis + API + workers, each a process; workers can be added, killed and restarted by tests."""

    def __init__(self, folder: Path, tokens: str = "", extra_env: dict | None = None):
        self.folder = folder
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.env = {**os.environ, "MEDSAM2HITL_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                    "MEDSAM2HITL_DATA_DIR": str(folder / "data"), "MEDSAM2HITL_TOKENS": tokens,
                    "MEDSAM2HITL_PORT": str(self.api_port), "MEDSAM2HITL_HOST": "127.0.0.1",
                    "MEDSAM2HITL_CHECKPOINT": str(FIXTURE_CHECKPOINT), "MEDSAM2HITL_DEVICE": "cpu",
                    "MEDSAM2HITL_THREADS": "1", "MEDSAM2HITL_WORKER_HEARTBEAT_SECONDS": "1",
                    "MEDSAM2HITL_WORKER_DEAD_AFTER_SECONDS": "4", "PYTHONUNBUFFERED": "1",
                    **(extra_env or {})}
        self.processes: dict[str, subprocess.Popen] = {}
        self.token = tokens.split(",")[0] if tokens else ""

    def start(self, workers: int = 1, worker_env: dict | None = None, ready_seconds: float = 90) -> "Service":
        self.start_redis()
        for index in range(workers):
            self.start_worker(f"w{index}", worker_env)
        self.start_process("api", [sys.executable, "-m", "medsam2hitl_server", "api"])
        wait_for(lambda: httpx.get(f"{self.url}/readyz").status_code == 200, ready_seconds, "the service becoming ready")
        return self

    def start_redis(self) -> None:
        (self.folder / "redis").mkdir(exist_ok=True)
        self.start_process("redis", [redis_server(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "yes", "--dir", str(self.folder / "redis")])
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.redis_port), 0.2), 10, "redis answering")

    def start_worker(self, name: str, env: dict | None = None) -> None:
        self.start_process(name, [sys.executable, "-m", "medsam2hitl_server", "worker", "--loglevel", "WARNING"],
                           {"MEDSAM2HITL_WORKER_NAME": name, **(env or {})})

    def start_process(self, name: str, command: list[str], env: dict | None = None) -> None:
        log = open(self.folder / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(command, cwd=REPO, env={**self.env, **(env or {})},
                                                stdout=log, stderr=subprocess.STDOUT)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        process.send_signal(sig)
        process.wait(30)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def client(self, token: str | None = None, timeout: float = 120) -> httpx.Client:
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        for name in [n for n in self.processes if n != "redis"] + (["redis"] if "redis" in self.processes else []):
            process = self.processes.pop(name)
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
