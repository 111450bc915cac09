"""Bad input to the live service: each case is a 4xx with a one-line JSON error, and nothing stays on disk."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from service_fixtures import Service
from test_service import Upload, create_job, read_events

TOKENS = ("alpha-token-for-tests", "beta-token-for-tests")
MAX_UPLOAD = 4 << 20
MAX_VOLUME = 16 << 20


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service_input"), tokens=",".join(TOKENS),
                      extra_env={"MEDSAM2HITL_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
                                 "MEDSAM2HITL_SERVICE_MAX_VOLUME_BYTES": str(MAX_VOLUME)}).start()
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


@pytest.mark.parametrize("case", sorted(UPLOADS))
def test_bad_upload_is_refused_and_leaves_nothing(service, case):
    jobs = service.folder / "data" / "jobs"
    before = set(jobs.glob("*"))
    with service.client() as client:
        response = client.post("/api/v1/jobs", content=UPLOADS[case](),
                               headers={"Content-Type": "application/octet-stream"})
    assert 400 <= response.status_code < 500, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) > 10
    assert set(jobs.glob("*")) == before


def test_multipart_form_upload_is_refused_with_advice(service):
    with service.client() as client:
        response = client.post("/api/v1/jobs", files={"file": ("scan.nii.gz", nifti(np.ones((8, 8, 8), np.int16)))})
    assert response.status_code == 415 and "--data-binary" in response.json()["detail"]


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
