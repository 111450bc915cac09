"""The NiiVue web viewer in a real browser (Debian's chromium via Playwright) against a live service.

Upload the phantom, drag a box with the mouse, segment, propagate with the progress bar, download; the NIfTI is
scored against the truth in the file's own voxel order. Where the page's drawing is checked, its voxel order is
computed here independently (nibabel's orientation), not with the page's own mapping.
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import sys
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from playwright.sync_api import Page, expect

from MedSAM2HITLLib.engine import EARLY_STOP_PATIENCE
from conftest import REPO
from service_fixtures import Service, wait_for
from web_viewer_fixtures import browser, canvas_point, drag, drawing, ras_order, show_slice  # noqa: F401 (browser)

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from evaluate_phantom_model import dice, inside_point  # noqa: E402
from phantoms import make_phantom  # noqa: E402
from test_end_to_end import GRIDS  # noqa: E402

pytestmark = pytest.mark.browser

SIZE = (40, 80, 96)
LONG = (200, 80, 96)  # for reconnect: a propagation that takes seconds, not a fraction of one
LONGER = (800, 80, 96)  # for cancel and reload: still running seconds after its first slices
TOKEN = "viewer-test-token"
SCREENSHOTS = REPO / "docs" / "screenshots"  # refreshed with MEDSAM2HITL_SAVE_SCREENSHOTS=1
VIEWS = {"axial": 0, "coronal": 1}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("web_service"), tokens=TOKEN).start()
    yield running
    running.stop()


@pytest.fixture
def page(browser, service):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(service.url)
    opened.fill("#token", TOKEN)
    opened.dispatch_event("#token", "change")
    yield opened
    context.close()
    assert not errors, f"errors on the page: {errors}"


class Case:
    """A phantom on a grid, its slices along file axis `2 - array_axis`, written as NIfTI."""

    def __init__(self, folder: Path, seed: int, grid: str, array_axis: int = 0, size: tuple = SIZE):
        phantom = make_phantom(seed, size=size, modality="ct")
        self.affine = GRIDS[grid]
        self.truth = np.moveaxis(phantom.mask, 0, array_axis).transpose(2, 1, 0)  # file (i, j, k)
        self.path = folder / f"phantom_{grid}_{array_axis}.nii"
        nib.save(nib.Nifti1Image(np.moveaxis(phantom.volume, 0, array_axis).transpose(2, 1, 0), self.affine),
                 self.path)
        self.file_axis = 2 - array_axis
        self.key = phantom.key_index
        self.to_ras, self.voxel = ras_order(self.affine, self.truth.shape)
        self.array_axis, self.phantom = array_axis, phantom
        self.corners = self.box_corners(self.key, phantom.box())

    def page_voxel(self, index: int, x: int, y: int) -> list[int]:
        """The page's voxel of pixel (x, y) on the phantom's slice `index` (x is its last axis, y its middle one)."""
        in_plane = [a for a in range(3) if a != self.file_axis]  # file axes of the slice, fastest first
        file = [0, 0, 0]
        file[self.file_axis], file[in_plane[0]], file[in_plane[1]] = index, x, y
        return self.voxel(file)

    def box_corners(self, index: int, box: tuple[int, int, int, int]) -> list:
        """The page's voxels of a box (x0, y0, x1, y1 on the phantom's slice `index`) with a 2-voxel margin."""
        x0, y0, x1, y1 = box
        return [self.page_voxel(index, x0 - 2, y0 - 2), self.page_voxel(index, x1 + 2, y1 + 2)]

    def object_truth(self, n: int) -> np.ndarray:
        """Object n of the phantom (0: the target) in the file's (i, j, k)."""
        return np.moveaxis(self.phantom.objects[n], 0, self.array_axis).transpose(2, 1, 0)


def upload(page: Page, case: Case) -> None:
    page.set_input_files("#file", str(case.path))
    expect(page.locator("#message")).to_contain_text("ready: drag a box", timeout=90_000)
    page.select_option("#window", "abdomen")  # the phantoms are CT


def box_and_segment(page: Page, case: Case, view: str) -> None:
    if view != "axial":
        page.click(f"[data-view='{VIEWS[view]}']")
    show_slice(page, case.corners[0])
    drag(page, canvas_point(page, case.corners[0], VIEWS[view]), canvas_point(page, case.corners[1], VIEWS[view]))
    expect(page.locator("#box-text")).to_contain_text(f"slice {case.key}")
    page.keyboard.press("s")
    expect(page.locator("#message")).to_contain_text("segmented", timeout=60_000)


def start_propagation(page: Page, early_stop: bool = True) -> None:
    """*Stop where the object ends* ticked or not (unticked: the whole range, as a user who wants it does), then
    *Propagate*; wait until the service has accepted the propagation (its 202): the tests act right after."""
    page.set_checked("#early-stop", early_stop)
    with page.expect_response(lambda r: r.url.endswith("/propagate") and r.request.method == "POST") as started:
        page.click("#propagate")
    assert started.value.status == 202 and started.value.request.post_data_json["early_stop"] is early_stop


def shown_slices(page: Page, case: Case) -> set[int]:
    """File slices (along the case's slice axis) with mask voxels in the page's drawing."""
    in_file_order = nib.orientations.apply_orientation(
        drawing(page), nib.orientations.ornt_transform(nib.orientations.io_orientation(np.eye(4)),
                                                       nib.orientations.io_orientation(case.affine)))
    other = tuple(a for a in range(3) if a != case.file_axis)
    return set(np.flatnonzero(np.asarray(in_file_order).any(axis=other)).tolist())


def screenshot(page: Page, folder: Path, name: str) -> None:
    """The page as the user sees it; the README's copies in docs/screenshots are refreshed on request."""
    keep = os.environ.get("MEDSAM2HITL_SAVE_SCREENSHOTS") == "1" and name.endswith(("_identity.png", "_info.png"))
    page.screenshot(path=str((SCREENSHOTS if keep else folder) / name))


def key_slice(case: Case) -> np.ndarray:
    """The key slice's voxels, in NiiVue's RAS voxel order."""
    selected = np.zeros(case.truth.shape, bool)
    index = [slice(None)] * 3
    index[case.file_axis] = case.key
    selected[tuple(index)] = True
    return case.to_ras(selected)


def downloaded(page: Page, button: str = "#download-nii") -> bytes:
    with page.expect_download() as info:
        page.click(button)
    return Path(info.value.path()).read_bytes()


def downloaded_nifti(page: Page) -> nib.Nifti1Image:
    """The active object's NIfTI download."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(downloaded(page)))


def downloaded_slices(page: Page) -> set[int]:
    """The slices along the last file axis with mask voxels in the active object's NIfTI download."""
    return set(np.flatnonzero((np.asarray(downloaded_nifti(page).dataobj) > 0).any(axis=(0, 1))).tolist())


@pytest.mark.parametrize("grid,view", [("identity", "axial"), ("oblique", "axial"), ("flipped", "coronal")])
def test_box_segment_propagate_download(page, tmp_path, grid, view):
    case = Case(tmp_path, 2040 + len(grid), grid, array_axis=VIEWS[view])
    upload(page, case)
    screenshot(page, tmp_path, f"viewer_upload_{grid}.png")
    box_and_segment(page, case, view)
    screenshot(page, tmp_path, f"viewer_box_{grid}.png")
    assert shown_slices(page, case) == {case.key}  # on the right slice, and only there
    assert dice(drawing(page) > 0, case.to_ras(case.truth > 0) & key_slice(case)) >= 0.8

    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_contain_text("propagated", timeout=180_000)
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^(\d+)/\1$"))  # where the object ended, maybe
    assert page.evaluate("document.getElementById('progress').value") == 1
    assert dice(drawing(page) > 0, case.to_ras(case.truth > 0)) >= 0.8
    screenshot(page, tmp_path, f"viewer_result_{grid}.png")

    result = downloaded_nifti(page)
    assert np.allclose(result.affine, case.affine, atol=1e-4)
    labels = np.asarray(result.dataobj) > 0
    assert labels.shape == case.truth.shape and dice(labels, case.truth) >= 0.8
    assert downloaded(page, "#download-seg").startswith(b"NRRD")


def test_cancel_keeps_finished_slices_then_undo_and_redo(page, tmp_path):
    case = Case(tmp_path, 2101, "identity", size=LONGER)
    upload(page, case)
    box_and_segment(page, case, "axial")
    start_propagation(page, early_stop=False)  # the whole volume: a long propagation
    # after the key slice and two more, not before: a cancel that beats them leaves no propagation to undo (the
    # worker can be hundreds of slices ahead when the cancel reaches it, hence LONGER)
    page.wait_for_function("parseInt(document.getElementById('progress-text').textContent) >= 3", timeout=60_000)
    page.keyboard.press("Escape")
    expect(page.locator("#message")).to_contain_text("cancelled", timeout=60_000)
    kept = shown_slices(page, case)
    count = case.truth.shape[case.file_axis]
    assert case.key in kept and 1 < len(kept) < count
    assert downloaded_slices(page) == kept

    page.keyboard.press("Control+z")  # the propagation: back to the segmented key slice
    expect(page.locator("#message")).to_contain_text("undo: propagate", timeout=60_000)
    assert shown_slices(page, case) == {case.key}
    page.keyboard.press("Control+z")  # the segmentation: nothing left
    expect(page.locator("#message")).to_contain_text("undo: segment", timeout=60_000)
    assert shown_slices(page, case) == set()
    emptied = downloaded_nifti(page)
    assert not (np.asarray(emptied.dataobj) > 0).any()  # undo reached the service's labels, emptied slices too
    page.keyboard.press("Control+y")
    page.keyboard.press("Control+y")
    expect(page.locator("#message")).to_contain_text("redo: propagate", timeout=60_000)
    assert shown_slices(page, case) == kept
    assert downloaded_slices(page) == kept


def test_propagation_stops_where_the_object_ends_unless_unticked(page, tmp_path):
    """With *Stop where the object ends* (the default) the page says where tracking stopped in each direction and
    the download has labels only there, within the object's slices ± the patience; unticked, the whole volume."""
    case = Case(tmp_path, 2131, "identity")  # its object: slices 11-31 of 0-39, well inside the volume
    upload(page, case)
    box_and_segment(page, case, "axial")
    start_propagation(page)
    expect(page.locator("#message")).to_contain_text("the object ended", timeout=180_000)
    message = page.locator("#message").text_content()
    ended = re.fullmatch(r"propagated: (\d+) slices, done at slice (\d+) \(forward\) and slice (\d+) \(backward\): "
                         r"the object ended", message)
    assert ended, message
    slices, forward, backward = map(int, ended.groups())
    assert slices == forward - backward + 1
    expect(page.locator("#progress-text")).to_have_text(f"{slices}/{slices}")
    assert page.evaluate("document.getElementById('progress').value") == 1
    present = np.flatnonzero(case.truth.any(axis=(0, 1)))
    first, last = int(present[0]), int(present[-1])
    assert first - EARLY_STOP_PATIENCE - 1 <= backward < first and last < forward <= last + EARLY_STOP_PATIENCE + 1
    in_download = downloaded_slices(page)
    assert in_download <= set(range(backward, forward + 1)) and len(in_download) >= 0.8 * (last - first + 1)

    start_propagation(page, early_stop=False)
    count = case.truth.shape[case.file_axis]
    expect(page.locator("#message")).to_have_text(f"propagated: {count} slices", timeout=180_000)
    expect(page.locator("#progress-text")).to_have_text(f"{count}/{count}")


def test_eraser_correction_propagates_from_the_corrected_slice(page, tmp_path):
    case = Case(tmp_path, 2102, "flipped")
    upload(page, case)
    box_and_segment(page, case, "axial")
    before = drawing(page) > 0
    page.keyboard.press("e")
    page.fill("#opacity", "0.8")
    centre = np.round(np.mean(case.corners, axis=0)).astype(int).tolist()
    left, right = list(centre), list(centre)
    left[0], right[0] = min(c[0] for c in case.corners), max(c[0] for c in case.corners)
    with page.expect_response(lambda r: r.url.endswith("/slices") and r.request.method == "PUT") as sent:
        drag(page, canvas_point(page, left, 0), canvas_point(page, right, 0))  # an eraser stroke across the mask
    assert sent.value.ok
    corrected = drawing(page) > 0
    erased = before & ~corrected
    assert erased.sum() > 0 and not (corrected & ~before).any()
    stroked = case.to_ras(np.asarray(downloaded_nifti(page).dataobj) > 0)
    assert np.array_equal(stroked & key_slice(case), corrected & key_slice(case))  # the stroke is in downloads
    page.keyboard.press("f")
    expect(page.locator("#message")).to_contain_text("propagated", timeout=180_000)
    after = drawing(page) > 0
    key = key_slice(case)
    assert np.array_equal(after & key, corrected & key)  # the corrected slice stays exactly as drawn
    result = downloaded_nifti(page)
    labels = case.to_ras(np.asarray(result.dataobj) > 0)
    assert np.array_equal(labels & key, corrected & key) and len(shown_slices(page, case)) > 10


def segment_the_distractor_as_object_2(page: Page, case: Case) -> int:
    """New object, then a box around the case's first distractor on its largest slice, segmented: that slice."""
    other = case.phantom.distractors[0]
    index = int(np.argmax(other.sum(axis=(1, 2))))
    page.keyboard.press("n")
    expect(page.locator("#message")).to_contain_text("(object 2)", timeout=90_000)
    corners = case.box_corners(index, case.phantom.box(index, other))
    show_slice(page, corners[0])
    page.click("[data-tool='box']")
    drag(page, canvas_point(page, corners[0], 0), canvas_point(page, corners[1], 0))
    page.keyboard.press("s")
    expect(page.locator("#message")).to_contain_text("segmented", timeout=60_000)
    return index


def test_a_second_object_gets_its_own_label_and_download(page, tmp_path):
    """New object is the next object of the volume's job: the volume is uploaded once."""
    case = Case(tmp_path, 2107, "identity")  # a phantom with one distractor, largest on another slice
    uploads: list[str] = []
    page.on("request", lambda r: uploads.append(r.url) if r.method == "POST" and r.url.endswith("/jobs") else None)
    upload(page, case)
    box_and_segment(page, case, "axial")
    index = segment_the_distractor_as_object_2(page, case)
    assert len(uploads) == 1 and len({o["job"] for o in remembered(page)["objects"]}) == 1
    shown = drawing(page)
    assert set(np.unique(shown).tolist()) == {0, 1, 2}  # one label per object, drawn over each other nowhere
    first, second = case.to_ras(case.truth > 0), case.to_ras(case.object_truth(1) > 0)
    assert dice(shown == 2, second & slice_mask(case, index)) >= 0.7  # the distractor, on its slice
    assert not ((shown == 2) & first).any() and ((shown == 1) & first).any()
    labels = np.asarray(downloaded_nifti(page).dataobj) > 0
    assert set(np.flatnonzero(labels.any(axis=(0, 1))).tolist()) == {index}  # object 2's download: its own slice
    assert not (labels & (case.truth > 0)).any()


def click(page: Page, voxel: list[int], tool: str) -> list[int]:
    """A click with the tool ("positive" or "negative") on an axial voxel; the labels of the clicks the page sent
    for its slice."""
    page.click(f"[data-tool='{tool}']")
    show_slice(page, voxel)
    with page.expect_request(lambda r: r.url.endswith("/segment-2d")) as sent:
        page.mouse.click(*canvas_point(page, voxel, 0))
    expect(page.locator("#message")).to_contain_text("click(s) in", timeout=60_000)
    return [label for _, _, label in sent.value.post_data_json["points"]]


def test_clicks_segment_their_slice_and_undo_takes_one_back(page, tmp_path):
    """+ Click on the object segments that slice from the click alone; a − click beside it goes with the first
    (the service corrects the slice's current mask with both); undo takes the last click and its mask back."""
    case = Case(tmp_path, 2110, "flipped")
    target = case.phantom.mask[case.key]
    upload(page, case)
    assert click(page, case.page_voxel(case.key, *inside_point(target)), "positive") == [1]
    first = drawing(page) > 0
    assert shown_slices(page, case) == {case.key}
    assert dice(first, case.to_ras(case.truth > 0) & key_slice(case)) >= 0.8

    x0, y0, x1, y1 = case.phantom.box()
    outside = (min(x1 + 4, target.shape[1] - 1), (y0 + y1) // 2)  # beside the object, on no object
    assert not any(o[case.key][outside[1], outside[0]] for o in case.phantom.objects)
    negative = case.page_voxel(case.key, *outside)
    assert click(page, negative, "negative") == [1, 0]
    second = drawing(page) > 0
    assert not second[tuple(negative)] and dice(second, case.to_ras(case.truth > 0) & key_slice(case)) >= 0.8
    assert page.evaluate("[...viewer.state.objects[0].clicks.values()].map((c) => c.length)") == [2]
    labels = case.to_ras(np.asarray(downloaded_nifti(page).dataobj) > 0)
    assert np.array_equal(labels, second)  # what the service holds is what the page shows

    page.keyboard.press("Control+z")
    expect(page.locator("#message")).to_contain_text("undo: − click")
    assert np.array_equal(drawing(page) > 0, first)
    assert page.evaluate("[...viewer.state.objects[0].clicks.values()].map((c) => c.length)") == [1]


def test_a_propagation_uses_and_keeps_the_users_other_slices(page, tmp_path):
    """A box segmented on the key slice, then a click on another slice of the object and Propagate from there:
    the key slice goes along as a conditioning slice, and both come back exactly as they were."""
    case = Case(tmp_path, 2104, "identity")
    upload(page, case)
    box_and_segment(page, case, "axial")
    present = np.flatnonzero(case.phantom.mask.sum(axis=(1, 2)) >= 30)
    other = int(round(case.key + 0.6 * (present[-1] - case.key)))
    assert other != case.key
    click(page, case.page_voxel(other, *inside_point(case.phantom.mask[other])), "positive")
    drawn = drawing(page) > 0
    assert shown_slices(page, case) == {case.key, other}
    first, last = sorted((case.key, other))
    expect(page.locator("#slices-text")).to_have_text(f"your slices: axial {first}, {last}")
    with page.expect_request(lambda r: r.url.endswith("/propagate")) as sent:
        page.keyboard.press("f")
    assert sent.value.post_data_json["slice"] == other and sent.value.post_data_json["conditioning"] == [case.key]
    expect(page.locator("#message")).to_contain_text("propagated", timeout=180_000)
    after = drawing(page) > 0
    for index in (case.key, other):
        assert np.array_equal(after & slice_mask(case, index), drawn & slice_mask(case, index)), index
    assert dice(after, case.to_ras(case.truth > 0)) >= 0.8
    labels = case.to_ras(np.asarray(downloaded_nifti(page).dataobj) > 0)
    assert np.array_equal(labels, after)


def slice_mask(case: Case, index: int) -> np.ndarray:
    """The voxels of file slice `index` along the case's slice axis, in NiiVue's RAS order."""
    selected = np.zeros(case.truth.shape, bool)
    region = [slice(None)] * 3
    region[case.file_axis] = index
    selected[tuple(region)] = True
    return case.to_ras(selected)


def remembered(page: Page) -> dict:
    """What the page holds per object (job, clicks, the user's slices) and the active object."""
    return page.evaluate("({active: viewer.state.active, objects: viewer.state.objects.map((o) => ("
                         "{job: o.job, clicks: [...o.clicks], userSlices: [...o.userSlices].sort()}))})")


def reopen(page: Page, case: Case, message: str) -> list[str]:
    """Reload the page and open the case's file again; the messages the page showed meanwhile."""
    page.reload()
    page.evaluate("window.said = []; new MutationObserver(() => window.said.push("
                  "document.getElementById('message').textContent)).observe("
                  "document.getElementById('message'), {childList: true, characterData: true, subtree: true})")
    page.set_input_files("#file", str(case.path))
    expect(page.locator("#message")).to_contain_text(message, timeout=180_000)
    return page.evaluate("window.said")


def test_a_reload_picks_the_objects_up_again_when_the_file_is_opened(page, service, tmp_path):
    """The tab remembers its objects' job, clicks and slices: after a reload, opening the same file brings every
    object back from the service as it was. A job the service purged meanwhile is reported and the volume starts
    afresh; another file starts afresh."""
    import redis

    case = Case(tmp_path, 2111, "identity")  # a phantom with one distractor, largest on another slice
    upload(page, case)
    box_and_segment(page, case, "axial")
    assert click(page, case.page_voxel(case.key, *inside_point(case.phantom.mask[case.key])), "positive") == [1]
    index = segment_the_distractor_as_object_2(page, case)
    shown, held = drawing(page), remembered(page)
    assert set(np.unique(shown).tolist()) == {0, 1, 2} and held["active"] == 1

    reopen(page, case, "picked up your last session on this volume: 2 object(s) (undo starts here)")
    assert np.array_equal(drawing(page), shown) and remembered(page) == held
    expect(page.locator("#slices-text")).to_have_text(f"your slices: axial {index}")
    expect(page.locator("#undo")).to_be_disabled()
    page.select_option("#objects", "0")
    expect(page.locator("#slices-text")).to_have_text(f"your slices: axial {case.key}")

    store = redis.Redis(port=service.redis_port, decode_responses=True)
    job = held["objects"][0]["job"]  # both objects' job
    store.zadd("m2h:jobs", {job: 0})  # due now: the service purges it within a second
    with service.client() as client:
        wait_for(lambda: client.get(f"/api/v1/jobs/{job}/status").status_code in (404, 410), 15, "the purge")
    reopen(page, case, "your last session's objects on this volume expired on the service")
    assert not drawing(page).any() and remembered(page)["objects"][0]["job"] != job

    Case(tmp_path, 2112, "identity").path.replace(tmp_path / "another.nii")
    page.set_input_files("#file", str(tmp_path / "another.nii"))
    expect(page.locator("#message")).to_contain_text("ready: drag a box", timeout=90_000)
    assert remembered(page)["objects"][0]["job"] != held["objects"][0]["job"] and not drawing(page).any()


def test_a_reload_mid_propagation_waits_for_it_and_loses_no_slice(page, service, tmp_path):
    """The propagation goes on on the service while the page reloads: opening the file again waits for it to
    finish and shows every slice it made, as the download has them."""
    case = Case(tmp_path, 2113, "identity", size=LONGER)
    upload(page, case)
    box_and_segment(page, case, "axial")
    start_propagation(page, early_stop=False)  # the whole volume: a long propagation
    said = reopen(page, case, "picked up your last session on this volume: 1 object(s)")
    assert any("waiting for its propagation to finish on the service" in message for message in said)
    count = case.truth.shape[case.file_axis]
    with service.client() as client:
        status = client.get(f"/api/v1/jobs/{remembered(page)['objects'][0]['job']}/status").json()
    assert status["state"] == "succeeded" and status["progress"] == {"done": count, "total": count}
    in_download = downloaded_slices(page)
    assert shown_slices(page, case) == in_download and len(in_download) > 10 and case.key in in_download


def test_bad_files_get_a_clear_message_and_nothing_is_uploaded(page, service, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a volume")
    page.set_input_files("#file", str(notes))
    expect(page.locator("#message")).to_contain_text("notes.txt is not a NIfTI (.nii, .nii.gz) or NRRD")
    broken = tmp_path / "broken.nii"
    broken.write_bytes(b"\0" * 400)
    page.set_input_files("#file", str(broken))
    expect(page.locator("#message")).to_contain_text("broken.nii could not be read as a volume")
    expect(page.locator("#message")).to_have_class("error")
    assert page.evaluate("viewer.state.objects.length") == 0


def test_a_connection_lost_mid_propagation_resumes_where_it_stopped(page, service, tmp_path):
    """The API dies during a propagation and comes back: the page says so, resumes the events from the last one
    it saw, and ends with every slice, as the download has them. Runs before the test that leaves the API down."""
    case = Case(tmp_path, 2104, "identity", size=LONG)
    upload(page, case)
    box_and_segment(page, case, "axial")
    start_propagation(page, early_stop=False)  # the whole volume: a long propagation
    service.kill("api")  # at once: the worker goes on, the page's event stream is cut within its first slices
    try:
        expect(page.locator("#message")).to_contain_text("reconnecting and resuming", timeout=15_000)
    finally:
        service.start_process("api", [sys.executable, "-m", "medsam2hitl_server", "api"])
    wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 200, 60, "the API restarting")
    expect(page.locator("#message")).to_contain_text("propagated", timeout=180_000)
    count = case.truth.shape[case.file_axis]
    expect(page.locator("#progress-text")).to_have_text(f"{count}/{count}")
    in_download = downloaded_slices(page)
    assert shown_slices(page, case) == in_download and len(in_download) > 10


def test_stopped_server_shows_an_error_and_the_page_stays_usable(page, service, tmp_path):
    """Last in the module: it stops the API and starts it again."""
    case = Case(tmp_path, 2103, "identity")
    upload(page, case)
    show_slice(page, case.corners[0])
    drag(page, canvas_point(page, case.corners[0], 0), canvas_point(page, case.corners[1], 0))
    service.kill("api")
    try:
        page.keyboard.press("s")
        expect(page.locator("#message")).to_contain_text("lost the connection", timeout=15_000)
        expect(page.locator("#message")).to_have_class("error")
        page.click("[data-view='1']")  # the page still answers
        expect(page.locator("[data-view='1']")).to_have_class("active")
        expect(page.locator("#segment")).to_be_enabled()
    finally:
        service.start_process("api", [sys.executable, "-m", "medsam2hitl_server", "api"])
    wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 200, 60, "the API restarting")
    page.keyboard.press("s")
    expect(page.locator("#message")).to_contain_text("segmented", timeout=60_000)


def middle_drag(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A pan: NiiVue's middle-button drag."""
    page.mouse.move(*start)
    page.mouse.down(button="middle")
    page.mouse.move(*end, steps=6)
    page.mouse.up(button="middle")


def seg_nrrd_segment(data: bytes) -> tuple[str, tuple[float, float, float]]:
    """The first segment's name and colour (0-1 RGB) in a .seg.nrrd's header."""
    header = data.split(b"\n\n", 1)[0].decode("latin-1")
    fields = dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)
    return fields["Segment0_Name"], tuple(float(v) for v in fields["Segment0_Color"].split())


def test_a_pan_keeps_the_box_a_new_object_starts_clean_and_the_image_tells_what_it_shows(page, service, tmp_path):
    """A middle-drag pan after the box: S segments the drawn box. The legend's voxels and mL are the download's;
    the .seg.nrrd carries the page's name and colour. N (with the Eraser active) clears the box and selects the
    Box tool; object 2 over object 1 shows as overlap. Slice, W/L and zoom are on the image; no sideways scroll."""
    case = Case(tmp_path, 2120, "flipped")
    upload(page, case)
    show_slice(page, case.corners[0])
    count = case.truth.shape[case.file_axis]
    expect(page.locator("#slice-info")).to_have_text(f"axial {case.key}/{count - 1}")
    expect(page.locator("#wl-info")).to_have_text("W 400 L 40")  # the abdomen preset
    start, end = canvas_point(page, case.corners[0], 0), canvas_point(page, case.corners[1], 0)
    drag(page, start, end)
    drawn = page.locator("#box-text").text_content()
    middle_drag(page, end, (end[0] + 60, end[1] + 40))
    expect(page.locator("#box-text")).to_have_text(drawn)
    with page.expect_request(lambda r: r.url.endswith("/segment-2d")) as sent:
        page.keyboard.press("s")
    assert drawn.endswith(f"[{', '.join(map(str, sent.value.post_data_json['box']))}]")  # the drawn box, not the pan
    expect(page.locator("#message")).to_contain_text("segmented", timeout=60_000)
    assert dice(drawing(page) > 0, case.to_ras(case.truth > 0) & key_slice(case)) >= 0.8

    result = downloaded_nifti(page)
    voxels = int((np.asarray(result.dataobj) > 0).sum())
    millilitres = voxels * float(np.prod(result.header.get_zooms()[:3])) / 1000
    legend = page.locator("#legend li").first
    expect(legend.locator(".voxels")).to_have_text(str(voxels))
    expect(legend.locator(".ml")).to_have_text(f"{millilitres:.2f} mL")
    name, colour = seg_nrrd_segment(downloaded(page, "#download-seg"))
    swatch = page.evaluate("getComputedStyle(document.querySelector('#legend li .swatch')).backgroundColor")
    assert name == "object 1" and legend.text_content().startswith("▸ object 1")
    assert swatch == "rgb({}, {}, {})".format(*(round(255 * c) for c in colour))
    with service.client() as client:  # the name and colour are checked on the service; without them, the default
        url = f"/api/v1/jobs/{remembered(page)['objects'][0]['job']}/result"
        refused = client.get(url, params={"format": "seg.nrrd", "segment_color": "red"})
        plain = client.get(url, params={"format": "seg.nrrd"})
    assert refused.status_code == 422 and "segment_color" in refused.json()["detail"]
    assert seg_nrrd_segment(plain.content)[0] == "Segment_1"

    page.mouse.move(*start)
    page.mouse.down(button="right")  # a right-drag sets W/L: the preset's name goes
    page.mouse.move(start[0] + 40, start[1] + 30, steps=5)
    page.mouse.up(button="right")
    expect(page.locator("#window")).to_have_value("custom")
    expect(page.locator("#wl-info")).not_to_have_text("W 400 L 40")
    page.keyboard.press("z")
    expect(page.locator("#zoom-info")).to_contain_text("zoom 125%")
    page.keyboard.press("r")

    page.keyboard.press("e")
    page.keyboard.press("n")
    expect(page.locator("#message")).to_contain_text("(object 2)", timeout=90_000)
    expect(page.locator("#box-text")).to_have_text("drag a box on a slice")
    expect(page.locator("[data-tool='box']")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#segment")).to_be_disabled()
    drag(page, start, end)
    page.keyboard.press("s")
    expect(page.locator("#message")).to_contain_text("segmented", timeout=60_000)
    shown = drawing(page)
    assert set(np.unique(shown).tolist()) >= {0, 255} and (shown == 255).sum() > 0.5 * (shown > 0).sum()  # overlap
    expect(page.locator("#legend")).to_contain_text("overlap")
    screenshot(page, tmp_path, "viewer_objects_info.png")
    page.set_viewport_size({"width": 1024, "height": 640})
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def drop(page: Page, path: Path) -> None:
    """Drop a file on the page, as dragging it from the desktop does."""
    page.evaluate("""([name, text]) => { const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
        const files = new DataTransfer(); files.items.add(new File([bytes], name));
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
        }""",
                  [path.name, base64.b64encode(path.read_bytes()).decode()])


def test_files_keep_their_sessions_and_a_refused_file_changes_nothing(page, tmp_path):
    """Two files alternated: each keeps its objects (per-volume sessions by fingerprint). A 4D drop is refused
    before anything is shown, naming the file; a garbage file leaves the shown volume and its objects as they were."""
    first = Case(tmp_path, 2121, "identity")
    first.path = first.path.replace(tmp_path / "first.nii")
    upload(page, first)
    box_and_segment(page, first, "axial")
    shown_first, held_first = drawing(page), remembered(page)
    second = Case(tmp_path, 2122, "identity")
    second.path = second.path.replace(tmp_path / "second.nii")
    upload(page, second)
    held_second = remembered(page)
    assert not drawing(page).any() and held_second["objects"][0]["job"] != held_first["objects"][0]["job"]

    uploads: list[str] = []
    page.on("request", lambda r: uploads.append(r.url) if r.method == "POST" and r.url.endswith("/jobs") else None)
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6, 3), np.int16), np.eye(4)), series)
    drop(page, series)
    expect(page.locator("#message")).to_have_text("series.nii.gz has 3 frames (a 4D series): open a single 3D volume")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(bytes(range(256)) * 8))
    drop(page, garbage)
    expect(page.locator("#message")).to_contain_text("garbage.nii.gz could not be read as a volume")
    assert page.evaluate("[viewer.nv.volumes.length, viewer.nv.volumes[0].name]") == [1, "second.nii"]
    expect(page.locator("#volume-name")).to_have_text("second.nii")
    assert remembered(page) == held_second and not uploads

    page.set_input_files("#file", str(first.path))
    expect(page.locator("#message")).to_contain_text("picked up your last session on this volume: 1 object(s)",
                                                     timeout=90_000)
    assert np.array_equal(drawing(page), shown_first) and remembered(page) == held_first
    drop(page, second.path)
    expect(page.locator("#message")).to_contain_text("picked up your last session on this volume: 1 object(s)",
                                                     timeout=90_000)
    assert remembered(page) == held_second and not uploads


def painted(page: Page, stroke: list[list[int]]) -> int:
    """Pen voxels added by a pen stroke through axial RAS voxels."""
    before = int((drawing(page) == 1).sum())
    with page.expect_response(lambda r: r.url.endswith("/slices") and r.request.method == "PUT"):
        page.mouse.move(*canvas_point(page, stroke[0], 0))
        page.mouse.down()
        for voxel in stroke[1:]:
            page.mouse.move(*canvas_point(page, voxel, 0), steps=4)
        page.mouse.up()
    return int((drawing(page) == 1).sum()) - before


def keyboard_checks(page: Page, case: Case) -> None:
    """Tab reaches every control, Open included; each has a descriptive title and ARIA label; Enter on a focused
    button presses that button (not Propagate); the shortcuts work while the opacity slider has focus."""
    show_slice(page, case.corners[0])
    drag(page, canvas_point(page, case.corners[0], 0), canvas_point(page, case.corners[1], 0))  # Propagate enabled
    controls = page.evaluate("""() => [...document.querySelectorAll("button, select, input")]
        .filter((c) => !c.disabled && c.offsetParent !== null).map((c) => c.id || c.dataset.view || c.dataset.tool)""")
    page.evaluate("""() => { window.reached = new Set(); document.addEventListener("focusin",
        (e) => reached.add(e.target.id || e.target.dataset.view || e.target.dataset.tool)); }""")
    page.focus("#token")
    for _ in range(len(controls) + 2):
        page.keyboard.press("Tab")
    assert "open" in controls and set(controls) <= set(page.evaluate("[...reached]"))
    labels = page.evaluate("""() => [...document.querySelectorAll("button, select, input:not([type=file])")]
        .map((c) => [c.id || c.dataset.view || c.dataset.tool, c.getAttribute("aria-label") || ""])""")
    assert all(len(label) > 8 for _, label in labels), labels
    assert page.get_attribute("[data-tool='box']", "aria-label") == "Box tool (B)"

    propagations: list[str] = []
    page.on("request", lambda r: propagations.append(r.url) if r.url.endswith("/propagate") else None)
    page.focus("[data-view='1']")
    page.keyboard.press("Enter")
    expect(page.locator("[data-view='1']")).to_have_attribute("aria-pressed", "true")
    page.focus("#outline")
    page.keyboard.press("Enter")  # not a shortcut for Propagate either
    page.focus("#opacity")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#opacity")).to_have_value("0.55")
    page.keyboard.press("p")
    expect(page.locator("[data-tool='pen']")).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("1")
    expect(page.locator("[data-view='0']")).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("l")  # radiological convention and outlines, from the keyboard too
    page.keyboard.press("o")
    expect(page.locator("#zoom-info")).to_contain_text("radiological")
    assert page.evaluate("[viewer.nv.opts.isRadiologicalConvention, viewer.nv.drawRimOpacity]") == [True, 1]
    page.keyboard.press("l")
    page.keyboard.press("o")
    page.wait_for_timeout(500)
    assert not propagations


def test_keyboard_pen_size_fill_and_click_markers(page, tmp_path):
    """The keyboard reaches and presses every control (keyboard_checks); the brush size widens a stroke; the pen's
    closed shape is filled; a click's marker shows on the image."""
    case = Case(tmp_path, 2124, "identity")
    upload(page, case)
    keyboard_checks(page, case)
    z = case.key
    show_slice(page, [10, 10, z])
    page.click("[data-tool='pen']")
    thin = painted(page, [[6, 8, z], [30, 8, z]])
    page.keyboard.press("]")
    page.keyboard.press("]")
    expect(page.locator("#brush-text")).to_have_text("5")
    wide = painted(page, [[6, 20, z], [30, 20, z]])
    assert thin >= 20 and wide >= 3.5 * thin, (thin, wide)
    page.keyboard.press("[")
    page.keyboard.press("[")
    square = painted(page, [[40, 30, z], [60, 30, z], [60, 50, z], [40, 50, z], [40, 31, z]])
    assert square >= 0.8 * 21 * 21 and drawing(page)[50, 40, z] == 1  # filled, the middle too

    voxel = case.page_voxel(case.key, *inside_point(case.phantom.mask[case.key]))
    click(page, voxel, "positive")
    x, y = canvas_point(page, voxel, 0)
    alpha = page.evaluate("""([x, y]) => {
        const marks = document.getElementById("marks"), rect = marks.getBoundingClientRect();
        const scale = marks.width / rect.width;
        return marks.getContext("2d").getImageData((x - rect.left) * scale, (y - rect.top) * scale, 1, 1).data[3]; }""",
                          [x, y])
    assert alpha > 0  # the marker is drawn where the click was
    screenshot(page, tmp_path, "viewer_edit_info.png")
