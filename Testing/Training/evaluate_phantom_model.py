"""Evaluate the phantom-trained test model through the project's Engine on phantoms it never saw.

Two held-out sets, CT- and MR-like alike: `seeds` (training shapes, other seeds) and `unseen` (shapes and
orientations that training never draws). For each phantom: the box of the target on its largest slice →
Engine.segment_slice (key-slice 2D Dice), and the same box → Engine.propagate over the whole slice axis
(3D Dice, both directions). Run from the repository root:

    .venv/bin/python Testing/Training/evaluate_phantom_model.py [--checkpoint Testing/Data/phantom_sam2.pt]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedSAM2HITL"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms import Phantom, make_phantom  # noqa: E402

CHECKPOINT = REPO / "Testing" / "Data" / "phantom_sam2.pt"
EVAL_SEED_BASE = 1_000_000  # far from the training seeds (0, 1, 2, ...)
SIZES = ((48, 96, 96), (56, 112, 88), (44, 80, 120), (64, 128, 128))  # every slice axis ≥ 40 slices
TARGET_2D, TARGET_3D = 0.85, 0.75


@dataclass(frozen=True)
class CaseResult:
    name: str
    dice_2d: float
    dice_3d: float
    seconds: float


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays; two empty arrays agree perfectly."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def held_out_phantom(set_name: str, index: int) -> Phantom:
    """The index-th phantom of a held-out set: modality alternates, sizes cycle."""
    return make_phantom(
        EVAL_SEED_BASE + index,
        size=SIZES[index % len(SIZES)],
        modality=("ct", "mr")[index % 2],
        held_out=set_name == "unseen",
    )


def propagate_volume(engine, axis: int, key_index: int, prompt, window) -> np.ndarray:
    """The 3D mask from Engine.propagate over the whole axis (every slice written once or more)."""
    volume = engine.volume
    result = np.zeros(volume.shape, dtype=bool)
    for item in engine.propagate(axis, key_index, prompt, window=window):
        index = [slice(None)] * 3
        index[axis] = item.index
        result[tuple(index)] = item.mask
    return result


def evaluate_case(engine, phantom: Phantom, name: str) -> CaseResult:
    started = time.perf_counter()
    engine.set_volume(phantom.volume, name)
    key, box = phantom.key_index, phantom.box()
    mask_2d = engine.segment_slice(0, key, box, window=phantom.window)
    mask_3d = propagate_volume(engine, 0, key, box, phantom.window)
    return CaseResult(name, dice(mask_2d, phantom.mask[key]), dice(mask_3d, phantom.mask),
                      time.perf_counter() - started)


def summary(label: str, results: list[CaseResult]) -> str:
    d2 = np.array([r.dice_2d for r in results])
    d3 = np.array([r.dice_3d for r in results])
    seconds = np.mean([r.seconds for r in results])
    return (
        f"{label:7s} n={len(results):3d}  2D Dice mean {d2.mean():.3f} median {np.median(d2):.3f} min {d2.min():.3f} "
        f"(≥{TARGET_2D}: {np.mean(d2 >= TARGET_2D):.0%})  3D Dice mean {d3.mean():.3f} median {np.median(d3):.3f} "
        f"min {d3.min():.3f} (≥{TARGET_3D}: {np.mean(d3 >= TARGET_3D):.0%})  {seconds:.2f} s/case"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--count", type=int, default=30, help="phantoms per held-out set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning on a shared CPU
    os.environ.setdefault("TQDM_DISABLE", "1")  # sam2 draws a progress bar per propagation
    from MedSAM2HITLLib.engine import Engine

    engine = Engine.load(args.checkpoint, device="cpu", threads=args.threads)
    print(f"model: {engine.info()}")
    everything = []
    for set_name in ("seeds", "unseen"):
        results = []
        for i in range(args.count):
            phantom = held_out_phantom(set_name, i)
            result = evaluate_case(engine, phantom, f"{set_name}-{i}-{phantom.modality}")
            results.append(result)
            if args.verbose:
                print(f"  {result.name:18s} 2D {result.dice_2d:.3f} 3D {result.dice_3d:.3f} "
                      f"({phantom.volume.shape[0]} slices, {result.seconds:.2f} s)", flush=True)
        print(summary(set_name, results), flush=True)
        everything += results
    print(summary("all", everything))


if __name__ == "__main__":
    main()
