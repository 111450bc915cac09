"""/docs in a real browser (Debian's chromium via Playwright) against a live API, with no internet.

Swagger UI must come from the service itself: every request the pages make is checked to stay on the
service. *Authorize* with a token, *Try it out* on `POST /api/v1/jobs` with a file in the form, *Execute*: 201.
"""

from __future__ import annotations

import json
import sys

import httpx
import nibabel as nib
import numpy as np
import pytest
from playwright.sync_api import expect

from service_fixtures import Service, wait_for
from web_viewer_fixtures import browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser

TOKEN = "docs-test-token"
SHAPE = (24, 20, 6)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """Redis and the API only: an upload needs no model worker (the job waits for one)."""
    running = Service(tmp_path_factory.mktemp("docs_service"), tokens=TOKEN)
    running.start_redis()
    running.start_process("api", [sys.executable, "-m", "medsam2hitl_server", "api"])
    wait_for(lambda: httpx.get(f"{running.url}/healthz").status_code == 200, 60, "the API answering")
    yield running
    running.stop()


@pytest.fixture
def page(browser, api):
    """A page that records every request it makes and every script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.requested, opened.errors = [], []
    opened.on("request", lambda request: opened.requested.append(request.url))
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))
    yield opened
    context.close()
    assert not opened.errors, f"errors on the page: {opened.errors}"
    elsewhere = [url for url in opened.requested if not url.startswith(api.url + "/")]
    assert not elsewhere, f"the page reached beyond the service: {elsewhere}"


def test_docs_authorize_and_upload_a_file_with_try_it_out(page, api, tmp_path):
    volume = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE), np.eye(4)), volume)

    assert page.goto(f"{api.url}/docs").status == 200  # the page itself needs no token
    upload = page.locator(".opblock-post:has(.opblock-summary-path[data-path='/api/v1/jobs'])")
    expect(upload).to_be_visible(timeout=15000)  # rendered by the local Swagger UI from /openapi.json
    assert f"{api.url}/docs/assets/swagger-ui-bundle.js" in page.requested

    page.locator(".scheme-container button.authorize").click()
    page.locator(".auth-container input").fill(TOKEN)
    page.locator(".auth-btn-wrapper button.authorize").click()
    page.locator(".auth-btn-wrapper button.btn-done").click()

    upload.locator(".opblock-summary").click()
    upload.locator("button.try-out__btn").click()
    upload.locator(".body-param-content-type select").select_option("multipart/form-data")
    with page.expect_response(lambda reply: reply.url.startswith(f"{api.url}/api/v1/jobs")) as replied:
        upload.locator("input[type=file]").set_input_files(volume)
        upload.locator("button.execute").click()
    sent = replied.value.request
    assert sent.headers["authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["content-type"].startswith("multipart/form-data")

    live = upload.locator(".live-responses-table tbody .response")  # what the page shows of the reply
    expect(live.locator(".response-col_status")).to_have_text("201", timeout=15000)
    created = json.loads(live.locator(".response-col_description pre").first.inner_text())
    assert created["shape_ijk"] == list(SHAPE) and created["worker"] is None
    with api.client() as client:  # the job the page made is a real one
        assert client.get(f"/api/v1/jobs/{created['id']}/status").json()["volume"]["shape_ijk"] == list(SHAPE)
