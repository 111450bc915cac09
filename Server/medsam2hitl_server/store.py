"""Job records, the per-job event stream and the worker registry, under our own keys in Redis.

Celery's task states cannot tell an unknown job from a waiting one, so the job's truth lives here: one hash per
job, a stream of its events (ids double as SSE ids), a lock while a propagation runs, and one heartbeat key per
worker that expires when the worker stops.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass

import redis

KEY = "m2h"
STATES = ("queued", "ready", "running", "succeeded", "failed", "cancelled", "expired")
EVENTS_KEPT = 20_000  # per job; a propagation sends one event per slice
TOMBSTONE_SECONDS = 7 * 24 * 3600  # how long an expired job answers 410 instead of 404
PROPAGATION_LOST = ("the worker stopped during the propagation; the finished slices are kept — "
                    "propagate again to continue")


def job_key(job_id: str) -> str:
    return f"{KEY}:job:{job_id}"


def owner_of(token: str | None) -> str:
    """What a job stores about its creator: a hash of the token, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


@dataclass(frozen=True)
class JobRecord:
    """A job as the store holds it, read from its hash with each field in its own type."""

    id: str
    owner: str
    state: str
    created: float
    expires: float
    volume_file: str
    header: dict  # the upload's summary: shape_ijk, dtype
    geometry: dict | None  # the worker's geometry of the volume, once loaded
    worker: str  # '' while no live worker holds it
    binding: str  # changes at each (re)binding: a worker's older copy of the volume is stale
    loaded: bool
    done: int
    total: int
    error: str
    task: str  # the last Celery task sent for it
    objects: list[dict]
    labels_event: str  # the last slice event the saved labels include

    @classmethod
    def from_hash(cls, job_id: str, fields: dict[str, str]) -> JobRecord:
        loads = json.loads
        return cls(id=job_id, owner=fields["owner"], state=fields["state"], created=float(fields["created"]),
                   expires=float(fields["expires"]), volume_file=fields["volume_file"],
                   header=loads(fields["header"]), geometry=loads(fields["geometry"]) if fields.get("geometry")
                   else None, worker=fields.get("worker", ""), binding=fields.get("binding", ""),
                   loaded=fields.get("loaded") == "1", done=int(fields.get("done", 0)),
                   total=int(fields.get("total", 0)), error=fields.get("error", ""), task=fields.get("task", ""),
                   objects=loads(fields.get("objects") or "[]"), labels_event=fields.get("labels_event") or "0-0")


@dataclass
class Worker:
    name: str
    queue: str
    jobs: int
    info: dict


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=2,
                                health_check_interval=10)


class JobStore:
    """Everything the API and the workers say to each other about jobs, besides the task messages themselves."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 24 * 3600, dead_after_seconds: int = 8):
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self.dead_after_seconds = dead_after_seconds

    # jobs -----------------------------------------------------------------------------------------------------

    def create(self, job_id: str, owner: str, volume_file: str, header: dict, ttl_seconds: int) -> None:
        now = time.time()
        record = {
            "state": "queued", "owner": owner, "created": now, "expires": now + ttl_seconds,
            "volume_file": volume_file, "header": json.dumps(header), "worker": "", "loaded": 0,
            "done": 0, "total": 0, "error": "", "propagation": "",
        }
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=record)
        pipe.zadd(f"{KEY}:jobs", {job_id: now + ttl_seconds})
        pipe.execute()
        self.event(job_id, "state", {"state": "queued"})

    def ping(self) -> None:
        """Raises redis.RedisError when Redis does not answer."""
        self.redis.ping()

    def queue_length(self, queue: str) -> int:
        return int(self.redis.llen(queue))

    def housekeeping_turn(self) -> bool:
        """Whether this API process does the next round of housekeeping (one at a time across processes)."""
        return bool(self.redis.set(f"{KEY}:reaper", 1, nx=True, px=3000))

    def housekeeping_done(self) -> None:
        self.redis.delete(f"{KEY}:reaper")

    def get(self, job_id: str) -> JobRecord | None:
        fields = self.redis.hgetall(job_key(job_id))
        return JobRecord.from_hash(job_id, fields) if fields else None

    def update(self, job_id: str, **fields) -> None:
        """Change fields of an existing job (never re-creates a purged one)."""
        values = {k: json.dumps(v) if isinstance(v, (dict, list)) else (int(v) if isinstance(v, bool) else v)
                  for k, v in fields.items()}
        script = "if redis.call('exists', KEYS[1]) == 1 then redis.call('hset', KEYS[1], unpack(ARGV)) end"
        flat = [item for pair in values.items() for item in pair]
        self.redis.eval(script, 1, job_key(job_id), *flat)

    def set_state(self, job_id: str, state: str, **fields) -> None:
        assert state in STATES, state
        self.update(job_id, state=state, **fields)
        self.event(job_id, "state", {"state": state, **{k: v for k, v in fields.items() if k == "error"}})

    def is_expired(self, job_id: str) -> bool:
        return bool(self.redis.exists(f"{KEY}:expired:{job_id}"))

    def due_for_purge(self, now: float | None = None) -> list[str]:
        return list(self.redis.zrangebyscore(f"{KEY}:jobs", "-inf", now or time.time()))

    def forget(self, job_id: str, expired: bool) -> None:
        """Remove every key of a job; an expired one leaves a tombstone so clients get 410, not 404."""
        record = self.get(job_id)
        pipe = self.redis.pipeline()
        pipe.delete(job_key(job_id), f"{job_key(job_id)}:events", f"{job_key(job_id)}:busy",
                    f"{job_key(job_id)}:cancel")
        pipe.zrem(f"{KEY}:jobs", job_id)
        pipe.srem(f"{KEY}:unbound", job_id)
        if record is not None and record.worker:
            pipe.srem(f"{KEY}:worker-jobs:{record.worker}", job_id)
        if expired:
            pipe.set(f"{KEY}:expired:{job_id}", 1, ex=TOMBSTONE_SECONDS)
        pipe.execute()

    # propagation lock and cancel flag ---------------------------------------------------------------------------

    def try_lock(self, job_id: str, propagation_id: str) -> bool:
        """Take the job's propagation lock; False when another propagation holds it (the API answers 409)."""
        return bool(self.redis.set(f"{job_key(job_id)}:busy", propagation_id, nx=True, ex=self.ttl_seconds))

    def holder(self, job_id: str) -> str | None:
        return self.redis.get(f"{job_key(job_id)}:busy")

    def unlock(self, job_id: str, propagation_id: str) -> bool:
        """Release the lock if `propagation_id` holds it; False when it no longer did (job deleted, or the API
        gave the propagation up when its worker stopped answering)."""
        script = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1], KEYS[2]) end "
                  "return 0")
        return bool(self.redis.eval(script, 2, f"{job_key(job_id)}:busy", f"{job_key(job_id)}:cancel",
                                    propagation_id))

    def request_cancel(self, job_id: str) -> bool:
        holder = self.holder(job_id)
        if holder:
            self.redis.set(f"{job_key(job_id)}:cancel", holder, ex=3600)
        return holder is not None

    def cancel_requested(self, job_id: str, propagation_id: str) -> bool:
        """True when the propagation must stop: cancelled, or no longer holding the job's lock (deleted, given up)."""
        cancel, holder = self.redis.mget(f"{job_key(job_id)}:cancel", f"{job_key(job_id)}:busy")
        return cancel == propagation_id or holder != propagation_id

    # events ------------------------------------------------------------------------------------------------------

    def event(self, job_id: str, kind: str, data: dict, holder: str | None = None) -> str | None:
        """Append an event to an existing job's stream (and, with `holder`, only while that propagation holds the
        job's lock); None when it was not appended: a deleted job's stream is never re-created."""
        script = ("if redis.call('exists', KEYS[1]) == 0 "
                  "or (ARGV[4] ~= '' and redis.call('get', KEYS[3]) ~= ARGV[4]) then return false end "
                  "local id = redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', "
                  "'type', ARGV[1], 'data', ARGV[2]) "
                  "redis.call('expire', KEYS[2], ARGV[5]) return id")
        key = job_key(job_id)
        return self.redis.eval(script, 3, key, f"{key}:events", f"{key}:busy", kind, json.dumps(data), EVENTS_KEPT,
                               holder or "", self.ttl_seconds + 3600)

    def last_event_id(self, job_id: str) -> str:
        entries = self.redis.xrevrange(f"{job_key(job_id)}:events", count=1)
        return entries[0][0] if entries else "0-0"

    def events_since(self, job_id: str, after: str) -> list[tuple[str, str, str]]:
        """All events after `after`, oldest first (no waiting)."""
        entries = self.redis.xrange(f"{job_key(job_id)}:events", min=f"({after}", max="+")
        return [(entry_id, fields["type"], fields["data"]) for entry_id, fields in entries]

    def events_after(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, str, str]]:
        found = self.redis.xread({f"{job_key(job_id)}:events": after}, count=200, block=block_ms)
        return [(entry_id, fields["type"], fields["data"]) for _, entries in found for entry_id, fields in entries]

    # one-shot claims and replies ---------------------------------------------------------------------------------

    def claim(self, request_id: str) -> bool:
        """True the first time only: a task the broker delivers again must not run twice."""
        return bool(self.redis.set(f"{KEY}:claimed:{request_id}", 1, nx=True, ex=self.ttl_seconds))

    def reply(self, request_id: str, payload: dict) -> None:
        key = f"{KEY}:reply:{request_id}"
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps(payload))
        pipe.expire(key, 300)
        pipe.execute()

    def wait_reply(self, request_id: str, seconds: float) -> dict | None:
        found = self.redis.blpop([f"{KEY}:reply:{request_id}"], timeout=seconds)
        return json.loads(found[1]) if found else None

    # workers -----------------------------------------------------------------------------------------------------

    def heartbeat(self, name: str, queue: str, info: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.set(f"{KEY}:worker:{name}", json.dumps({"queue": queue, **info}), ex=self.dead_after_seconds)
        pipe.sadd(f"{KEY}:workers", name)
        pipe.execute()

    def worker_gone(self, name: str) -> None:
        self.redis.delete(f"{KEY}:worker:{name}")

    def replaced(self, host: str, pid: int, successor: str) -> list[str]:
        """Declare dead the workers of `host` whose process was `pid` (one its supervisor saw exit), now rather
        than when their heartbeat lapses; the API then moves their jobs as for any stopped worker. Returns them."""
        gone = [w.name for w in self.workers()
                if w.name != successor and w.info.get("host") == host and w.info.get("pid") == pid]
        for name in gone:
            self.worker_gone(name)
        return gone

    def alive(self, name: str) -> bool:
        return bool(name) and bool(self.redis.exists(f"{KEY}:worker:{name}"))

    def workers(self) -> list[Worker]:
        names = sorted(self.redis.smembers(f"{KEY}:workers"))
        if not names:
            return []
        pipe = self.redis.pipeline()
        for name in names:
            pipe.get(f"{KEY}:worker:{name}")
            pipe.scard(f"{KEY}:worker-jobs:{name}")
        values = pipe.execute()
        found = []
        for name, raw, jobs in zip(names, values[::2], values[1::2]):
            if raw:
                info = json.loads(raw)
                found.append(Worker(name, info.pop("queue"), int(jobs), info))
        return found

    def dead_workers(self) -> list[str]:
        alive = {w.name for w in self.workers()}
        return [name for name in self.redis.smembers(f"{KEY}:workers") if name not in alive]

    def bind(self, job_id: str, worker: Worker | None) -> None:
        """Give a job to a worker (or park it until one is alive). Each binding gets a new `binding` id: a worker
        holding the job's volume from an earlier binding drops that copy and reloads the stored labels."""
        record = self.get(job_id)
        if record is None:
            return
        pipe = self.redis.pipeline()
        if record.worker:
            pipe.srem(f"{KEY}:worker-jobs:{record.worker}", job_id)
        if worker is None:
            pipe.sadd(f"{KEY}:unbound", job_id)
        else:
            pipe.srem(f"{KEY}:unbound", job_id)
            pipe.sadd(f"{KEY}:worker-jobs:{worker.name}", job_id)
        pipe.execute()
        self.update(job_id, worker=worker.name if worker else "", loaded=False, binding=uuid.uuid4().hex)

    def orphaned(self, job_id: str) -> None:
        """A job whose worker stopped: a running propagation ends as failed (its slices are kept)."""
        holder = self.holder(job_id)
        if holder and self.get(job_id) is not None:
            self.unlock(job_id, holder)
            self.set_state(job_id, "failed", error=PROPAGATION_LOST)
            self.event(job_id, "error", {"propagation": holder, "kind": "worker_lost", "message": PROPAGATION_LOST})

    def jobs_of(self, worker_name: str) -> list[str]:
        return list(self.redis.smembers(f"{KEY}:worker-jobs:{worker_name}"))

    def unbound(self) -> list[str]:
        return list(self.redis.smembers(f"{KEY}:unbound"))

    def drop_worker(self, name: str) -> None:
        self.redis.srem(f"{KEY}:workers", name)
        self.redis.delete(f"{KEY}:worker-jobs:{name}")

    def queue_position(self, queue: str, task_id: str) -> int | None:
        """0-based place of a task among the messages waiting in a worker's queue (kombu keeps a Redis list)."""
        for position, raw in enumerate(reversed(self.redis.lrange(queue, 0, -1))):
            try:
                if json.loads(raw).get("headers", {}).get("id") == task_id:
                    return position
            except ValueError:
                continue
        return None
