"""A model worker on "another host": its data folder is not the API's, so it fetches the volume from the API and
sends back labels and results. The seed's flow must work unchanged for the client."""

from __future__ import annotations

import numpy as np
import pytest

from service_fixtures import Service
from test_service import Upload, create_job, dice, download, read_events

pytestmark = pytest.mark.service

WORKER_TOKEN = "worker-token-for-tests"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("service_remote")
    running = Service(folder, extra_env={"MEDSAM2HITL_WORKER_TOKEN": WORKER_TOKEN})
    running.worker_folder = folder / "worker-data"
    running.start(workers=1, worker_env={"MEDSAM2HITL_DATA_DIR": str(running.worker_folder),
                                         "MEDSAM2HITL_API_URL": running.url})
    yield running
    running.stop()


def test_a_worker_without_the_api_data_folder_fetches_the_volume_and_sends_results_back(service):
    case = Upload(51)
    with service.client() as client:
        job_id = create_job(client, case.data)
        api_copy = service.folder / "data" / "jobs" / job_id
        worker_copy = service.worker_folder / "jobs" / job_id
        (uploaded,) = api_copy.glob("volume.*")
        assert (worker_copy / uploaded.name).read_bytes() == uploaded.read_bytes()

        body = {"box_ras": case.box_ras, "window": "abdomen"}
        assert client.post(f"/api/v1/jobs/{job_id}/segment-2d", json=body).status_code == 200
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json=body)
        assert read_events(client, job_id, started.json()["events_after"])[-1][0] == "done"
        assert (api_copy / "labels.npy").is_file()  # sent back: a worker taking over starts from it
        assert np.array_equal(np.load(api_copy / "labels.npy"), np.load(worker_copy / "labels.npy"))

        labels = np.asarray(download(client, job_id).dataobj) > 0
        assert (api_copy / "result.nii.gz").is_file()
        assert dice(labels, case.truth) >= 0.8


def test_worker_file_routes_need_the_worker_token(service):
    case = Upload(52)
    with service.client() as client:
        job_id = create_job(client, case.data)
        (uploaded,) = (service.folder / "data" / "jobs" / job_id).glob("volume.*")
        route = f"/api/v1/internal/jobs/{job_id}/files/{uploaded.name}"
        assert client.get(route).status_code == 404
        assert client.get(route, headers={"Authorization": "Bearer wrong"}).status_code == 404
        worker = {"Authorization": f"Bearer {WORKER_TOKEN}"}
        assert client.get(route, headers=worker).status_code == 200
        assert client.put(route, headers=worker, content=b"x").status_code == 403
        assert client.get(f"/api/v1/internal/jobs/{job_id}/files/..%2f..%2fetc%2fpasswd",
                          headers=worker).status_code == 404
        assert client.put(f"/api/v1/internal/jobs/{job_id}/files/evil.py", headers=worker,
                          content=b"x").status_code == 404
