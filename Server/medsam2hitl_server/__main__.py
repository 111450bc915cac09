"""`medsam2hitl-server api` (FastAPI on uvicorn) or `medsam2hitl-server worker` (one Celery model worker)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from .settings import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medsam2hitl-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("api", help="serve the jobs API (MEDSAM2HITL_HOST, MEDSAM2HITL_PORT)")
    worker = commands.add_parser("worker", help="run one model worker (one process, one model, its own queue)")
    worker.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.command == "api":
        import uvicorn

        from .app import create_app

        settings = load()
        app = create_app(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=True)
        return 0
    name = load().worker_name or f"{socket.gethostname()}-{os.getpid()}"
    os.environ["MEDSAM2HITL_WORKER_NAME"] = name
    from .celery_app import app, worker_queue

    app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "--queues", worker_queue(name),
                     "--hostname", f"{name}@%h", "--loglevel", args.loglevel, "--without-gossip",
                     "--without-mingle", "--without-heartbeat"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
