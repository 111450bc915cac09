"""`medsam2hitl-server api` (FastAPI on uvicorn), `medsam2hitl-server worker` (one Celery model worker), or
`medsam2hitl-server alive` (exit status 0 while a model worker of this host beats: a container health check)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from .settings import load


class NoQueryString(logging.Filter):
    """Access-log lines without the query string: a client may put a token (`?token=`) or other secrets there."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], record.args[2].partition("?")[0], *record.args[3:])
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medsam2hitl-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("api", help="serve the jobs API (MEDSAM2HITL_HOST, MEDSAM2HITL_PORT)")
    worker = commands.add_parser("worker", help="run one model worker (one process, one model, its own queue)")
    worker.add_argument("--loglevel", default="INFO")
    commands.add_parser("alive", help="exit 0 if a model worker on this host is alive (its heartbeat in Redis)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.command == "api":
        import uvicorn

        from .app import create_app

        settings = load()
        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                                access_log=True)  # configures uvicorn's loggers: the filter goes on after
        logging.getLogger("uvicorn.access").addFilter(NoQueryString())
        uvicorn.Server(config).run()
        return 0
    if args.command == "alive":
        from .store import JobStore, connect

        workers = JobStore(connect(load().redis_url)).workers()
        return 0 if any(w.info.get("host") == socket.gethostname() for w in workers) else 1
    settings = load()
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    os.environ["MEDSAM2HITL_WORKER_NAME"] = name
    from .celery_app import make_app, worker_queue

    make_app(settings.redis_url).worker_main(["worker", "--pool", "solo", "--concurrency", "1", "--queues", worker_queue(name),
                     "--hostname", f"{name}@%h", "--loglevel", args.loglevel, "--without-gossip",
                     "--without-mingle", "--without-heartbeat"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
