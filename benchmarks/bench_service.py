"""What the inference service adds over the local worker, with the same warm model on this machine: 2D latency
(round trip minus the model's own time), propagation per slice, and the upload of a 512x512x300 int16 volume.

Starts its own redis-server, one Celery worker and the API on loopback (the tests' fixture), then makes the
same WorkerClient calls on a local worker and on the service (through ServiceTransport, as the Slicer panel and
the CLI do), interleaved so that machine load hits both alike.

    .venv/bin/python benchmarks/bench_service.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ok, print_table, random_checkpoint, synthetic_volume  # noqa: E402

sys.path.insert(0, str(REPO / "Testing" / "Python"))
THREADS = 2
BOX = (150, 160, 360, 330)
SLICES = 24


def nifti_bytes(volume) -> bytes:
    import nibabel as nib
    import numpy as np

    return nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.eye(4)).to_bytes()


def upload(client, data: bytes) -> tuple[str, float, float]:
    """Job id, seconds for the upload (201), seconds until a worker has loaded the volume."""
    started = time.perf_counter()
    response = client.post("/api/v1/jobs", content=data)
    response.raise_for_status()
    uploaded = time.perf_counter() - started
    job_id = response.json()["id"]
    while not client.get(f"/api/v1/jobs/{job_id}/status").json()["loaded"]:
        time.sleep(0.02)
    return job_id, uploaded, time.perf_counter() - started


def bench(service, checkpoint: Path, repeats: int) -> list[tuple]:
    """The same WorkerClient calls on a local worker and, through ServiceTransport, on the service."""
    import httpx
    import numpy as np

    from MedSAM2HITLLib.service_transport import service_transport_factory
    from MedSAM2HITLLib.worker_client import WorkerClient

    volume = synthetic_volume(SLICES)
    clients = {"local": WorkerClient(), "service": WorkerClient(service_transport_factory(service.url))}
    added = {where: [] for where in clients}
    per_slice = {where: [] for where in clients}
    for client in clients.values():
        client.load_model(checkpoint, device="cpu", threads=THREADS).wait(300)
        client.set_volume("bench", volume)

    def segment(where: str, index: int) -> None:
        started = time.perf_counter()
        request = clients[where].segment_slice("bench", 0, index, BOX, window="abdomen")
        request.wait(300)
        added[where].append(time.perf_counter() - started - request.reply["seconds"])

    def propagate(where: str) -> None:
        started = time.perf_counter()
        clients[where].propagate("bench", 0, SLICES // 2, BOX, window="abdomen").wait(900)
        per_slice[where].append((time.perf_counter() - started) / SLICES)

    try:
        segment("local", 0), segment("service", 0)  # the volume reaches both before timing
        for round_ in range(repeats):
            for index in range(SLICES):  # misses then hits on each slice, alternating who goes first
                for where in (("service", "local") if (index + round_) % 2 else ("local", "service")):
                    segment(where, index)
        for round_ in range(max(1, repeats)):
            for where in (("service", "local") if round_ % 2 == 0 else ("local", "service")):
                propagate(where)
    finally:
        for client in clients.values():
            client.shutdown()
    with httpx.Client(base_url=service.url, timeout=600) as http:
        data = nifti_bytes(synthetic_volume(300))
        _, upload_s, loaded_s = upload(http, data)
    ms = {where: np.array(values) * 1000 for where, values in added.items()}
    ratio = statistics.median(per_slice["service"]) / statistics.median(per_slice["local"])
    return [
        ("2D added latency: service, median / p95 (ms)",
         f"{np.median(ms['service']):.1f} / {np.percentile(ms['service'], 95):.1f}", "<= 30 median",
         ok(np.median(ms["service"]) <= 30)),
        ("2D added latency: local worker, median / p95 (ms)",
         f"{np.median(ms['local']):.1f} / {np.percentile(ms['local'], 95):.1f}", "", ""),
        (f"propagation per slice, N={SLICES}: service / local (ms)",
         f"{statistics.median(per_slice['service']) * 1000:.0f} / {statistics.median(per_slice['local']) * 1000:.0f}",
         "", ""),
        ("propagation per slice: service / local", f"{ratio:.3f}", "<= 1.05", ok(ratio <= 1.05)),
        (f"upload 512x512x300 int16 NIfTI ({len(data) / 1e6:.0f} MB): 201 / loaded in a worker (s)",
         f"{upload_s:.2f} / {loaded_s:.2f}", "", ""),
        ("upload throughput (MB/s)", f"{len(data) / 1e6 / upload_s:.0f}", "", ""),
    ]


def main() -> None:
    from service_fixtures import Service

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    checkpoint = random_checkpoint(Path(tempfile.gettempdir()) / "medsam2hitl-bench")
    with tempfile.TemporaryDirectory() as folder:
        service = Service(Path(folder), extra_env={"MEDSAM2HITL_CHECKPOINT": str(checkpoint),
                                                   "MEDSAM2HITL_THREADS": str(THREADS)})
        try:
            service.start()
            print(f"CPU, {THREADS} threads, random-init MedSAM2 (Hiera-T, 512), synthetic int16 512x512 slices")
            print_table("Inference service vs local worker (same model, warm)",
                        bench(service, checkpoint, 1 if args.quick else 2))
        finally:
            service.stop()
    print("  'added latency' = round trip minus the model's own time for that request, per request.")


if __name__ == "__main__":
    main()
