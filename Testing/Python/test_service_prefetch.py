"""Encoding ahead through the service: POST /jobs/{id}/prefetch, with the random-init MedSAM2 at 256 (its encoder
is slow enough on a CPU that a prefetch which did not give way would visibly delay the request behind it).

A prefetch fills the worker's embedding cache so the box costs only the decoder; it never delays or reorders a
real request: dropped when one waits, abandoned between encoder blocks when one arrives, replaced by a newer one.
"""

from __future__ import annotations

import json
import statistics
import time

import nibabel as nib
import numpy as np
import pytest
import redis

from service_fixtures import Service, wait_for
from test_service import create_job

pytestmark = pytest.mark.service

SLICES = 24
BOX = [8, 8, 40, 40]


@pytest.fixture(scope="module")
def service(tmp_path_factory, random_checkpoint):
    running = Service(tmp_path_factory.mktemp("service_prefetch"),
                      extra_env={"MEDSAM2HITL_CHECKPOINT": str(random_checkpoint)}).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def job(service):
    volume = np.random.default_rng(5).normal(300, 60, (48, 48, SLICES)).astype(np.int16)
    with service.client() as client:
        return create_job(client, nib.Nifti1Image(volume, np.eye(4)).to_bytes())


@pytest.fixture(scope="module")
def replies(service):
    """The prefetch replies, as the worker leaves them in Redis (no client waits for them)."""
    store = redis.Redis(port=service.redis_port, decode_responses=True)

    def reply(prefetch_id: str, seconds: float = 60) -> dict:
        found = store.blpop([f"m2h:reply:{prefetch_id}"], timeout=seconds)
        assert found is not None, "the prefetch never finished"
        return json.loads(found[1])

    reply.store = store
    return reply


def prefetch(client, job_id: str, index: int) -> str:
    response = client.post(f"/api/v1/jobs/{job_id}/prefetch", json={"view": "axial", "slice": index})
    assert response.status_code == 202, response.text
    return response.json()["prefetch"]


def segment(client, job_id: str, index: int) -> tuple[float, dict]:
    """Seconds from sending a box to its mask, and the reply."""
    started = time.perf_counter()
    response = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json={"view": "axial", "slice": index, "box": BOX})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started, response.json()


def test_a_prefetched_slice_and_its_neighbours_cost_only_the_decoder(service, job, replies):
    with service.client() as client:
        prefetch_id = prefetch(client, job, 5)
        assert replies(prefetch_id) == {"ok": {"encoded": [5, 6, 4, 7, 3], "gave_way": False}}
        for index in (5, 7, 3):
            assert segment(client, job, index)[1]["embedding_cached"] is True
        assert segment(client, job, 12)[1]["embedding_cached"] is False
        assert client.post(f"/api/v1/jobs/{job}/prefetch", json={"slice": 99}).status_code == 400
        refused = client.post(f"/api/v1/jobs/{job}/prefetch", json={"slice": 2, "box": BOX})
        assert refused.status_code == 422 and "box" in refused.text


def test_a_box_sent_while_a_prefetch_encodes_waits_at_most_one_block(service, job, replies):
    with service.client() as client:
        cold = statistics.median(segment(client, job, index)[0] for index in (14, 16, 18))
        prefetch_id = prefetch(client, job, 21)
        wait_for(lambda: replies.store.exists(f"m2h:claimed:{prefetch_id}"), 30, "the prefetch starting")
        seconds, reply = segment(client, job, 9)
        assert replies.store.llen(f"m2h:reply:{prefetch_id}") == 1  # it ended before the box was answered
        outcome = replies(prefetch_id)["ok"]
    print(f"box behind an encoding prefetch: {seconds:.3f} s; cold: {cold:.3f} s; prefetch {outcome}")
    assert outcome["gave_way"] is True and len(outcome["encoded"]) < 4
    assert reply["embedding_cached"] is False and reply["slice"] == 9
    assert seconds <= 1.5 * cold + 0.2, f"the box took {seconds:.2f} s behind a prefetch, {cold:.2f} s cold"


def test_a_burst_of_prefetches_never_delays_a_box(service, job, replies):
    with service.client() as client:
        cold = statistics.median(segment(client, job, index)[0] for index in (0, 1, 2))
        burst = [prefetch(client, job, index) for index in (23, 22, 21, 20, 19, 18)]
        seconds, reply = segment(client, job, 11)
        outcomes = [replies(prefetch_id)["ok"] for prefetch_id in burst]
    print(f"box behind a burst of 6 prefetches: {seconds:.3f} s; cold: {cold:.3f} s")
    assert all(outcome["gave_way"] for outcome in outcomes), outcomes
    assert sum(len(outcome["encoded"]) for outcome in outcomes) < 5, outcomes
    assert reply["embedding_cached"] is False
    assert seconds <= 1.5 * cold + 0.2, f"the box took {seconds:.2f} s behind a burst, {cold:.2f} s cold"
