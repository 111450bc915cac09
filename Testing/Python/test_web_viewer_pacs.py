"""The web viewer's PACS panel in a real browser (chromium via Playwright) against a live service whose DICOMweb
server is a real Orthanc: the list shows the stored series without patient data, choosing it opens the volume the
worker reads, a box and S segment it, and the DICOM SEG download maps onto the series as the NIfTI download does.
The box corners on the page are computed here from the series' own geometry (nibabel's orientation), not with the
page's mapping."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import REPO
from dicom_fixtures import check_seg_against_labelmap, write_ct_series
from orthanc_fixtures import PASSWORD, USER, Orthanc
from service_fixtures import Service, free_port
from web_viewer_fixtures import canvas_point, drag, drawing, launch, ras_order, show_slice

pytestmark = pytest.mark.browser

TOKEN = "pacs-viewer-token"
DESCRIPTION = "Abdomen phantom"
SCREENSHOT = REPO / "docs" / "screenshots" / "viewer_series_list.png"  # refreshed with MEDSAM2HITL_SAVE_SCREENSHOTS=1


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    import pydicom

    folder = tmp_path_factory.mktemp("pacs_viewer")
    series = write_ct_series(folder / "ct", seed=5, size=(20, 96, 96))
    for path in series.folder.glob("*.dcm"):  # the set-up: a description, as scanners write one
        dataset = pydicom.dcmread(path)
        dataset.SeriesDescription = DESCRIPTION
        dataset.save_as(path, enforce_file_format=True)
    orthanc = Orthanc(folder / "orthanc")
    orthanc.upload(sorted(series.folder.glob("*.dcm")))
    (folder / "service").mkdir()
    service = Service(folder / "service", tokens=TOKEN, extra_env={
        "MEDSAM2HITL_DICOMWEB_URL": orthanc.dicomweb_url, "MEDSAM2HITL_DICOMWEB_USER": USER,
        "MEDSAM2HITL_DICOMWEB_PASSWORD": PASSWORD})
    try:
        yield series, service.start()
    finally:
        service.stop()
        orthanc.stop()


def test_the_series_list_has_no_patient_data_503_without_a_pacs_and_the_volume_route_checks_the_token(pacs):
    import dataclasses

    import SimpleITK as sitk
    from fastapi.testclient import TestClient

    from medsam2hitl_server.app import create_app
    from medsam2hitl_server.settings import Settings

    series, service = pacs
    with service.client(token="") as anonymous:
        assert anonymous.get("/api/v1/dicomweb/series").status_code == 401
    with service.client() as client:
        listed = client.get("/api/v1/dicomweb/series")
        assert listed.status_code == 200, listed.text
        assert listed.json()["series"] == [{"series_uid": series.series_uid, "study_uid": series.study_uid,
                                            "modality": "CT", "description": DESCRIPTION, "number": 1,
                                            "instances": 20}]
        for patient in ("Phantom^CT", "PHANTOM-1", "20260101", PASSWORD, USER):
            assert patient not in listed.text
        other_study = client.get("/api/v1/dicomweb/series", params={"study": "1.2.3.4"})
        assert other_study.status_code == 200 and other_study.json()["series"] == []
        job = client.post("/api/v1/jobs", json={"dicomweb": {"series": series.series_uid}}).json()["id"]
        volume = client.get(f"/api/v1/jobs/{job}/volume")
        assert volume.status_code == 200
        with service.client(token="") as anonymous:
            assert anonymous.get(f"/api/v1/jobs/{job}/volume").status_code == 401
        client.delete(f"/api/v1/jobs/{job}")
    for url, message in ((f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}/dicom-web", "is unreachable"),
                         ("", "no DICOMweb server configured")):  # the same job store, another PACS setting
        settings = dataclasses.replace(Settings(), redis_url=service.env["MEDSAM2HITL_REDIS_URL"],
                                       data_dir=Path(service.env["MEDSAM2HITL_DATA_DIR"]), dicomweb_url=url)
        refused = TestClient(create_app(settings)).get("/api/v1/dicomweb/series")
        assert refused.status_code == 503 and message in refused.json()["detail"] and PASSWORD not in refused.text
    path = service.folder / "volume.nrrd"
    path.write_bytes(volume.content)
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (96, 96, 20)  # the worker's grid is the series': (i, j, k), the series' geometry
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ series.ijk_to_ras
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing(), lps[:3, :3], atol=1e-4)
    assert np.allclose(image.GetOrigin(), lps[:3, 3], atol=1e-4)


def test_a_series_chosen_in_the_list_is_segmented_and_its_dicom_seg_downloads(pacs, tmp_path):
    import nibabel as nib

    series, service = pacs
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        created = []
        page.on("request", lambda r: created.append(r.post_data) if r.method == "POST" and
                r.url.endswith("/api/v1/jobs") else None)
        page.goto(service.url)
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        entry = page.locator("#pacs-series button")
        expect(entry).to_have_count(1)
        expect(entry).to_have_text(f"CT #1 · {DESCRIPTION} · 20 images")
        expect(page.locator("#download-dicom-seg")).to_be_hidden()  # no volume yet

        entry.click()
        expect(entry).to_have_class("active")
        expect(page.locator("#message")).to_contain_text("ready: drag a box", timeout=90_000)
        assert created == ['{"dicomweb":{"series":"%s","study":"%s"}}' % (series.series_uid, series.study_uid)]
        assert page.evaluate("viewer.state.grid.dims") == [96, 96, 20]  # the series' grid, nothing uploaded
        page.select_option("#window", "abdomen")

        shape = (96, 96, 20)
        _, voxel = ras_order(series.ijk_to_ras, shape)
        x0, y0, x1, y1 = series.phantom.box()
        k = series.phantom.key_index
        corners = [voxel([x0 - 2, y0 - 2, k]), voxel([x1 + 2, y1 + 2, k])]
        show_slice(page, corners[0])
        drag(page, canvas_point(page, corners[0], 0), canvas_point(page, corners[1], 0))
        page.keyboard.press("s")
        expect(page.locator("#message")).to_contain_text("segmented", timeout=60_000)
        drawn = drawing(page) > 0
        assert drawn.sum() > 50 and set(np.flatnonzero(drawn.any(axis=(0, 1))).tolist()) == {voxel([0, 0, k])[2]}
        if os.environ.get("MEDSAM2HITL_SAVE_SCREENSHOTS") == "1":
            page.screenshot(path=str(SCREENSHOT))

        with page.expect_download() as nifti:
            page.click("#download-nii")
        labelmap = tmp_path / "labels.nii.gz"
        labelmap.write_bytes(Path(nifti.value.path()).read_bytes())
        with page.expect_download() as seg:
            page.click("#download-dicom-seg")
        assert seg.value.suggested_filename.endswith("_object1.dcm")
        seg_path = tmp_path / "seg.dcm"
        seg_path.write_bytes(Path(seg.value.path()).read_bytes())
        labels = check_seg_against_labelmap(seg_path, series, labelmap, ["object 1"])
        assert labels.sum() == drawn.sum() and np.asarray(nib.load(labelmap).dataobj).sum() == drawn.sum()
        assert len(created) == 1  # the first object's job is the one made to fetch the volume
        browser.close()
    assert not errors, f"errors on the page: {errors}"
