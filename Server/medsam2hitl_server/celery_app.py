"""The Celery application: JSON messages only, one task at a time per worker, a queue per worker.

Every worker is one process holding one model (the solo pool: no fork, so nothing touches CUDA before a fork)
and consumes its own queue, `m2h.w.<worker name>`, so all tasks of a job reach the process that holds the
job's volume and slice embeddings. Results never go through a Celery result backend: replies and progress are
written to the job store.
"""

from __future__ import annotations

from celery import Celery

QUEUE_PREFIX = "m2h.w."


def worker_queue(name: str) -> str:
    return QUEUE_PREFIX + name


def make_app(redis_url: str) -> Celery:
    app = Celery("medsam2hitl", broker=redis_url, include=["medsam2hitl_server.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=1,
        task_acks_late=False,  # a task whose worker died is re-sent by the API to the job's new worker
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 6 * 3600},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue="m2h.default",
    )
    return app

