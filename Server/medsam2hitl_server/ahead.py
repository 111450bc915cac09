"""Encoding ahead while the user draws, without ever delaying a real request.

A Celery worker cannot see the tasks it has already reserved, so the API counts them: every real request sent to
a worker raises that worker's count of waiting requests, and the worker lowers it when the task starts. A
prefetch runs only while the count is zero and while it is the worker's latest prefetch (the user moved on
otherwise), and its encoder asks again before each block, so a real request waits at most one encoder block.
"""

from __future__ import annotations

import redis

from .store import KEY

PREFETCH_TASK = "medsam2hitl.prefetch"
_STARTED = "local n = tonumber(redis.call('get', KEYS[1]) or '0') if n > 0 then redis.call('decr', KEYS[1]) end"


def _waiting_key(worker: str) -> str:
    return f"{KEY}:waiting:{worker}"


def _latest_key(worker: str) -> str:
    return f"{KEY}:prefetch:{worker}"


def sending(client: redis.Redis, worker: str, task: str) -> None:
    """Note a task about to be queued for `worker`: a real one waits (a prefetch is no request of the user's)."""
    if task != PREFETCH_TASK:
        client.incr(_waiting_key(worker))


def latest(client: redis.Redis, worker: str, request_id: str) -> None:
    """This prefetch replaces any earlier one of `worker` that has not finished."""
    client.set(_latest_key(worker), request_id)


def not_sent(client: redis.Redis, worker: str, task: str) -> None:
    """Undo `sending` for a task the broker refused."""
    if task != PREFETCH_TASK:
        started(client, worker, task)


def started(client: redis.Redis, worker: str, task: str) -> None:
    """A real task of `worker` starts: one fewer waits (never below zero, e.g. for a task delivered twice)."""
    if task != PREFETCH_TASK:
        client.eval(_STARTED, 1, _waiting_key(worker))


def reset(client: redis.Redis, worker: str) -> None:
    """A worker (re)starts with nothing reserved: a count left by an earlier process of that name goes."""
    client.delete(_waiting_key(worker))


def gives_way(client: redis.Redis, worker: str, request_id: str) -> bool:
    """Whether a prefetch must stop: a real request waits, or a newer prefetch replaced it."""
    waiting, latest = client.mget(_waiting_key(worker), _latest_key(worker))
    return int(waiting or 0) > 0 or latest != request_id
