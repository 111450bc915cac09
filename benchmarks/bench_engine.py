"""Engine vs bare sam2 1.1.0 on the same model, both fp32 (bench_precision.py measures the faster modes), CPU,
2 threads: 2D latency, cached prompts, propagation speed and memory per extra slice. Prints ratios measured in
this run.

    .venv/bin/python benchmarks/bench_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bare_propagation, bare_video_state, best_of, ok, print_table, random_checkpoint, synthetic_volume,
)

THREADS = 2
BOX = (150, 160, 360, 330)


def engine_and_bare(checkpoint: Path):
    import numpy as np
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from MedSAM2HITLLib.engine import Engine

    torch.set_num_threads(THREADS)
    engine = Engine.load(checkpoint, device="cpu", threads=THREADS, precision="fp32")
    bare = SAM2ImagePredictor(engine.model.predictor)
    bare._bb_feat_sizes = engine.model.feature_sizes  # sam2 1.1.0 only knows 1024-input sizes
    return engine, bare, np


def bench_2d(checkpoint: Path, repeats: int) -> list[tuple]:
    engine, bare, np = engine_and_bare(checkpoint)
    volume = synthetic_volume(repeats * 2 + 2)
    engine.set_volume(volume, "bench")
    window = engine.window("abdomen")
    slices = iter(range(volume.shape[0]))
    box = np.asarray(BOX, np.float32)

    def bare_call():
        image = np.repeat(window.to_uint8(volume[next(slices)])[..., None], 3, axis=2)
        bare.set_image(image)
        bare.predict(box=box, multimask_output=False)

    def engine_first():
        engine.segment_slice(0, next(slices), BOX, window="abdomen")

    import torch

    with torch.inference_mode():
        bare_call()  # warm-up of both paths on their first slice
    engine_first()
    bare_time = engine_time = float("inf")
    for _ in range(repeats):  # interleaved so that load on the machine hits both alike
        with torch.inference_mode():
            bare_time = min(bare_time, best_of(1, bare_call))
        engine_time = min(engine_time, best_of(1, engine_first))
    key = volume.shape[0] - 1
    engine.segment_slice(0, key, BOX, window="abdomen")
    second = best_of(repeats * 3, lambda: engine.segment_slice(0, key, (160, 170, 350, 320), window="abdomen"))
    return [
        ("bare sam2 set_image+predict (ms)", f"{bare_time * 1000:.0f}", "", ""),
        ("engine 2D first prompt (ms)", f"{engine_time * 1000:.0f}", "", ""),
        ("engine 2D / bare", f"{engine_time / bare_time:.3f}", "<= 1.10", ok(engine_time / bare_time <= 1.10)),
        ("engine 2D second prompt (ms)", f"{second * 1000:.1f}", "", ""),
        ("second / first prompt", f"{second / engine_time:.3f}", "<= 0.10", ok(second / engine_time <= 0.10)),
    ]


def propagation_speed(checkpoint: Path, slices: int, rounds: int) -> list[tuple]:
    """Seconds per slice, engine vs bare video predictor on the same frames, interleaved in one process."""
    import numpy as np
    import torch

    from MedSAM2HITLLib.engine import Engine

    torch.set_num_threads(THREADS)
    engine = Engine.load(checkpoint, device="cpu", threads=THREADS, precision="fp32")
    predictor = engine.model.predictor
    volume = synthetic_volume(slices)
    engine.set_volume(volume, "bench")
    window = engine.window("abdomen")
    box = np.asarray(BOX, np.float32)
    state = bare_video_state(predictor, volume, window, slices)

    def bare() -> None:
        bare_propagation(predictor, state, box)

    def ours() -> None:
        for _ in engine.propagate(0, 0, BOX, window="abdomen"):
            pass

    bare_time = engine_time = float("inf")
    for _ in range(rounds):
        bare_time = min(bare_time, best_of(1, bare))
        engine_time = min(engine_time, best_of(1, ours))
    ratio = engine_time / bare_time
    return [
        (f"bare propagation (ms/slice, N={slices})", f"{bare_time / slices * 1000:.0f}", "", ""),
        (f"engine propagation (ms/slice, N={slices})", f"{engine_time / slices * 1000:.0f}", "", ""),
        ("engine / bare propagation time", f"{ratio:.3f}", "<= 1.05", ok(ratio <= 1.05)),
    ]


def propagation_peak_rss(kind: str, checkpoint: Path, slices: int) -> float:
    """Peak RSS (MiB) of a fresh process that builds the volume and propagates through all of it."""
    import numpy as np
    import torch

    torch.set_num_threads(THREADS)
    volume = synthetic_volume(slices)
    from MedSAM2HITLLib.engine import Engine

    engine = Engine.load(checkpoint, device="cpu", threads=THREADS, precision="fp32")
    if kind == "engine":
        engine.set_volume(volume, "bench")
        for _ in engine.propagate(0, 0, BOX, window="abdomen"):
            pass
    else:
        from PIL import Image

        from MedSAM2HITLLib.preprocessing import parse_window

        predictor, window = engine.model.predictor, parse_window("abdomen", volume)
        with tempfile.TemporaryDirectory() as folder:
            for k in range(slices):
                Image.fromarray(np.repeat(window.to_uint8(volume[k])[..., None], 3, 2)).save(f"{folder}/{k:05d}.jpg")
            del volume
            state = predictor.init_state(folder)
            predictor.add_new_points_or_box(state, 0, 1, box=np.asarray(BOX, np.float32))
            for _ in predictor.propagate_in_video(state, start_frame_idx=0):
                pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(kind: str, checkpoint: Path, slices: int) -> float:
    """Each measurement in a fresh process, so the peak belongs to that run alone."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(checkpoint), str(slices)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_per_slice(checkpoint: Path, small: int, large: int) -> list[tuple]:
    rows = []
    for kind in ("bare", "engine"):
        low, high = peak_rss(kind, checkpoint, small), peak_rss(kind, checkpoint, large)
        per_slice = (high - low) / (large - small)
        rows.append((f"{kind} peak RSS N={small} / N={large} (MiB)", f"{low:.0f} / {high:.0f}", "", ""))
        target = "<= 1 MB" if kind == "engine" else ""
        rows.append((f"{kind} MiB per extra slice", f"{per_slice:.2f}", target, ok(per_slice <= 1.0) if target else ""))
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(propagation_peak_rss(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer slices and repeats")
    args = parser.parse_args()
    checkpoint = random_checkpoint(Path(tempfile.gettempdir()) / "medsam2hitl-bench")
    small, large = (16, 48) if args.quick else (32, 128)
    print(f"CPU, {THREADS} threads, random-init MedSAM2 (Hiera-T, 512), synthetic int16 512x512xN volume")
    print_table("2D segmentation", bench_2d(checkpoint, 3 if args.quick else 5))
    print_table("3D propagation speed", propagation_speed(checkpoint, 12 if args.quick else 24, 2 if args.quick else 3))
    print_table("3D propagation memory (input volume included)", memory_per_slice(checkpoint, small, large))


if __name__ == "__main__":
    main()
