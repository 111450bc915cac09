"""Faults on the live service: a second propagate, cancel, a worker killed mid-propagation, Redis restarting,
expiry and deletion. Two workers, so that a job whose worker dies moves to the other one."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from service_fixtures import Service, wait_for
from test_service import SIZE, Upload, create_job, dice, download, iter_events, read_events

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service_faults")).start(workers=2)
    yield running
    running.stop()


def slices_of(labels_kji: np.ndarray) -> set[int]:
    return {k for k in range(labels_kji.shape[0]) if labels_kji[k].any()}


def result_kji(client, job_id) -> np.ndarray:
    """The downloaded labels in the phantom's [k, j, i] order (identity grid)."""
    return (np.asarray(download(client, job_id).dataobj) > 0).transpose(2, 1, 0)


def test_second_propagate_is_409_and_cancel_keeps_the_finished_slices(service):
    case = Upload(31)
    with service.client() as client:
        job_id = create_job(client, case.data)
        body = {"box_ras": case.box_ras, "window": "abdomen"}
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json=body)
        assert started.status_code == 202
        again = client.post(f"/api/v1/jobs/{job_id}/propagate", json=body)
        assert again.status_code == 409 and "already running" in again.json()["detail"]
        assert client.post(f"/api/v1/jobs/{job_id}/segment-2d", json=body).status_code == 409

        events, done = [], threading.Event()

        def follow():
            with service.client() as reading:
                for event in iter_events(reading, job_id, started.json()["events_after"]):
                    events.append(event)
            done.set()

        reader = threading.Thread(target=follow)
        reader.start()
        wait_for(lambda: sum(kind == "slice" for kind, _ in list(events)) >= 3, 120, "three slices")
        with service.client() as other:
            assert other.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
        reader.join(60)
        assert done.is_set() and events[-1][0] == "cancelled"
        reported = {data["slice"] for kind, data in events if kind == "slice"}
        assert 3 <= len(reported) < SIZE[0]
        status = client.get(f"/api/v1/jobs/{job_id}/status").json()
        assert status["state"] == "cancelled"
        assert slices_of(result_kji(client, job_id)) >= reported
        again = client.post(f"/api/v1/jobs/{job_id}/propagate", json=body)  # accepted again after the cancel
        assert again.status_code == 202
        assert read_events(client, job_id, again.json()["events_after"])[-1][0] == "done"


def test_worker_killed_mid_propagation_fails_the_job_within_15_s_and_another_worker_takes_over(service):
    case = Upload(32)
    with service.client() as client:
        job_id = create_job(client, case.data)
        first_worker = client.get(f"/api/v1/jobs/{job_id}/status").json()["worker"]
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json={"box_ras": case.box_ras, "window": "abdomen"})
        events: list = []

        def follow():
            with service.client() as reading:
                for event in iter_events(reading, job_id, started.json()["events_after"]):
                    events.append(event)

        reader = threading.Thread(target=follow)
        reader.start()
        wait_for(lambda: sum(kind == "slice" for kind, _ in list(events)) >= 4 or
                 client.get(f"/api/v1/jobs/{job_id}/status").json()["progress"]["done"] >= 4, 120, "four slices")
        killed_at = time.monotonic()
        service.kill(first_worker, signal.SIGKILL)
        status = wait_for(lambda: (s := client.get(f"/api/v1/jobs/{job_id}/status").json())["state"] == "failed"
                          and s, 20, "the job saying failed")
        assert time.monotonic() - killed_at < 15
        assert "worker stopped" in status["error"]
        reader.join(30)
        reported = {data["slice"] for kind, data in events if kind == "slice"}
        assert events[-1][0] == "error" and len(reported) >= 4

        moved = wait_for(lambda: (s := client.get(f"/api/v1/jobs/{job_id}/status").json())["loaded"] and s, 60,
                         "the job moving to the other worker")
        assert moved["worker"] not in (None, first_worker)
        kept = result_kji(client, job_id)
        assert slices_of(kept) >= reported  # every slice the client saw is in the result
        found = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json={"box_ras": case.box_ras, "window": "abdomen"})
        assert found.status_code == 200  # the user keeps working without re-uploading
    service.start_worker(first_worker)  # back to two workers for the next tests


def test_a_worker_restarted_under_the_dead_ones_name_fails_its_propagation_and_serves_the_job(tmp_path):
    """A container restarted as the same pid, or a fixed MEDSAM2HITL_WORKER_NAME: the name beats again before the
    old heartbeat lapses (300 s here), so only the new process can tell that the propagation is lost."""
    service = Service(tmp_path, extra_env={"MEDSAM2HITL_WORKER_DEAD_AFTER_SECONDS": "300"}).start(workers=1)
    try:
        case = Upload(33)
        with service.client() as client:
            job_id = create_job(client, case.data)
            body = {"box_ras": case.box_ras, "window": "abdomen"}
            started = client.post(f"/api/v1/jobs/{job_id}/propagate", json=body)
            wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}/status").json()["progress"]["done"] >= 3, 120,
                     "three slices")
            service.kill("w0", signal.SIGKILL)
            service.start_worker("w0")
            status = wait_for(lambda: (s := client.get(f"/api/v1/jobs/{job_id}/status").json())["state"] == "failed"
                              and s, 90, "the job saying failed")
            assert "worker stopped" in status["error"]
            reported = {data["slice"] for kind, data in read_events(client, job_id, started.json()["events_after"])
                        if kind == "slice"}
            assert len(reported) >= 3
            wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}/status").json()["loaded"], 60, "the job loaded again")
            assert slices_of(result_kji(client, job_id)) >= reported
            assert client.post(f"/api/v1/jobs/{job_id}/segment-2d", json=body).status_code == 200
    finally:
        service.stop()


def test_redis_restart_gives_503_meanwhile_and_recovers_by_itself(service):
    case = Upload(33)
    with service.client() as client:
        job_id = create_job(client, case.data)
        service.kill("redis", signal.SIGTERM)
        down = client.get(f"/api/v1/jobs/{job_id}/status")
        assert down.status_code == 503 and "Redis" in down.json()["detail"]
        assert client.get("/readyz").status_code == 503
        service.start_redis()
        wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}/status").status_code == 200, 30, "the API recovering")
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "the workers coming back")
        found = wait_for(lambda: (r := client.post(f"/api/v1/jobs/{job_id}/segment-2d",
                                                   json={"box_ras": case.box_ras, "window": "abdomen"})
                                  ).status_code == 200 and r, 60, "a 2D request succeeding again")
        assert sum(found.json()["mask"]["counts"][1::2]) > 50


def test_expired_job_answers_410_and_its_files_are_gone(service):
    case = Upload(34)
    with service.client() as client:
        response = client.post("/api/v1/jobs", params={"ttl": 2}, content=case.data)
        assert response.status_code == 201 and response.json()["expires_in"] == 2
        job_id = response.json()["id"]
        folder = service.folder / "data" / "jobs" / job_id
        assert folder.is_dir()
        wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}/status").status_code == 410, 15, "expiry")
        assert "expired" in client.get(f"/api/v1/jobs/{job_id}/result").json()["detail"]
        assert not folder.exists()


def test_delete_purges_files_and_keys(service):
    case = Upload(35)
    with service.client() as client:
        job_id = create_job(client, case.data)
        folder = service.folder / "data" / "jobs" / job_id
        assert client.post(f"/api/v1/jobs/{job_id}/segment-2d",
                           json={"box_ras": case.box_ras, "window": "abdomen"}).status_code == 200
        assert (folder / "labels.npy").is_file()
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
        assert not folder.exists()
        assert client.get(f"/api/v1/jobs/{job_id}/status").status_code == 404
        import redis

        keys = redis.Redis(port=service.redis_port).keys(f"*{job_id}*")
        assert keys == []


def test_two_clients_at_once_never_cross_and_the_second_box_is_warm(service):
    cases = [Upload(41), Upload(42)]
    results: dict[int, dict] = {}

    def work(n: int):
        case = cases[n]
        with service.client() as client:
            job_id = create_job(client, case.data)
            body = {"box_ras": case.box_ras, "window": "abdomen"}
            first = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json=body).json()
            body["box_ras"] = [v + d for v, d in zip(case.box_ras, (-1, -1, 0, 1, 1, 0))]
            second = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json=body).json()
            started = client.post(f"/api/v1/jobs/{job_id}/propagate", json=body)
            read_events(client, job_id, started.json()["events_after"], until=("done",))
            results[n] = {"first": first, "second": second, "labels": result_kji(client, job_id)}

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(results) == [0, 1]
    for n, other in ((0, 1), (1, 0)):
        mine = results[n]
        assert dice(mine["labels"], cases[n].phantom.mask) >= 0.8
        assert dice(mine["labels"], cases[other].phantom.mask) < 0.3
        assert not mine["first"]["embedding_cached"] and mine["second"]["embedding_cached"]
        print(f"job {n}: first box {mine['first']['seconds'] * 1000:.1f} ms, "
              f"second box on the same slice {mine['second']['seconds'] * 1000:.1f} ms (warm embedding)")


def test_a_redelivered_propagation_task_runs_once(service):
    """The broker may deliver a task again (visibility timeout); the second delivery must do nothing."""
    import redis

    from medsam2hitl_server.celery_app import make_app, worker_queue
    from medsam2hitl_server.schemas import Propagate

    case = Upload(36)
    with service.client() as client:
        job_id = create_job(client, case.data)
        worker = client.get(f"/api/v1/jobs/{job_id}/status").json()["worker"]
        celery = make_app(service.env["MEDSAM2HITL_REDIS_URL"])
        params = Propagate.model_validate({"view": "axial", "box_ras": case.box_ras, "window": "abdomen",
                                           "early_stop": False}).params()  # what the API sends the worker
        redis.Redis(port=service.redis_port).set(f"m2h:job:{job_id}:busy", "redelivered-1")  # as the API locks
        for _ in range(2):
            celery.send_task("medsam2hitl.propagate", args=[job_id, "redelivered-1", params],
                             queue=worker_queue(worker))
        assert read_events(client, job_id, "0-0", until=("done",))[-1][0] == "done"
        wait_for(lambda: redis.Redis(port=service.redis_port).llen(worker_queue(worker)) == 0, 30, "queue empty")
        time.sleep(2)  # a second run, if there were one, would have started and streamed by now
    stream = redis.Redis(port=service.redis_port, decode_responses=True).xrange(f"m2h:job:{job_id}:events")
    kinds = [fields["type"] for _, fields in stream]
    assert kinds.count("slice") == SIZE[0] and kinds.count("done") == 1
