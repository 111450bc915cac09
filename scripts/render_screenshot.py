"""Render Resources/Screenshot01.png: a real MedSAM2HITL result, made headlessly through the library's logic.

No Slicer window runs on the project's machines, so this is not a picture of the panel. It shows what the panel
computes: a box ROI on one slice of a synthetic CT phantom (the project's generator), the key slice segmented
and propagated by the project's small test model through `SegmentationLogic` on MRML nodes, and the segment read
back from the segmentation node, drawn over axial, coronal and sagittal slices. Run from the repository root:

    .venv/bin/python scripts/render_screenshot.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "Training"))
OUT = REPO / "Resources" / "Screenshot01.png"
SEED = 1_000_003  # a held-out phantom: shapes the test model never saw in training


def main() -> None:
    from phantoms import make_phantom

    from MedSAM2HITLLib.logic import SegmentationLogic
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array, create_scene
    from MedSAM2HITLLib.segment_writer import read_segment

    phantom = make_phantom(SEED, modality="ct")
    scene = create_scene()
    volume = add_volume_from_array(scene, phantom.volume, np.eye(4), "phantom CT")  # RAS = (i, j, k)
    x0, y0, x1, y1 = phantom.box()
    key = phantom.key_index
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Lesion")
    roi.SetCenter((x0 + x1) / 2, (y0 + y1) / 2, float(key))
    roi.SetSize(x1 - x0 + 2.0, y1 - y0 + 2.0, 1.0)
    logic = SegmentationLogic()
    try:
        logic.load_model(REPO / "Testing" / "Data" / "phantom_sam2.pt", device="cpu").wait(120)
        segmentation, segment_id = logic.segment_slice(volume, roi, None, window="abdomen").wait(120)
        logic.propagate(volume, segmentation, segment_id, roi_node=roi, window="abdomen").wait(600)
    finally:
        logic.stop_worker()
    mask = read_segment(segmentation, segment_id, volume)
    centre = np.argwhere(mask).mean(axis=0).round().astype(int)
    views = [(phantom.volume[key], mask[key], (x0, y0, x1, y1)),
             (phantom.volume[:, centre[1], :][::-1], mask[:, centre[1], :][::-1], None),
             (phantom.volume[:, :, centre[2]][::-1], mask[:, :, centre[2]][::-1], None)]
    tiles = [_tile(image, overlay, box) for image, overlay, box in views]
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 8
    canvas.save(OUT)
    print(f"wrote {OUT}: key slice {key}, {int(mask.any(axis=(1, 2)).sum())} slices segmented")


def _tile(image: np.ndarray, overlay: np.ndarray, box, scale: int = 4) -> Image.Image:
    """A slice in the abdomen window with the segment in red (50 %) and the ROI's box in yellow."""
    grey = np.clip((image.astype(float) - (40 - 200)) / 400 * 255, 0, 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1).astype(float)
    rgb[overlay] = 0.5 * rgb[overlay] + 0.5 * np.array([255, 40, 40])
    tile = Image.fromarray(rgb.astype(np.uint8)).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                        Image.NEAREST)
    if box:
        x0, y0, x1, y1 = box
        ImageDraw.Draw(tile).rectangle([(x0 - 1) * scale, (y0 - 1) * scale, (x1 + 2) * scale, (y1 + 2) * scale],
                                       outline=(255, 220, 0), width=2)
    return tile


if __name__ == "__main__":
    main()
