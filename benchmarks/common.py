"""Shared set-up for benchmarks: a random-init model of the real architecture, synthetic volumes, a table."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSAM2HITL"))


def random_checkpoint(folder: Path, image_size: int = 512) -> Path:
    """MedSAM2 at random init in the real checkpoint format, made once and reused."""
    from MedSAM2HITLLib.model import save_random_checkpoint

    checkpoint = folder / f"medsam2_random_{image_size}.pt"
    if checkpoint.exists():
        return checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    return save_random_checkpoint(checkpoint, image_size)


def synthetic_volume(slices: int, size: int = 512, seed: int = 0):
    """CT-like int16 volume with a bright ellipsoid drifting through it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    volume = np.empty((slices, size, size), np.int16)  # filled slice by slice: no full-size temporaries
    yy, xx = np.mgrid[:size, :size]
    for k in range(slices):
        volume[k] = rng.normal(0, 40, size=(size, size))
        cy, cx = size * (0.45 + 0.1 * k / max(slices, 1)), size * 0.5
        volume[k][((yy - cy) / (size * 0.15)) ** 2 + ((xx - cx) / (size * 0.2)) ** 2 < 1] += 200
    return volume


def bare_video_state(predictor, volume, window, slices: int) -> dict:
    """sam2 1.1.0's own tracking state over the first slices, which it reads only from a JPEG folder."""
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        for k in range(slices):
            Image.fromarray(np.repeat(window.to_uint8(volume[k])[..., None], 3, 2)).save(f"{folder}/{k:05d}.jpg")
        return predictor.init_state(folder)


def bare_propagation(predictor, state: dict, box) -> None:
    """One pass of sam2's own video predictor from a box on slice 0."""
    predictor.reset_state(state)
    state["cached_features"] = {}  # init_state's warm-up encoding must not count for the bare model
    predictor.add_new_points_or_box(state, 0, 1, box=box)
    for _ in predictor.propagate_in_video(state, start_frame_idx=0):
        pass


def best_of(repeats: int, call) -> float:
    """Fastest of several runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    header = ("measure", "value", "target", "ok")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def ok(condition: bool) -> str:
    """The 'ok' column of a table row."""
    return "yes" if condition else "NO"
