"""Encoding ahead while the user draws: the local worker's `prefetch`, with the random-init MedSAM2 at 256.

A prefetch fills the embedding cache so the box costs only the decoder; it must never delay or reorder a real
request: it is dropped when one waits behind it and abandoned when one arrives while it encodes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.worker_client import WorkerClient

pytestmark = pytest.mark.slow

BOX = (16, 16, 47, 47)
VOLUME = (np.random.default_rng(3).normal(300, 60, (12, 64, 64))).astype(np.int16)


@pytest.fixture(scope="module")
def client(random_checkpoint):
    worker = WorkerClient()
    worker.load_model(random_checkpoint, device="cpu", threads=2).wait(180)
    worker.set_volume("v", VOLUME).wait(30)
    yield worker
    worker.shutdown()


def in_order(client: WorkerClient, requests: list) -> list[str]:
    """The requests' types in the order their answers arrived."""
    answered: list[str] = []
    for request in requests:
        request.then(lambda _, kind=request.type: answered.append(kind),
                     lambda error, kind=request.type: answered.append(f"{kind} failed: {error}"))
    for request in requests:
        request.wait(120)
    return answered


def test_a_prefetched_slice_and_its_neighbours_cost_only_the_decoder(client):
    prefetch = client.prefetch("v", 0, 5, neighbours=1)
    assert client.state == "ready"  # a prefetch never shows the worker as busy
    assert prefetch.wait(120) == {"encoded": [5, 6, 4], "gave_way": False}
    for index in (5, 6, 4):
        request = client.segment_slice("v", 0, index, BOX)
        request.wait(60)
        assert request.reply["embedding_cached"] is True
    cold = client.segment_slice("v", 0, 9, BOX)
    cold.wait(60)
    assert cold.reply["embedding_cached"] is False


def test_a_prefetch_is_abandoned_when_a_real_request_arrives_and_never_reorders(client):
    prefetch = client.prefetch("v", 1, 30, neighbours=2)
    deadline = time.monotonic() + 60
    while (client.status().wait(30)["running"] or {}).get("type") != "prefetch":
        assert time.monotonic() < deadline and not prefetch.done, "the prefetch did not start"
    segment = client.segment_slice("v", 1, 31, (2, 2, 60, 10))
    propagate = client.propagate("v", 0, 2, BOX, start=2, end=3)
    assert in_order(client, [prefetch, segment, propagate]) == ["prefetch", "segment_2d", "propagate"]
    assert prefetch.result["gave_way"] is True and len(prefetch.result["encoded"]) < 5
    assert segment.result.shape == (12, 64) and propagate.result == [2, 3]


def test_a_prefetch_with_a_request_queued_behind_it_is_dropped(client):
    propagate = client.propagate("v", 0, 6, BOX, start=6, end=8)
    prefetch = client.prefetch("v", 0, 10)
    segment = client.segment_slice("v", 0, 11, BOX)
    assert in_order(client, [propagate, prefetch, segment]) == ["propagate", "prefetch", "segment_2d"]
    assert prefetch.result == {"encoded": [], "gave_way": True}
    assert segment.reply["embedding_cached"] is False


def test_cancel_leaves_a_prefetch_alone_and_a_bad_one_fails_clearly(client):
    prefetch = client.prefetch("v", 2, 20, neighbours=1)
    assert client.cancel() is False  # nothing of the user's is running
    assert prefetch.wait(120) == {"encoded": [20, 21, 19], "gave_way": False}
    with pytest.raises(BadInputError, match="slice 99 is outside the volume"):
        client.prefetch("v", 0, 99).wait(60)
