"""scripts/start.sh and scripts/stop.sh as the README uses them: everything up with the fixture model, URLs
printed, and stop.sh stopping what start.sh started (and a Redis it did not start left alone)."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from conftest import REPO
from service_fixtures import free_port, redis_server

pytestmark = pytest.mark.service


def run(script: str, env: dict, *parts: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / script), *parts], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)


def test_start_everything_then_stop_only_what_was_started(tmp_path):
    api_port, redis_port = free_port(), free_port()
    env = {**os.environ, "MEDSAM2HITL_RUN_DIR": str(tmp_path / "run"), "MEDSAM2HITL_PORT": str(api_port),
           "MEDSAM2HITL_REDIS_PORT": str(redis_port), "MEDSAM2HITL_THREADS": "1"}
    started = run("start.sh", env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"ready: API http://127.0.0.1:{api_port}" in started.stdout and "/docs" in started.stdout
        assert httpx.get(f"http://127.0.0.1:{api_port}/readyz").json()["workers"] == 1
        models = httpx.get(f"http://127.0.0.1:{api_port}/api/v1/models").json()["models"]
        assert [m["name"] for m in models] == ["phantom_sam2"]  # the fixture model by default
        again = run("start.sh", env, "api")
        assert "already running" in again.stdout
    finally:
        stopped = run("stop.sh", env)
    assert stopped.returncode == 0
    assert all(f"{part}: stopped" in stopped.stdout for part in ("api", "celery", "redis")), stopped.stdout
    assert not list((tmp_path / "run" / "pids").glob("*.pid"))


def test_a_redis_that_was_already_running_is_used_and_left_alone(tmp_path):
    redis_port = free_port()
    outside = subprocess.Popen([redis_server(), "--port", str(redis_port), "--save", "", "--bind", "127.0.0.1"],
                               stdout=subprocess.DEVNULL)
    try:
        env = {**os.environ, "MEDSAM2HITL_RUN_DIR": str(tmp_path / "run"), "MEDSAM2HITL_REDIS_PORT": str(redis_port)}
        started = run("start.sh", env, "redis")
        assert "already answering" in started.stdout
        stopped = run("stop.sh", env, "redis")
        assert "not started by start.sh" in stopped.stdout
        assert outside.poll() is None
    finally:
        outside.terminate()
        outside.wait(10)
