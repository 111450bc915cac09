"""Where a request becomes a task: binding jobs to live workers, sending tasks, waiting for replies.

Tasks go to the queue of the worker that holds the job. A job whose worker stopped is re-bound to another one,
which reloads the volume and the labels saved so far; the client keeps working without re-uploading.
"""

from __future__ import annotations

import shutil
import time
import uuid

from . import ahead
from .celery_app import make_app, worker_queue
from .errors import Unavailable, WorkerTimedOut
from .session import job_dir
from .settings import Settings
from .store import JobStore


class Dispatcher:
    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.celery = make_app(settings.redis_url)  # sends tasks only: the API never imports the tasks

    def bind(self, job_id: str) -> str | None:
        """Give the job to the least loaded live worker and have it load the volume; None if none is alive."""
        workers = self.store.workers()
        worker = min(workers, key=lambda w: (w.jobs, w.info.get("busy", False), w.name)) if workers else None
        self.store.bind(job_id, worker)
        if worker is None:
            return None
        task_id = self.send(worker.name, "medsam2hitl.load_job", job_id, str(uuid.uuid4()))
        self.store.update(job_id, task=task_id)
        return worker.name

    def send(self, worker: str, task: str, *args) -> str:
        ahead.sending(self.store.redis, worker, task)  # counted first: a prefetch running now gives way at once
        try:
            result = self.celery.send_task(task, args=list(args), queue=worker_queue(worker))
        except BaseException:
            ahead.not_sent(self.store.redis, worker, task)
            raise
        return result.id

    def prefetch(self, job_id: str, params: dict) -> str:
        """Queue an encoding ahead on the job's worker, behind what is queued; it never delays a real request."""
        worker = self.worker_of(job_id)
        request_id = str(uuid.uuid4())
        ahead.latest(self.store.redis, worker, request_id)
        self.send(worker, ahead.PREFETCH_TASK, job_id, request_id, params)
        return request_id

    def worker_of(self, job_id: str) -> str:
        """The live worker holding the job, re-binding it first when its worker has stopped."""
        record = self.store.get(job_id)
        worker = record.worker if record else ""
        if self.store.alive(worker):
            return worker
        self.store.orphaned(job_id)
        worker = self.bind(job_id)
        if worker is None:
            raise Unavailable("no model worker is running; start one (scripts/start.sh celery) and retry",
                              retry_after=5)
        return worker

    def call(self, job_id: str, task: str, *args) -> dict:
        """Run a request/reply task on the job's worker; follows the job to a new worker if its worker dies."""
        deadline = time.monotonic() + self.settings.segment_timeout_seconds
        while True:
            worker = self.worker_of(job_id)
            request_id = str(uuid.uuid4())
            task_id = self.send(worker, task, job_id, request_id, *args)
            self.store.update(job_id, task=task_id)
            while time.monotonic() < deadline:
                reply = self.store.wait_reply(request_id, 1)
                if reply is not None:
                    return reply
                if not self.store.alive(worker):
                    break
            else:
                raise WorkerTimedOut(f"no answer from the model worker in {self.settings.segment_timeout_seconds} s; "
                                     "it may be busy with other jobs — retry later")

    def purge(self, job_id: str, expired: bool) -> None:
        record = self.store.get(job_id)
        if record and record.worker and self.store.alive(record.worker):
            self.send(record.worker, "medsam2hitl.forget", job_id)
        self.store.forget(job_id, expired)  # first: a worker that then finds the folder gone sees the job gone too
        shutil.rmtree(job_dir(self.settings, job_id), ignore_errors=True)

    def reap(self) -> None:
        """One round of housekeeping: expire jobs, fail or re-bind jobs of stopped workers, bind parked jobs."""
        if not self.store.housekeeping_turn():
            return  # another API process does it
        for job_id in self.store.due_for_purge():
            self.purge(job_id, expired=True)
        for name in self.store.dead_workers():
            jobs = self.store.jobs_of(name)
            self.store.drop_worker(name)
            for job_id in jobs:
                self.store.orphaned(job_id)
                self.bind(job_id)
        if self.store.workers():
            for job_id in self.store.unbound():
                self.bind(job_id)
        self.store.housekeeping_done()
