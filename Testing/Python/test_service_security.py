"""What a hospital's security review tries against a live service (redis-server, two Celery workers, the API):
uploads that name files on the server, masks that crashed the shared worker, a DELETE during a propagation, a
worker that comes back after its job moved, and what the access log shows."""

from __future__ import annotations

import gzip
import signal
import threading
import time

import httpx
import nibabel as nib
import numpy as np
import pytest
import redis

from service_fixtures import Service, wait_for
from test_service import SIZE, Upload, create_job, download, iter_events
from test_untrusted_volumes import detached_mha, detached_nrrd, nifti_pair, with_non_finite

from MedSAM2HITLLib import mask_codec
from MedSAM2HITLLib.errors import BadInputError

pytestmark = pytest.mark.service

TOKEN = "security-token-for-tests"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service_security"), tokens=TOKEN)
    try:
        running.start(workers=2)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def job(service):
    case = Upload(51)
    with service.client() as client:
        return create_job(client, case.data), case


def job_keys(service, job_id: str) -> list[str]:
    return list(redis.Redis(port=service.redis_port).scan_iter(match=f"*{job_id}*", count=1000))


def post(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/api/v1/jobs", content=data, headers={"Content-Type": "application/octet-stream"})


@pytest.mark.parametrize("make", [lambda folder: detached_nrrd(folder, "/etc/passwd"),
                                  lambda folder: detached_mha(folder, "../../../../etc/passwd"), nifti_pair],
                         ids=["nrrd_data_file", "mha_element_data_file", "nifti_hdr_img"])
def test_an_upload_naming_a_file_on_the_server_is_refused(service, tmp_path, make):
    jobs = service.folder / "data" / "jobs"
    before = set(jobs.glob("*"))
    with service.client() as client:
        response = post(client, make(tmp_path).read_bytes())
    assert response.status_code == 400 and "detached data file" in response.json()["detail"]
    assert set(jobs.glob("*")) == before


def test_the_worker_refuses_a_detached_header_that_reached_the_data_folder_by_other_means(service, tmp_path):
    """The worker's loader checks again, before Slicer's reader sees the file."""
    from medsam2hitl_server.session import WorkerSession, job_dir
    from medsam2hitl_server.settings import Settings

    settings = Settings(data_dir=tmp_path)
    folder = job_dir(settings, "placed")
    folder.mkdir(parents=True)
    detached_nrrd(folder, "/etc/passwd")
    with pytest.raises(BadInputError, match="detached data file"):
        WorkerSession(settings).open("placed", "volume.nrrd")


@pytest.mark.parametrize("case", ["nan_nifti", "gzip_trailing_zeros"])
def test_nan_voxels_and_a_gzip_bomb_are_refused_at_upload(service, case):
    if case == "nan_nifti":
        data, words = gzip.compress(nib.Nifti1Image(with_non_finite(), np.eye(4)).to_bytes()), "NaN or infinite"
    else:
        raw = nib.Nifti1Image(np.ones((8, 8, 8), np.int16), np.eye(4)).to_bytes()
        data, words = gzip.compress(raw + b"\0" * (256 << 20)), "beyond the"  # 256 MB inflated, 250 kB sent
    with service.client() as client:
        response = post(client, data)
    assert response.status_code == 400 and words in response.json()["detail"], response.text


CRASHING_COUNTS = {"wraps_int64": [0, 2**62, 2**62, 2**62, 2**62 + 4096], "over_uint64": [0, 2**64]}


@pytest.mark.parametrize("name", sorted(CRASHING_COUNTS))
def test_masks_that_crashed_the_shared_worker_are_refused_and_it_stays_alive(service, job, name):
    job_id, case = job
    key = case.phantom.key_index
    mask = {"shape": [SIZE[1], SIZE[2]], "counts": CRASHING_COUNTS[name]}
    pids = {n: p.pid for n, p in service.processes.items() if n.startswith("w")}
    with service.client() as client:
        written = client.put(f"/api/v1/jobs/{job_id}/slices", json={"slice": key, "mask": mask})
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json={"slice": key, "mask": mask})
        for response in (written, started):
            assert response.status_code == 422 and "run length of a mask must be a whole number from 0 to " \
                f"{SIZE[1] * SIZE[2]}" in response.json()["detail"], response.text
        found = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json={"box_ras": case.box_ras, "window": "abdomen"})
        assert found.status_code == 200, found.text
    assert all(service.processes[n].poll() is None and service.processes[n].pid == pid for n, pid in pids.items())


@pytest.mark.parametrize("body, field", [({"slice": True}, "slice"), ({"slice": 1.0}, "slice"),
                                         ({"slice": "1"}, "slice"),
                                         ({"slice": 1, "mask": {"shape": [SIZE[1], SIZE[2]],
                                                                "counts": [0, True, SIZE[1] * SIZE[2] - 1]}},
                                          "mask.counts.1")])
def test_a_bool_float_or_string_is_not_taken_for_a_whole_number(service, job, body, field):
    job_id, case = job
    body = {"mask": {"shape": [SIZE[1], SIZE[2]], "counts": [SIZE[1] * SIZE[2]]}, **body}
    with service.client() as client:
        response = client.put(f"/api/v1/jobs/{job_id}/slices", json=body)
    assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}: "), response.text


def test_delete_during_a_propagation_stops_it_and_leaves_no_key_no_file_no_traceback(service):
    case = Upload(52)
    with service.client() as client:
        job_id = create_job(client, case.data)
        worker = client.get(f"/api/v1/jobs/{job_id}/status").json()["worker"]
        folder = service.folder / "data" / "jobs" / job_id
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json={"box_ras": case.box_ras, "window": "abdomen"})
        assert started.status_code == 202
        events: list = []
        reader = threading.Thread(target=lambda: events.extend(
            iter_events(service.client(), job_id, started.json()["events_after"], seconds=60)))
        reader.start()
        wait_for(lambda: sum(kind == "slice" for kind, _ in list(events)) >= 2, 120, "two slices")
        deleted_at = time.monotonic()
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
        reader.join(30)
        assert not reader.is_alive()  # the event stream of a deleted job ends
        idle = wait_for(lambda: not next(w for w in client.get("/api/v1/models").json()["workers"]
                                         if w["name"] == worker)["busy"], 30, "the worker stopping")
        stopped_after = time.monotonic() - deleted_at
        time.sleep(2)  # anything the worker would still write, it would have written by now
        assert client.get(f"/api/v1/jobs/{job_id}/status").status_code == 404
    assert idle and stopped_after < 10, f"the propagation ran {stopped_after:.1f} s after DELETE"
    assert job_keys(service, job_id) == []
    assert not folder.exists()
    assert "Traceback" not in service.log(worker)
    print(f"DELETE to worker idle: {stopped_after:.1f} s (the worker's busy flag beats every second)")


def test_a_worker_that_comes_back_serves_the_edits_made_while_it_was_stalled(service):
    """F4: stall X until the job moves to Y; on Y clear one slice and draw another; resume X and kill Y, so that
    the job returns to X: X must drop its own copy and serve Y's labels."""
    case = Upload(53)
    rows, cols = SIZE[1], SIZE[2]
    square = np.zeros((rows, cols), bool)
    square[20:40, 30:50] = True
    with service.client() as client:
        wait_for(lambda: len(client.get("/api/v1/models").json()["workers"]) == 2, 120, "both workers up")
        job_id = create_job(client, case.data)
        x = client.get(f"/api/v1/jobs/{job_id}/status").json()["worker"]
        y = next(name for name in service.processes if name.startswith("w") and name != x)
        for index in (5, 6):
            assert client.put(f"/api/v1/jobs/{job_id}/slices",
                              json={"slice": index, "mask": mask_codec.encode(square)}).status_code == 200
        service.processes[x].send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: (s := client.get(f"/api/v1/jobs/{job_id}/status").json())["worker"] == y and s["loaded"],
                     60, "the job moving to the other worker")
            for index, mask in ((5, np.zeros_like(square)), (9, square)):
                assert client.put(f"/api/v1/jobs/{job_id}/slices",
                                  json={"slice": index, "mask": mask_codec.encode(mask)}).status_code == 200
        finally:
            service.processes[x].send_signal(signal.SIGCONT)
        wait_for(lambda: x in {w["name"] for w in client.get("/api/v1/models").json()["workers"]}, 30,
                 "the stalled worker beating again")
        service.kill(y)
        wait_for(lambda: (s := client.get(f"/api/v1/jobs/{job_id}/status").json())["worker"] == x and s["loaded"],
                 60, "the job returning to the first worker")
        labels = (np.asarray(download(client, job_id).dataobj) > 0).transpose(2, 1, 0)
    service.start_worker(y)
    assert {k for k in range(labels.shape[0]) if labels[k].any()} == {6, 9}
    assert (labels[9] == square).all()


def test_the_access_log_holds_no_query_string_and_a_disconnect_is_one_line(service):
    import socket

    secret = "never-in-the-log-0123456789"
    with service.client() as client:
        assert client.get("/api/v1/models", params={"token": secret}).status_code == 200
    with socket.create_connection(("127.0.0.1", service.api_port)) as connection:
        connection.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                           + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
                           + b"NRRD0004\n" + b"\0" * 1000)
        time.sleep(1)
    wait_for(lambda: "upload abandoned: the client disconnected" in service.log("api"), 10, "the disconnect")
    log = service.log("api")
    assert secret not in log and '"GET /api/v1/models HTTP/1.1" 200' in log
    assert "Traceback" not in log
