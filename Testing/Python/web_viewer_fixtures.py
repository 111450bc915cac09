"""The web viewer in a real browser: Debian's chromium driven by Playwright, and the page's geometry.

Under CI (CI=true) and everywhere else, a missing chromium or Playwright is an error, never a skip.
"""

from __future__ import annotations

import base64
import shutil
from contextlib import closing

import nibabel as nib
import numpy as np
import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is not installed: apt-get install chromium (Debian/Ubuntu); .ci/run installs it")
    return found


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)


@pytest.fixture(scope="module")
def browser():
    """One headless chromium per test module (import this fixture into the module)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, closing(launch(playwright)) as opened:
        yield opened


def ras_order(affine: np.ndarray, shape: tuple[int, int, int]):
    """NiiVue's RAS-permuted voxel order of a file grid, found independently of the page: per file axis, the
    world axis it is nearest to and whether it runs backwards (nibabel's io_orientation)."""
    orientation = nib.orientations.io_orientation(affine)

    def to_ras(volume: np.ndarray) -> np.ndarray:
        """A file-ordered (i, j, k) array in NiiVue's (x, y, z) RAS voxel order."""
        return np.asarray(nib.orientations.apply_orientation(volume, orientation))

    def voxel(file_ijk) -> list[int]:
        ras = [0, 0, 0]
        for axis, (world, flip) in enumerate(orientation):
            ras[int(world)] = shape[axis] - 1 - file_ijk[axis] if flip < 0 else file_ijk[axis]
        return ras

    return to_ras, voxel


def drawing(page) -> np.ndarray:
    """NiiVue's drawing as an (x, y, z) array of pen values."""
    dims, packed = page.evaluate("""() => { const bitmap = viewer.nv.drawBitmap; let text = "";
        for (let at = 0; at < bitmap.length; at += 0x8000) {  // base64: a JSON array of millions of numbers is slow
          text += String.fromCharCode.apply(null, bitmap.subarray(at, at + 0x8000));
        }
        return [viewer.state.grid.dimsRAS, btoa(text)]; }""")
    return np.frombuffer(base64.b64decode(packed), np.uint8).reshape(dims[::-1]).transpose(2, 1, 0)


def show_slice(page, ras_voxel: list[int]) -> None:
    """Move the crosshair (so the shown slices) to a RAS voxel, as scrolling would."""
    page.evaluate("""(v) => { const nv = viewer.nv, d = viewer.state.grid.dimsRAS;
        nv.scene.crosshairPos = [0, 1, 2].map((a) => (v[a] + 0.5) / d[a]); nv.drawScene(); }""", ras_voxel)


def canvas_point(page, ras_voxel: list[int], axcorsag: int) -> tuple[float, float]:
    """Page coordinates of a RAS voxel's centre on the 2D view `axcorsag` (0 axial, 1 coronal, 2 sagittal),
    from NiiVue's own voxel → screen mapping."""
    return tuple(page.evaluate("""([v, view]) => {
        const nv = viewer.nv, dpr = nv.uiData.dpr || 1, rect = nv.canvas.getBoundingClientRect();
        const found = nv.frac2canvasPosWithTile(nv.vox2frac(v), view);
        return [rect.left + found.pos[0] / dpr, rect.top + found.pos[1] / dpr]; }""", [ras_voxel, axcorsag]))


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=4)
    page.mouse.move(*end, steps=4)
    page.mouse.up()
