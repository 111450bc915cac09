"""The seed's part names for scripts/start.sh and scripts/stop.sh: its browser UI's part was 'gradio', which here
is the web viewer's part ('web')."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service_fixtures import free_port
from test_service_scripts import run

pytestmark = pytest.mark.unit


def test_gradio_is_the_web_viewers_part_for_start_and_stop(tmp_path):
    """A stand-in web process (an HTTP server answering /readyz) keeps this cheap: start.sh finds it running as
    'web' and reports it ready, stop.sh stops it.
    """
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "readyz").write_text("ok")
    port = free_port()
    stand_in = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                                 str(tmp_path / "site")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (tmp_path / "run" / "pids").mkdir(parents=True)
        (tmp_path / "run" / "pids" / "web.pid").write_text(str(stand_in.pid))
        env = {**os.environ, "MEDSAM2HITL_RUN_DIR": str(tmp_path / "run"), "MEDSAM2HITL_WEB_PORT": str(port)}
        started = run("start.sh", env, "gradio")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"web: already running (pid {stand_in.pid})" in started.stdout
        assert f"ready: web viewer http://127.0.0.1:{port}" in started.stdout
        stopped = run("stop.sh", env, "gradio")
        assert f"web: stopped (pid {stand_in.pid})" in stopped.stdout, stopped.stdout + stopped.stderr
        assert stand_in.wait(10) is not None
        unknown = run("start.sh", env, "jupyter")
        assert unknown.returncode == 2 and "web (gradio)" in unknown.stderr
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
            stand_in.wait(10)
