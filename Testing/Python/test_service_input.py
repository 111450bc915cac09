"""Bad input to the live service: each case is a 4xx with a one-line JSON error, and nothing stays on disk.

Uploads come as the raw body or as a form's `file` field (the seed's clients and curl -F), under the same caps.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest

from service_fixtures import Service, wait_for
from test_service import Upload, create_job, dice, read_events

pytestmark = pytest.mark.service

TOKENS = ("alpha-token-for-tests", "beta-token-for-tests")
MAX_UPLOAD = 4 << 20
MAX_VOLUME = 16 << 20
IDLE_TIMEOUT = 2


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service_input"), tokens=",".join(TOKENS),
                      extra_env={"MEDSAM2HITL_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
                                 "MEDSAM2HITL_SERVICE_MAX_VOLUME_BYTES": str(MAX_VOLUME),
                                 "MEDSAM2HITL_UPLOAD_IDLE_TIMEOUT_SECONDS": str(IDLE_TIMEOUT)}).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def job(service):
    """A job of the first token's owner, loaded, with its phantom."""
    case = Upload(7)
    with service.client() as client:
        return create_job(client, case.data), case


def nifti(array: np.ndarray, compress: bool = True) -> bytes:
    data = nib.Nifti1Image(array, np.eye(4)).to_bytes()
    return gzip.compress(data) if compress else data


def header_bomb() -> bytes:
    """A gzipped NIfTI header that claims 2000³ int16 voxels, with no data."""
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.int16)
    raw = header.binaryblock + b"\0" * 4
    return gzip.compress(raw)


def nan_nrrd() -> bytes:
    """A float NRRD with a slice of NaN (ITK's NIfTI reader turns NaN into 0, its NRRD reader keeps it)."""
    import tempfile
    from pathlib import Path

    import SimpleITK as sitk

    values = np.random.default_rng(0).random((20, 20, 20), dtype=np.float32)
    values[5] = np.nan
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "nan.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(values), str(path), True)
        return path.read_bytes()


def png_bytes() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"\0" * 2000


UPLOADS = {
    "oversize": lambda: b"\0" * (MAX_UPLOAD + 1),
    "empty": lambda: b"",
    "header_bomb": header_bomb,
    "truncated_gzip": lambda: nifti(np.ones((30, 30, 30), np.int16))[:-200],
    "png_renamed": png_bytes,
    "png_gzipped": lambda: gzip.compress(png_bytes()),
    "volume_2d": lambda: nifti(np.ones((30, 30), np.int16)),
    "volume_4d": lambda: nifti(np.ones((20, 20, 20, 3), np.int16)),
    "nan_volume": nan_nrrd,
    "over_voxel_cap": lambda: nifti(np.zeros((256, 256, 200), np.int16)),  # 26 MB of voxels, a small gzip
}


def post_upload(client, data: bytes, form: bool):
    if form:
        return client.post("/api/v1/jobs", files={"file": ("scan.nii.gz", data, "application/gzip")})
    return client.post("/api/v1/jobs", content=data, headers={"Content-Type": "application/octet-stream"})


def job_folders(service) -> set:
    return set((service.folder / "data" / "jobs").glob("*"))


@pytest.mark.parametrize("form", [False, True], ids=["raw", "form"])
@pytest.mark.parametrize("case", sorted(UPLOADS))
def test_bad_upload_is_refused_and_leaves_nothing(service, case, form):
    before = job_folders(service)
    with service.client() as client:
        response = post_upload(client, UPLOADS[case](), form)
    assert 400 <= response.status_code < 500, response.text
    if case == "oversize":
        assert response.status_code == 413
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) > 10
    assert job_folders(service) == before


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    """A form body, written out so that tests control every byte (and can send it in pieces)."""
    body = b""
    for name, data in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"../../x\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def test_a_form_upload_stores_exactly_the_file_field(service):
    """Other fields around `file` are skipped, the client's file name is not used, and the file arrives byte-exact
    also when the body comes in small chunks without a length."""
    data = Upload(7).data
    body = multipart([("note", b"--b0undar not a boundary"), ("file", data), ("after", b"x" * 1000)])
    with service.client() as client:
        response = client.post("/api/v1/jobs", content=(body[i:i + 1000] for i in range(0, len(body), 1000)),
                               headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert response.status_code == 201, response.text
    stored = service.folder / "data" / "jobs" / response.json()["id"] / "volume.nii"
    assert stored.read_bytes() == data


@pytest.mark.parametrize("content_type, body, status, words", [
    ("multipart/form-data; boundary=b0undary", multipart([("scan", b"NRRD0004")]), 422, "no 'file' field"),
    ("multipart/form-data; boundary=b0undary", multipart([("file", b"NRRD"), ("file", b"NRRD")]), 400,
     "more than one"),
    ("multipart/form-data; boundary=b0undary", multipart([("file", b"NRRD0004")])[:-20], 400, "closing boundary"),
    ("multipart/form-data", multipart([("file", b"NRRD0004")]), 400, "no boundary"),
    ("multipart/mixed; boundary=b0undary", multipart([("file", b"NRRD0004")]), 415, "curl -F"),
    ("multipart/form-data; boundary=b0undary",
     multipart([("file", b"\0" * MAX_UPLOAD + b"\0")]), 413, "over the limit"),
])
def test_bad_forms_are_refused_and_leave_nothing(service, content_type, body, status, words):
    before = job_folders(service)
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: the stream is capped
    with service.client() as client:
        response = client.post("/api/v1/jobs", content=chunks, headers={"Content-Type": content_type})
    assert response.status_code == status and words in response.json()["detail"], response.text
    assert job_folders(service) == before


def partial_upload(service, content_type: str, sent: bytes) -> socket.socket:
    """A connection that announced a 100 kB upload and sent only `sent`."""
    connection = socket.create_connection(("127.0.0.1", service.api_port), timeout=30)
    connection.sendall(f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKENS[0]}\r\n"
                       f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n".encode() + sent)
    return connection


@pytest.mark.parametrize("form", [False, True], ids=["raw", "form"])
def test_a_stalled_upload_gets_408_its_connection_closed_and_leaves_nothing(service, form):
    before = job_folders(service)
    head = nifti(np.ones((30, 30, 30), np.int16))[:2000]
    if form:
        connection = partial_upload(service, "multipart/form-data; boundary=b0undary", multipart([("file", head)])[:500])
    else:
        connection = partial_upload(service, "application/octet-stream", head)
    started, reply = time.monotonic(), b""
    with connection:
        while chunk := connection.recv(65536):  # ends when the server closes the connection
            reply += chunk
    waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply, reply[:300]
    assert IDLE_TIMEOUT - 0.5 <= waited < IDLE_TIMEOUT + 10
    assert job_folders(service) == before


def test_a_client_that_goes_away_mid_upload_is_one_log_line(service):
    before, logged = job_folders(service), len(service.log("api"))
    partial_upload(service, "application/octet-stream", nifti(np.ones((30, 30, 30), np.int16))[:2000]).close()
    wait_for(lambda: "upload abandoned" in service.log("api")[logged:], 10, "the abandoned upload being logged")
    wait_for(lambda: job_folders(service) == before, 10, "the partial upload being removed")
    new = service.log("api")[logged:]
    assert new.count("upload abandoned: the client disconnected after") == 1 and "Traceback" not in new, new


def curl(service, *args: str) -> str:
    run = subprocess.run(["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {TOKENS[0]}", *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_the_seeds_curl_steps_with_a_form_upload(service, tmp_path):
    """README's curl steps with the seed's form upload (-F file=@scan.nii.gz): segment, propagate, download."""
    case = Upload(11)
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(gzip.compress(case.data))
    api = f"{service.url}/api/v1"
    job = json.loads(curl(service, "-F", f"file=@{scan}", f"{api}/jobs"))["id"]
    wait_for(lambda: json.loads(curl(service, f"{api}/jobs/{job}/status"))["loaded"], 60, "the volume loading")
    prompt = json.dumps({"box_ras": case.box_ras, "window": "abdomen"})
    found = json.loads(curl(service, "-H", "Content-Type: application/json", "-d", prompt, f"{api}/jobs/{job}/segment-2d"))
    key = found["slice"]
    from MedSAM2HITLLib.mask_codec import decode

    assert dice(decode(found["mask"], tuple(found["mask"]["shape"])), case.phantom.mask[key]) >= 0.7
    started = json.loads(curl(service, "-H", "Content-Type: application/json", "-d", prompt,
                              f"{api}/jobs/{job}/propagate"))
    events = subprocess.Popen(["curl", "-sN", "--max-time", "180", "-H", f"Authorization: Bearer {TOKENS[0]}",
                               f"{api}/jobs/{job}/events?after={started['events_after']}"],
                              stdout=subprocess.PIPE, text=True)
    kinds = []
    for line in events.stdout:
        if line.startswith("event: "):
            kinds.append(line[7:].strip())
            if kinds[-1] in ("done", "cancelled", "error"):
                break
    events.terminate()
    events.wait(10)
    # early stop (on by default) ends where the object ends: some slices, at most the volume's; the Dice below
    # checks that the whole object was kept
    assert kinds[-1] == "done" and 0 < kinds.count("slice") <= case.phantom.volume.shape[0], kinds[-3:]
    curl(service, "-o", str(tmp_path / "mask.nii.gz"), f"{api}/jobs/{job}/result")
    result = nib.load(tmp_path / "mask.nii.gz")
    assert np.allclose(result.affine, case.affine, atol=1e-4)
    assert dice(np.asarray(result.dataobj) > 0, case.truth) >= 0.75


@pytest.mark.parametrize("token, status", [("", 401), ("wrong-token", 401), (TOKENS[1], 404)])
def test_tokens_and_ownership(service, job, token, status):
    job_id, _ = job
    with service.client(token=token) as client:
        response = client.get(f"/api/v1/jobs/{job_id}/status")
    assert response.status_code == status
    assert "\n" not in response.json()["detail"]


@pytest.mark.parametrize("path, status", [
    ("/api/v1/jobs/not-a-uuid/status", 422),
    ("/api/v1/jobs/%2e%2e/status", 422),
    ("/api/v1/jobs/..%2f..%2fetc%2fpasswd/status", 404),
    ("/api/v1/jobs/00000000-0000-4000-8000-000000000000/status", 404),
])
def test_job_ids_are_server_made_uuids(service, path, status):
    with service.client() as client:
        response = client.get(path)
    assert response.status_code == status, response.text


def _requests(case):
    box = case.phantom.box()
    key = case.phantom.key_index
    return {
        "box_outside": ({"slice": key, "box": [500, 500, 600, 600]}, 400, "outside"),
        "box_zero": ({"slice": key, "box": [10, 10, 10, 10]}, 400, "empty"),
        "box_inverted": ({"slice": key, "box": [box[2], box[3], box[0], box[1]]}, 422, "x_min"),
        "box_nan": ({"slice": key, "box": [1, 2, "NaN", 4]}, 422, "valid number"),  # strict: no number from a string
        "box_ras_short": ({"box_ras": [1, 2, 3]}, 422, "box_ras"),
        "box_ras_huge": ({"box_ras": [0, -6e15, 1.7e308, 5e16, 4e16, 4e16]}, 400, "millimetres"),
        "box_and_box_ras": ({"slice": key, "box": list(box), "box_ras": case.box_ras}, 422, "not both"),
        "box_without_slice": ({"box": list(box)}, 422, "slice"),
        "slice_out_of_range": ({"slice": 999, "box": list(box)}, 400, "outside the volume"),
        "negative_slice": ({"slice": -1, "box": list(box)}, 422, "slice"),
        "unknown_view": ({"view": "oblique", "slice": key, "box": list(box)}, 422, "view"),
        "unknown_window": ({"slice": key, "box": list(box), "window": "liver"}, 422, "window"),
        "infinite_window": ({"slice": key, "box": list(box), "window": [400, "Infinity"]}, 422, "window"),
        "unknown_field": ({"slice": key, "box": list(box), "checkpoint": "/etc/passwd"}, 422, "checkpoint"),
    }


@pytest.mark.parametrize("case_name", sorted(_requests(Upload(7))))
def test_bad_segment_request_is_a_one_line_4xx(service, job, case_name):
    job_id, case = job
    body, status, words = _requests(case)[case_name]
    with service.client() as client:
        response = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and words in detail, detail


def test_bad_propagate_requests_are_refused_before_any_work(service, job):
    job_id, case = job
    key = case.phantom.key_index
    with service.client() as client:
        wrong_shape = client.post(f"/api/v1/jobs/{job_id}/propagate",
                                  json={"slice": key, "mask": {"shape": [3, 3], "counts": [9]}})
        bad_range = client.post(f"/api/v1/jobs/{job_id}/propagate",
                                json={"slice": key, "box": list(case.phantom.box()), "range": "custom",
                                      "start": key + 1, "end": key + 3})
        nothing_to_cancel = client.post(f"/api/v1/jobs/{job_id}/cancel")
        bad_format = client.get(f"/api/v1/jobs/{job_id}/result", params={"format": "dcm"})
    assert (wrong_shape.status_code, bad_range.status_code) == (400, 400)
    assert "mask has shape" in wrong_shape.json()["detail"] and "range" in bad_range.json()["detail"]
    assert nothing_to_cancel.status_code == 409
    assert bad_format.status_code == 422


def test_propagating_from_a_slice_without_mask_fails_with_the_reason(service, job):
    job_id, _ = job
    with service.client() as client:
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json={"slice": 0})
        assert started.status_code == 202
        events = read_events(client, job_id, started.json()["events_after"])
        status = client.get(f"/api/v1/jobs/{job_id}/status").json()
    assert events[-1][0] == "error" and "has no mask yet" in events[-1][1]["message"]
    assert status["state"] == "failed" and "has no mask yet" in status["error"]


@pytest.mark.parametrize("env, words", [
    ({"MEDSAM2HITL_HOST": "0.0.0.0", "MEDSAM2HITL_TOKENS": ""}, "without a token"),
    ({"MEDSAM2HITL_TOKENS": "t", "MEDSAM2HITL_CORS_ORIGINS": "*"}, "'*' is not allowed"),
])
def test_the_api_refuses_unsafe_settings(env, words):
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "medsam2hitl_server", "api"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and words in run.stderr
