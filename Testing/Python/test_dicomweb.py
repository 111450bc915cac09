"""From the PACS and back, against a real Orthanc: a CT series stored there is segmented through DICOMweb
(`segment --dicomweb URL --series UID`), the SEG is stored back (--store) and, retrieved from Orthanc, maps onto the
series exactly as the NIfTI labelmap. Refusals: unknown series, PACS unreachable, refused login; no credentials
in any output; the same through the service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from dicom_fixtures import check_seg_against_labelmap, write_ct_series
from orthanc_fixtures import PASSWORD, USER, Orthanc
from service_fixtures import free_port
from test_cli import cli

COMMON = ["--window", "abdomen", "--checkpoint", str(DATA / "phantom_sam2.pt"), "--device", "cpu", "--threads", "2"]
LOGIN = {"MEDSAM2HITL_DICOMWEB_USER": USER, "MEDSAM2HITL_DICOMWEB_PASSWORD": PASSWORD}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pacs")
    orthanc = Orthanc(folder / "orthanc")
    series = write_ct_series(folder / "ct", seed=11, size=(18, 48, 48))
    orthanc.upload(sorted(series.folder.glob("*.dcm")))
    yield orthanc, series
    orthanc.stop()


def test_a_series_from_the_pacs_is_segmented_and_its_seg_stored_back(pacs, tmp_path):
    orthanc, series = pacs
    seg, labelmap = tmp_path / "result.dcm", tmp_path / "labels.nii.gz"
    result = cli("segment", "--dicomweb", orthanc.dicomweb_url, "--series", series.series_uid, "--box-ras",
                 *series.target_box_ras(), "--name", "Lesion", "--propagate", *COMMON, "-o", str(seg),
                 "--labelmap", str(labelmap), "--store", env=LOGIN)
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr

    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    client = DICOMwebClient(orthanc.dicomweb_url, session=create_session_from_user_pass(USER, PASSWORD))
    found = client.search_for_series(series.study_uid, search_filters={"Modality": "SEG"})
    assert len(found) == 1
    stored_series = found[0]["0020000E"]["Value"][0]
    [stored] = client.retrieve_series(series.study_uid, stored_series)
    retrieved = tmp_path / "retrieved.dcm"
    stored.save_as(retrieved, enforce_file_format=True)
    labels = check_seg_against_labelmap(retrieved, series, labelmap, ["Lesion"])
    assert labels.sum() > 50


@pytest.mark.parametrize("case, message", [
    ("unknown series", "has no series 1.2.3.4.5.6"),
    ("unreachable", "is unreachable"),
    ("wrong password", "refused the credentials (401)"),
])
def test_pacs_refusals_exit_2_with_one_line_and_no_credentials(case, message, pacs, tmp_path):
    orthanc, series = pacs
    url, uid, login = orthanc.dicomweb_url, series.series_uid, dict(LOGIN)
    if case == "unknown series":  # logged in by the URL's user:password@ this time
        uid, login = "1.2.3.4.5.6", {}
        url = url.replace("http://", f"http://{USER}:{PASSWORD}@")
    elif case == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/dicom-web"
    else:
        login["MEDSAM2HITL_DICOMWEB_PASSWORD"] = "wrong-password-9c1e"
    result = cli("segment", "--dicomweb", url, "--series", uid, "--box-ras", *series.target_box_ras(), *COMMON,
                 "-o", str(tmp_path / "x.dcm"), env=login)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 1  # "retrieving ..." then the error
    for secret in (PASSWORD, "wrong-password-9c1e", USER):
        assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "x.dcm").exists()


# The service: a job made from the PACS series, its result as a DICOM SEG, stored back.

@pytest.fixture(scope="module")
def service(pacs, tmp_path_factory):
    from service_fixtures import Service

    orthanc, _ = pacs
    running = Service(tmp_path_factory.mktemp("service"), extra_env={
        "MEDSAM2HITL_DICOMWEB_URL": orthanc.dicomweb_url, "MEDSAM2HITL_DICOMWEB_USER": USER,
        "MEDSAM2HITL_DICOMWEB_PASSWORD": PASSWORD, "MEDSAM2HITL_DICOMWEB_STORE": "1"}).start()
    yield running
    running.stop()


def dicomweb_job(client, series_uid: str):
    return client.post("/api/v1/jobs", json={"dicomweb": {"series": series_uid}})


def test_a_service_job_from_the_pacs_gives_a_seg_that_is_stored_back(pacs, service, tmp_path):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass
    from service_fixtures import wait_for
    from test_service import read_events

    orthanc, series = pacs
    box_ras = [float(v) for v in series.target_box_ras()]
    with service.client() as client:
        created = dicomweb_job(client, series.series_uid)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        wait_for(lambda: client.get(f"/api/v1/jobs/{job_id}/status").json()["loaded"], 60, "the volume loading")
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json={"box_ras": box_ras, "window": "abdomen"})
        assert started.status_code == 202, started.text
        assert read_events(client, job_id, started.json()["events_after"])[-1][0] == "done"
        nifti = client.get(f"/api/v1/jobs/{job_id}/result")
        seg = client.get(f"/api/v1/jobs/{job_id}/result", params={"format": "dicom-seg", "segment_name": "Lesion"})
        assert nifti.status_code == 200 and seg.status_code == 200, seg.text
        (tmp_path / "labels.nii.gz").write_bytes(nifti.content)
        (tmp_path / "seg.dcm").write_bytes(seg.content)
        labels = check_seg_against_labelmap(tmp_path / "seg.dcm", series, tmp_path / "labels.nii.gz", ["Lesion"])
        assert np.count_nonzero(labels.any(axis=(1, 2))) >= 5

        stored = client.post(f"/api/v1/jobs/{job_id}/result/store", params={"segment_name": "Lesion"})
        assert stored.status_code == 200, stored.text
    pacs_client = DICOMwebClient(orthanc.dicomweb_url, session=create_session_from_user_pass(USER, PASSWORD))
    [found] = pacs_client.search_for_instances(series.study_uid, search_filters={
        "SOPInstanceUID": stored.json()["stored"]})
    instance = pacs_client.retrieve_instance(series.study_uid, found["0020000E"]["Value"][0],
                                             stored.json()["stored"])
    instance.save_as(tmp_path / "from_pacs.dcm", enforce_file_format=True)
    assert np.array_equal(check_seg_against_labelmap(tmp_path / "from_pacs.dcm", series, tmp_path / "labels.nii.gz",
                                                     ["Lesion"]), labels)
    for name in ("api", "w0"):
        assert PASSWORD not in service.log(name)


def test_service_refusals_non_dicom_job_unknown_series_unreachable_pacs_store_off(pacs, service):
    import dataclasses

    import nibabel as nib
    from fastapi.testclient import TestClient
    from test_service import create_job

    from medsam2hitl_server.app import create_app
    from medsam2hitl_server.settings import Settings

    _, series = pacs
    with service.client() as client:
        job_id = create_job(client, nib.Nifti1Image(np.zeros((48, 48, 8), np.int16), np.eye(4)).to_bytes())
        refused = client.get(f"/api/v1/jobs/{job_id}/result", params={"format": "dicom-seg"})
        assert refused.status_code == 409 and "not read from DICOM" in refused.json()["detail"]
        unknown = dicomweb_job(client, "1.2.3.4.5.6")
        assert unknown.status_code == 404 and "has no series 1.2.3.4.5.6" in unknown.json()["detail"]
        assert client.post("/api/v1/jobs", json={"dicomweb": {"series": "x"}, "url": "http://evil"}).status_code == 422
    # The same job store and data behind an API whose settings name an unreachable PACS and leave storing off:
    settings = dataclasses.replace(Settings(), redis_url=service.env["MEDSAM2HITL_REDIS_URL"],
                                   data_dir=Path(service.env["MEDSAM2HITL_DATA_DIR"]),
                                   dicomweb_url=f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}/dicom-web")
    assert settings.dicomweb_store is False  # the default
    client = TestClient(create_app(settings))
    unreachable = dicomweb_job(client, series.series_uid)
    assert unreachable.status_code == 503 and "is unreachable" in unreachable.json()["detail"]
    assert PASSWORD not in unreachable.text and USER not in unreachable.text
    off = client.post(f"/api/v1/jobs/{job_id}/result/store")
    assert off.status_code == 403 and "MEDSAM2HITL_DICOMWEB_STORE=1" in off.json()["detail"]
