"""Several objects in one pass vs one propagation per object, same model, same run, CPU, 2 threads.

Random-init MedSAM2 at 512 on a synthetic 512 x 512 volume (the real model's cost: one image encoding per slice is
what one pass shares), and the phantom fixture on a phantom with four objects (Dice of one pass against one by
one). Ratio = one-by-one time / one-pass time.

    .venv/bin/python benchmarks/bench_interaction.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ok, print_table, random_checkpoint, synthetic_volume  # noqa: E402

sys.path.insert(0, str(REPO / "Testing" / "Training"))
THREADS = 2
FIXTURE = REPO / "Testing" / "Data" / "phantom_sam2.pt"
BOXES = ((150, 160, 360, 330), (60, 60, 140, 140), (380, 380, 470, 470))


def timed_passes(engine, objects: list[dict], window) -> tuple[float, float, dict, dict]:
    """(one-pass seconds, one-by-one seconds, masks of each way) for the given objects."""
    import numpy as np

    def run(prompt_sets):
        masks = {}
        started = time.perf_counter()
        for offset, prompts in prompt_sets:
            for item in engine.propagate_objects(0, prompts, window=window):
                masks.setdefault(offset + item.object, {})[item.index] = item.mask
        return time.perf_counter() - started, masks

    together, joint = run([(0, objects)])
    alone, single = run([(n, [prompts]) for n, prompts in enumerate(objects)])
    for masks in (joint, single):
        for number, slices in masks.items():
            masks[number] = np.stack([slices[i] for i in sorted(slices)])
    return together, alone, joint, single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer slices")
    args = parser.parse_args()
    from evaluate_phantom_model import dice
    from phantoms import make_phantom

    from MedSAM2HITLLib.engine import Engine

    slices = 8 if args.quick else 24
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine.load(random_checkpoint(Path(folder)), device="cpu", threads=THREADS, precision="fp32")
        engine.set_volume(synthetic_volume(slices), "synthetic")
        for count in (2, 3):
            objects = [{slices // 2: box} for box in BOXES[:count]]
            together, alone, _, _ = timed_passes(engine, objects, "abdomen")
            rows.append((f"{count} objects x {slices} slices, MedSAM2 512: one by one / one pass",
                         f"{alone / together:.2f} ({alone:.1f} / {together:.1f} s)", "> 1", ok(alone > together)))

    engine = Engine.load(FIXTURE, device="cpu", threads=THREADS)
    phantom = make_phantom(2_000_002, size=(48, 112, 112), modality="ct", distractors=3)
    engine.set_volume(phantom.volume, "phantom")
    objects = []
    for obj in phantom.objects:
        key = int(obj.sum(axis=(1, 2)).argmax())
        objects.append({key: phantom.box(key, obj)})
    together, alone, joint, single = timed_passes(engine, objects, phantom.window)
    agreement = min(dice(joint[n], single[n]) for n in joint)
    rows.append((f"{len(objects)} objects, fixture: one by one / one pass", f"{alone / together:.2f}", "> 1",
                 ok(alone > together)))
    rows.append(("fixture: Dice one pass vs one by one (worst object)", f"{agreement:.4f}", ">= 0.98",
                 ok(agreement >= 0.98)))
    print_table("Several objects in one pass", rows)


if __name__ == "__main__":
    main()
