"""Time to a finished segment: propagation that stops where the object ends, and a first mask from a prefetched slice.

Three parts, one run, same machine, CPU, 2 threads:

- `gaps`: the phantom fixture on held-out phantoms (the evaluation's sets, long and thick-slice ones along two
  axes, twisting bars), propagated over the whole axis without early stop. In each direction from the key slice,
  how often the tracked object has a run of empty slices and then comes back (a gap), and for each patience what
  stopping at the first run of that many empty slices would cut off (slices lost, 3D Dice against the truth) and
  how many empty slices it computes past the object's end. This picks EARLY_STOP_PATIENCE.
- `volumes`: an 18-slice object in 60-, 150- and 300-slice volumes, whole range, early stop on vs off: seconds,
  slices computed and 3D Dice against the truth, with the fixture. Random-init MedSAM2 (image and in-plane size
  `--size`) is timed on the same volume lengths right after the fixture's early-stop run: off over the whole
  range, on over exactly the slices the fixture's early stop computed (its random masks cannot say where an object
  ends), "on" before and after "off" so that changing load on a shared machine falls on both.
- `prefetch`: box-up to mask shown through the local worker, from a slice the worker prefetched while idle vs a
  cold one.
- `prefetch-service`: the same through the inference service (POST .../prefetch, then segment-2d once the worker
  has encoded), with the fixture and with random-init MedSAM2 at `--size`, median of 10.

    .venv/bin/python benchmarks/bench_early_stop.py [--parts gaps,volumes,prefetch,prefetch-service] [--size 512] [--slices 60,150,300]

Parts run in the order given; each row is printed as soon as it is measured, so a run that is stopped keeps what
it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ok, random_checkpoint  # noqa: E402

sys.path.insert(0, str(REPO / "Testing" / "Training"))
THREADS = 2
FIXTURE = REPO / "Testing" / "Data" / "phantom_sam2.pt"
PATIENCES = (1, 2, 3, 4, 5, 6)


def direction_runs(masks: dict[int, np.ndarray], key: int, start: int, end: int) -> list[list[bool]]:
    """For each direction from the key slice: whether the tracked object is present on each slice, in order."""
    forward = [bool(masks[i].any()) for i in range(key, end + 1)]
    backward = [bool(masks[i].any()) for i in range(key - 1, start - 1, -1)]
    return [forward, backward]


def gaps_in(present: list[bool]) -> list[int]:
    """Lengths of the runs of empty slices that the object comes back after."""
    gaps, run = [], 0
    for here in present:
        if here:
            if run:
                gaps.append(run)
            run = 0
        else:
            run += 1
    return gaps


def stop_after(present: list[bool], patience: int) -> int:
    """How many slices a direction computes with this patience (the engine's rule, single object)."""
    run = 0
    for done, here in enumerate(present, 1):
        run = 0 if here else run + 1
        if run >= patience:
            return done
    return len(present)


def gap_cases():
    """(name, phantom, axis) of the study: held-out sets, long and thick-slice objects, twisting bars, 3 axes."""
    from evaluate_phantom_model import held_out_phantom, long_phantom, twisted_phantom

    for set_name in ("seeds", "unseen"):
        for i in range(8):
            yield f"{set_name}-{i}", held_out_phantom(set_name, i), 0
    for i in range(4):
        for axis in range(2):
            yield f"long-{i}-axis{axis}", long_phantom(i), axis
    for i in range(2):
        yield f"twisted-{i}", twisted_phantom(i), 0


Row = tuple[str, str, str, str]


def gaps_study() -> Iterator[Row]:
    from evaluate_phantom_model import dice, key_and_box

    from MedSAM2HITLLib.engine import Engine

    engine = Engine.load(FIXTURE, device="cpu", threads=THREADS)
    all_gaps: list[int] = []
    directions = 0
    lost = {p: 0 for p in PATIENCES}  # directions where stopping cut off slices holding the object
    dice_drop = {p: [] for p in PATIENCES}
    past_end = {p: [] for p in PATIENCES}
    done_share = {p: [] for p in PATIENCES}
    for name, phantom, axis in gap_cases():
        engine.set_volume(phantom.volume, name)
        key, box = key_and_box(phantom, axis)
        count = phantom.volume.shape[axis]
        masks = {item.index: item.mask for item in engine.propagate(axis, key, box, window=phantom.window)}
        full = np.stack([masks[i] for i in range(count)], axis=axis)
        reference = dice(full, phantom.mask)
        runs = direction_runs(masks, key, 0, count - 1)
        for present in runs:
            directions += 1
            all_gaps.extend(gaps_in(present))
        for patience in PATIENCES:
            kept = set()
            computed = 0
            for present, step, first in zip(runs, (1, -1), (key, key - 1)):
                done = stop_after(present, patience)
                computed += done
                kept.update(first + step * n for n in range(done))
                if any(present[done:]):
                    lost[patience] += 1
                last_present = max((n for n, here in enumerate(present[:done]) if here), default=-1)
                past_end[patience].append(done - 1 - last_present)
            stopped = np.stack([masks[i] if i in kept else np.zeros_like(masks[i]) for i in range(count)], axis=axis)
            dice_drop[patience].append(reference - dice(stopped, phantom.mask))
            done_share[patience].append(computed / count)
    cases = len(dice_drop[PATIENCES[0]])
    histogram = {length: all_gaps.count(length) for length in sorted(set(all_gaps))}
    yield "phantoms (cases) / directions", f"{cases} / {directions}", "", ""
    yield "gaps inside a tracked object (length: count)", str(histogram or "none"), "", ""
    for patience in PATIENCES:
        yield (f"patience {patience}: directions cut / worst Dice drop / mean share of slices computed",
               f"{lost[patience]} / {max(dice_drop[patience]):.4f} / {np.mean(done_share[patience]):.2f}",
               "0 cut", ok(lost[patience] == 0))


def object_volume(slices: int, size: int, object_slices: int = 18, seed: int = 0):
    """A CT-like volume of `slices` slices with one bright blob on `object_slices` of them (centred); its mask."""
    rng = np.random.default_rng(seed)
    volume = np.empty((slices, size, size), np.int16)
    truth = np.zeros((slices, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    first = (slices - object_slices) // 2
    for k in range(slices):
        volume[k] = rng.normal(0, 40, size=(size, size))
        t = (k - first + 0.5) / object_slices  # 0..1 through the object
        if 0 <= t <= 1:
            scale = np.sqrt(max(0.0, 1 - (2 * t - 1) ** 2))
            cy, cx = size * (0.45 + 0.1 * t), size * 0.5
            inside = ((yy - cy) / (size * 0.15 * scale + 1e-6)) ** 2 + ((xx - cx) / (size * 0.2 * scale + 1e-6)) ** 2 < 1
            truth[k] = inside
            volume[k][inside] += 250
    key = first + object_slices // 2
    rows = np.flatnonzero(truth[key].any(axis=1))
    cols = np.flatnonzero(truth[key].any(axis=0))
    box = (int(cols[0]) - 2, int(rows[0]) - 2, int(cols[-1]) + 2, int(rows[-1]) + 2)
    return volume, truth, key, box


def timed_propagation(engine, volume, key, box, patience, start=None, end=None):
    """(seconds, 3D mask, indices computed, CPU seconds of this process) of a propagation from the key slice's box
    (whole range by default); CPU time is what other processes' load does not inflate."""
    result = np.zeros(volume.shape, bool)
    computed = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for item in engine.propagate(0, key, box, start, end, window="abdomen", patience=patience):
        result[item.index] = item.mask
        computed.append(item.index)
    return time.perf_counter() - started, result, computed, time.process_time() - cpu_started


def volumes_study(size: int, slice_counts: list[int]) -> Iterator[Row]:
    """Per volume length: the fixture with early stop on; MedSAM2 at `size` (random init, so its masks say nothing
    of where an object ends) over the slices the fixture computed, then over the whole range, then those slices
    again; the fixture off. So the rows at `size` come first for each length on a loaded machine."""
    from evaluate_phantom_model import dice

    from MedSAM2HITLLib.engine import EARLY_STOP_PATIENCE, Engine

    fixture = Engine.load(FIXTURE, device="cpu", threads=THREADS)
    medsam2 = Engine.load(random_checkpoint(Path(tempfile.gettempdir()) / "medsam2hitl-bench", size), device="cpu",
                          threads=THREADS)
    for slices in slice_counts:
        volume, truth, key, box = object_volume(slices, 128)
        fixture.set_volume(volume, f"fixture-{slices}")
        fixture.segment_slice(0, key, box, window="abdomen")  # warm-up: not what either mode waits for
        on_s, on_mask, on_done, _ = timed_propagation(fixture, volume, key, box, EARLY_STOP_PATIENCE)
        first, last = min(on_done), max(on_done)

        big, _, big_key, big_box = object_volume(slices, size)
        medsam2.set_volume(big, f"medsam2-{slices}")
        medsam2.segment_slice(0, big_key, big_box, window="abdomen")
        on_before, _, big_on_done, cpu_before = timed_propagation(medsam2, big, big_key, big_box, None, first, last)
        big_off, _, big_off_done, cpu_off = timed_propagation(medsam2, big, big_key, big_box, None)
        on_after, _, _, cpu_after = timed_propagation(medsam2, big, big_key, big_box, None, first, last)
        big_on = (on_before + on_after) / 2
        ratio = big_off / big_on
        cpu_on = (cpu_before + cpu_after) / 2
        yield (f"MedSAM2 random init ({size}), {slices} slices: off / on (slices computed; on = mean of the runs "
               f"before and after off)", f"{big_off:.1f} s ({len(big_off_done)}) / {big_on:.1f} s "
               f"({len(big_on_done)}; {on_before:.1f}, {on_after:.1f}): {ratio:.1f}x, "
               f"{big_off / len(big_off_done):.3f} / {big_on / len(big_on_done):.3f} s a slice; CPU time "
               f"{cpu_off:.1f} / {cpu_on:.1f} s: {cpu_off / cpu_on:.1f}x",
               "≥ 5x at 300" if slices >= 300 else "", ok(ratio >= 5) if slices >= 300 else "")

        off_s, off_mask, off_done, _ = timed_propagation(fixture, volume, key, box, None)
        off_dice, on_dice = dice(off_mask, truth), dice(on_mask, truth)
        yield (f"fixture (128), {slices} slices: off / on (slices computed)",
               f"{off_s:.2f} s ({len(off_done)}) / {on_s:.2f} s ({len(on_done)}): {off_s / on_s:.1f}x", "", "")
        yield (f"fixture (128), {slices} slices: 3D Dice off / on (on vs off)",
               f"{off_dice:.4f} / {on_dice:.4f} ({dice(on_mask, off_mask):.4f})", "within 0.005",
               ok(abs(off_dice - on_dice) <= 0.005))


def prefetch_study(size: int, repeats: int = 3) -> list[Row]:
    """Box-up to mask through the local worker: on a slice prefetched while the worker was idle, and on a cold one."""
    from MedSAM2HITLLib.worker_client import WorkerClient

    volume, _, key, box = object_volume(40, size)
    client = WorkerClient()
    try:
        client.load_model(random_checkpoint(Path(tempfile.gettempdir()) / "medsam2hitl-bench", size), device="cpu",
                          threads=THREADS).wait(600)
        client.set_volume("v", volume).wait(120)
        cold, warm = [], []
        for n in range(repeats):
            started = time.perf_counter()
            client.segment_slice("v", 0, 2 + n, box, window="abdomen").wait(120)
            cold.append(time.perf_counter() - started)
            client.prefetch("v", 0, 20 + 4 * n, window="abdomen", neighbours=0).wait(120)  # while the user draws
            started = time.perf_counter()
            client.segment_slice("v", 0, 20 + 4 * n, box, window="abdomen").wait(120)
            warm.append(time.perf_counter() - started)
    finally:
        client.shutdown()
    return [prefetched_row(f"MedSAM2 random init ({size}), local worker", warm, cold)]


def prefetched_row(where: str, warm: list[float], cold: list[float]) -> Row:
    """The table row of box-up to mask times: prefetched against cold, and their ratio (target: decoder only)."""
    ratio = float(np.median(warm) / np.median(cold))
    return (f"{where}: box-up to mask, median of {len(warm)}: prefetched / cold",
            f"{np.median(warm) * 1000:.0f} / {np.median(cold) * 1000:.0f} ms: {ratio:.2f}", "≤ 0.15", ok(ratio <= 0.15))


def prefetch_service_study(checkpoint: Path, label: str, size: int, repeats: int = 10) -> list[Row]:
    """Box-up to mask through the service (HTTP, Celery, Redis): on a slice prefetched while idle, and a cold one."""
    import json

    import redis

    sys.path.insert(0, str(REPO / "Testing" / "Python"))
    from bench_service import nifti_bytes, upload
    from service_fixtures import Service

    volume, _, _, box = object_volume(12 + 5 * repeats + 4, size)
    with tempfile.TemporaryDirectory() as folder:
        service = Service(Path(folder), extra_env={"MEDSAM2HITL_CHECKPOINT": str(checkpoint),
                                                   "MEDSAM2HITL_THREADS": str(THREADS)})
        try:
            service.start(ready_seconds=900)  # a model at 512 loads slowly on a shared CPU
            replies = redis.Redis(port=service.redis_port, decode_responses=True)
            with service.client() as client:
                job_id = upload(client, nifti_bytes(volume))[0]

                def box_up(index: int) -> float:
                    started = time.perf_counter()
                    response = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json={
                        "view": "axial", "slice": index, "box": list(box), "window": "abdomen"})
                    response.raise_for_status()
                    assert response.json()["embedding_cached"] == (index >= 12)
                    return time.perf_counter() - started

                cold, warm = [], []
                for n in range(repeats):
                    cold.append(box_up(n))
                    prefetch = client.post(f"/api/v1/jobs/{job_id}/prefetch",
                                           json={"view": "axial", "slice": 14 + 5 * n, "window": "abdomen"})
                    prefetch.raise_for_status()  # the user draws meanwhile: wait until the worker has encoded
                    done = json.loads(replies.blpop([f"m2h:reply:{prefetch.json()['prefetch']}"], timeout=600)[1])
                    assert done["ok"]["gave_way"] is False, done
                    warm.append(box_up(14 + 5 * n))
        finally:
            service.stop()
    return [prefetched_row(f"{label}, service", warm, cold)]


def print_rows(title: str, rows: Iterator[Row]) -> None:
    """Each row as soon as it is measured, flushed: a run stopped part-way keeps what it measured."""
    started = time.perf_counter()
    print(f"\n{title}\nmeasure | value | target | ok", flush=True)
    for row in rows:
        print(" | ".join(row), flush=True)
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="gaps,volumes,prefetch,prefetch-service",
                        help="comma-separated, run in this order")
    parser.add_argument("--size", type=int, default=512, help="in-plane size (and image size) of random MedSAM2")
    parser.add_argument("--slices", default="60,150,300")
    args = parser.parse_args()
    slice_counts = [int(n) for n in args.slices.split(",")]
    studies = {
        "gaps": ("Gaps inside tracked objects, fixture", gaps_study),
        "volumes": ("Time to a finished segment, whole range, early stop off / on",
                    lambda: volumes_study(args.size, slice_counts)),
        "prefetch": ("First mask: prefetched slice vs cold", lambda: prefetch_study(args.size)),
        "prefetch-service": ("First mask through the service: prefetched slice vs cold", lambda: [
            *prefetch_service_study(FIXTURE, "fixture (128)", 128),
            *prefetch_service_study(random_checkpoint(Path(tempfile.gettempdir()) / "medsam2hitl-bench", args.size),
                                    f"MedSAM2 random init ({args.size})", args.size)]),
    }
    for part in args.parts.split(","):
        if part not in studies:
            parser.error(f"unknown part {part!r}: choose from {', '.join(studies)}")
        title, study = studies[part]
        print_rows(title, study())


if __name__ == "__main__":
    main()
