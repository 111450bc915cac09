"""Evaluate the phantom-trained test model through the project's Engine on phantoms it never saw.

Two held-out sets, CT- and MR-like alike: `seeds` (training shapes, other seeds) and `unseen` (shapes and
orientations that training never draws). For each phantom: the box of the target on its largest slice →
Engine.segment_slice (key-slice 2D Dice), and the same box → Engine.propagate over the whole slice axis
(3D Dice, both directions).

Then what users do after a box (`--interaction`): a positive click alone; a negative click on a leaked
neighbouring object; one, two and three conditioning slices (the key's box, then corrected slices near the
object's ends; also on thick-slice twisting bars); elongated, tubular and thick-slice phantoms propagated along
each array axis. Run from the repository root:

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

from phantoms import LONG_SHAPES, TRAIN_SHAPES, TWISTED_SHAPES, Phantom, make_phantom, thick_slices  # noqa: E402

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


def propagate_volume(engine, axis: int, key_index: int, prompt, window, conditioning=None) -> np.ndarray:
    """The 3D mask from Engine.propagate over the whole axis (every slice written once or more)."""
    volume = engine.volume
    result = np.zeros(volume.shape, dtype=bool)
    for item in engine.propagate(axis, key_index, prompt, window=window, conditioning=conditioning):
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


def inside_point(mask2d: np.ndarray) -> tuple[int, int]:
    """The object's pixel farthest from its outline (x, y): where a user clicks to mean "this"."""
    from scipy.ndimage import distance_transform_edt

    y, x = np.unravel_index(np.argmax(distance_transform_edt(mask2d)), mask2d.shape)
    return int(x), int(y)


def click_dice(engine, phantom: Phantom, name: str) -> float:
    """Key-slice Dice from one positive click inside the target, no box."""
    engine.set_volume(phantom.volume, name)
    key = phantom.key_index
    mask = engine.segment_slice(0, key, None, phantom.window, points=[(*inside_point(phantom.mask[key]), 1)])
    return dice(mask, phantom.mask[key])


def leaked_neighbour(phantom: Phantom, gap: int = 12) -> tuple[int, np.ndarray] | None:
    """(slice, distractor mask) where a distractor lies within `gap` pixels of the target: a leak candidate."""
    from scipy.ndimage import binary_dilation

    for index in np.argsort(-phantom.mask.sum(axis=(1, 2))):
        near = binary_dilation(phantom.mask[index], iterations=gap)
        for other in phantom.distractors:
            if other[index].sum() >= 30 and (near & other[index]).any():
                return int(index), other[index]
    return None


def leak_removal(engine, phantom: Phantom, name: str, object_click: bool = True) -> tuple[float, float] | None:
    """A mask that leaked onto a neighbouring object, then a negative click on the neighbour, with the object's
    positive click (`object_click`: what the panel sends, every click of the object on that slice) or alone, and
    the mask as input.

    Returns (share of the leak removed, target Dice after), or None when the phantom has no close neighbour.
    """
    found = leaked_neighbour(phantom)
    if found is None:
        return None
    index, leak = found
    target = phantom.mask[index]
    engine.set_volume(phantom.volume, name)
    clicks = [(*inside_point(target), 1)] * object_click + [(*inside_point(leak), 0)]
    mask = engine.segment_slice(0, index, None, phantom.window, points=clicks, mask=target | leak)
    return 1.0 - (mask & leak).sum() / leak.sum(), dice(mask & ~leak, target)


def key_and_box(phantom: Phantom, axis: int) -> tuple[int, tuple[int, int, int, int]]:
    """The target's largest slice along array `axis` and the target's box on it: where a user draws."""
    from phantoms import bounding_box

    key = int(np.argmax(phantom.mask.sum(axis=tuple(a for a in range(3) if a != axis))))
    return key, bounding_box(np.take(phantom.mask, key, axis=axis))


def correction_slices(phantom: Phantom, count: int, axis: int = 0) -> list[int]:
    """Slices a user would correct: 70 % of the way from the key slice to the object's end, one per side."""
    present = np.flatnonzero(phantom.mask.any(axis=tuple(a for a in range(3) if a != axis)))
    key, _ = key_and_box(phantom, axis)
    ends = [present[-1], present[0]][:count]
    return [int(round(key + 0.7 * (end - key))) for end in ends]


def conditioning_dice(engine, phantom: Phantom, name: str, corrected: int, axis: int = 0) -> tuple[float, bool]:
    """3D Dice with the key's box and `corrected` corrected slices (their true masks) along `axis`; whether
    those came back exactly as given."""
    engine.set_volume(phantom.volume, name)
    key, box = key_and_box(phantom, axis)
    slices = {i: np.take(phantom.mask, i, axis=axis) for i in correction_slices(phantom, corrected, axis)}
    result = propagate_volume(engine, axis, key, box, phantom.window, slices)
    exact = all(np.array_equal(np.take(result, i, axis=axis), m) for i, m in slices.items())
    return dice(result, phantom.mask), exact


def long_phantom(index: int) -> Phantom:
    """Elongated and tubular objects; every other one scanned with 3x thicker slices (anisotropic)."""
    phantom = make_phantom(EVAL_SEED_BASE + 500 + index, size=(96, 112, 104) if index % 2 else (64, 112, 104),
                           modality=("ct", "mr")[index % 2], shapes=LONG_SHAPES if index % 4 < 2 else
                           TRAIN_SHAPES + LONG_SHAPES)
    return thick_slices(phantom, 3) if index % 2 else phantom


def twisted_phantom(index: int) -> Phantom:
    """Bars that turn by 60-120° and drift fast over their slices, scanned with 3x thicker slices: the shape
    changes much from slice to slice, as where a user must correct slices on both sides of the key."""
    size = (96, 96, 96) if index % 2 == 0 else (120, 112, 112)
    phantom = make_phantom(EVAL_SEED_BASE + 700 + index, size=size, modality=("ct", "mr")[index % 2],
                           shapes=TWISTED_SHAPES)
    return thick_slices(phantom, 3)


def axis_dice(engine, phantom: Phantom, axis: int, name: str) -> float:
    """3D Dice propagating along array `axis` from the box on the target's largest slice along it."""
    engine.set_volume(phantom.volume, name)
    key, box = key_and_box(phantom, axis)
    return dice(propagate_volume(engine, axis, key, box, phantom.window), phantom.mask)


def interaction_summary(engine, count: int) -> list[str]:
    lines = []
    clicks = [click_dice(engine, held_out_phantom(s, i), f"click-{s}-{i}") for s in ("seeds", "unseen")
              for i in range(count)]
    lines.append(f"click   n={len(clicks):3d}  2D Dice mean {np.mean(clicks):.3f} min {np.min(clicks):.3f} "
                 f"(≥0.8: {np.mean(np.array(clicks) >= 0.8):.0%})")
    for label, object_click in (("+ and -", True), ("- alone", False)):
        leaks = [r for r in (leak_removal(engine, held_out_phantom(s, i), f"leak-{s}-{i}", object_click)
                             for s in ("seeds", "unseen") for i in range(count)) if r is not None]
        removed = np.array([r[0] for r in leaks])
        lines.append(f"leak {label} n={len(leaks):3d}  removed mean {removed.mean():.3f} min {removed.min():.3f} "
                     f"(≥0.8: {np.mean(removed >= 0.8):.0%})  target Dice mean {np.mean([r[1] for r in leaks]):.3f}")
    for label, make, axis in (("unseen", lambda i: held_out_phantom("unseen", i), 0), ("long/1", long_phantom, 1),
                              ("twisted", twisted_phantom, 0)):
        for corrected in (0, 1, 2):
            runs = [conditioning_dice(engine, make(i), f"cond-{label}-{i}", corrected, axis) for i in range(count)]
            lines.append(f"{label} +{corrected} corrected n={len(runs):3d}  3D Dice mean "
                         f"{np.mean([r[0] for r in runs]):.3f} min {np.min([r[0] for r in runs]):.3f}  "
                         f"corrected slices exact: {all(r[1] for r in runs)}")
    for axis in (0, 1, 2):
        scores = [axis_dice(engine, long_phantom(i), axis, f"long-{i}-{axis}") for i in range(count)]
        lines.append(f"long/{axis}  n={len(scores):3d}  3D Dice mean {np.mean(scores):.3f} min {np.min(scores):.3f}")
    return lines


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
    parser.add_argument("--interaction", action="store_true", help="also clicks, corrections and other axes")
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
    if args.interaction:
        for line in interaction_summary(engine, min(args.count, 12)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
