"""From the PACS and back, against a real Orthanc: a CT series stored there is segmented through DICOMweb
(`segment --dicomweb URL --series UID`), the SEG is stored back (--store) and, retrieved from Orthanc, maps onto the
series exactly as the NIfTI labelmap. Refusals: unknown series, PACS unreachable, refused login; no credentials
in any output."""

from __future__ import annotations

from pathlib import Path

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
    if case == "unknown series":
        uid = "1.2.3.4.5.6"
    elif case == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/dicom-web"
    else:
        login["MEDSAM2HITL_DICOMWEB_PASSWORD"] = "wrong-password-9c1e"
    result = cli("segment", "--dicomweb", url, "--series", uid, "--box-ras", *series.target_box_ras(), *COMMON,
                 "-o", str(tmp_path / "x.dcm"), env=login)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 1  # "retrieving ..." then the error
    assert login["MEDSAM2HITL_DICOMWEB_PASSWORD"] not in result.stdout + result.stderr
    assert not (tmp_path / "x.dcm").exists()


def test_credentials_in_the_url_are_never_shown(pacs, tmp_path):
    orthanc, series = pacs
    url = orthanc.dicomweb_url.replace("http://", f"http://{USER}:{PASSWORD}@")
    result = cli("segment", "--dicomweb", url, "--series", "1.2.3.4.5.6", "--box-ras", *series.target_box_ras(),
                 *COMMON, "-o", str(tmp_path / "x.dcm"))
    assert result.returncode == 2 and "has no series 1.2.3.4.5.6" in result.stderr  # the login in the URL worked
    assert PASSWORD not in result.stdout + result.stderr and USER not in result.stdout + result.stderr
