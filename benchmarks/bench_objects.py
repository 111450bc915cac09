"""Five objects on one volume through the inference service: one job holding five objects against five jobs.

The same session both ways with the fixture model: each object gets a box on its key slice (segment-2d), is
propagated through the whole volume and downloaded. As five jobs (what the web viewer's *New object* did): five
uploads, five worker loads, five propagations that each encode every slice. As one job: one upload, one worker
load, one propagation carrying all five objects (each slice encoded once for all of them), one download.
Counted at the client: uploads and their bytes, and worker loads (a job's status turning `loaded`: a worker read
the volume from disk into memory; no worker restarts here, so each job is loaded once).

    .venv/bin/python benchmarks/bench_objects.py [--size 48,160,160]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ok, print_table  # noqa: E402

sys.path.insert(0, str(REPO / "Testing" / "Python"))
sys.path.insert(0, str(REPO / "Testing" / "Training"))
OBJECTS = 5
WINDOW = "abdomen"


def nifti_bytes(volume) -> bytes:
    import nibabel as nib
    import numpy as np

    return nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.eye(4)).to_bytes()


def object_prompts(phantom) -> list[dict]:
    """Five boxes: around the phantom's objects on their largest slices, then around blocks of the body."""
    import numpy as np

    prompts = []
    for mask in phantom.objects:
        k = int(np.argmax(mask.sum(axis=(1, 2))))
        rows, cols = np.nonzero(mask[k])
        prompts.append({"slice": k, "box": [int(cols.min()) - 1, int(rows.min()) - 1, int(cols.max()) + 1,
                                            int(rows.max()) + 1]})
    slices, rows, cols = phantom.volume.shape
    for step in range(OBJECTS - len(prompts)):
        k, y, x = slices // 2, rows // 4 + step * rows // 8, cols // 4 + step * cols // 8
        prompts.append({"slice": k, "box": [x, y, x + cols // 6, y + rows // 6]})
    return prompts[:OBJECTS]


class Session:
    """Counts what the client sends: uploads and their bytes."""

    def __init__(self, client, data: bytes):
        self.client, self.data, self.uploads, self.sent, self.loads = client, data, 0, 0, 0

    def upload(self) -> str:
        response = self.client.post("/api/v1/jobs", content=self.data)
        response.raise_for_status()
        self.uploads += 1
        self.sent += len(self.data)
        job_id = response.json()["id"]
        while not self.client.get(f"/api/v1/jobs/{job_id}/status").json()["loaded"]:
            time.sleep(0.02)
        self.loads += 1
        return job_id

    def segment(self, job_id: str, prompt: dict, number: int) -> None:
        self.client.post(f"/api/v1/jobs/{job_id}/segment-2d",
                         json={**prompt, "object": number, "window": WINDOW}).raise_for_status()

    def propagate(self, job_id: str, body: dict) -> int:
        """Slice events of the propagation until it is done."""
        started = self.client.post(f"/api/v1/jobs/{job_id}/propagate", json={**body, "window": WINDOW})
        started.raise_for_status()
        slices, kind = 0, None
        with self.client.stream("GET", f"/api/v1/jobs/{job_id}/events",
                                params={"after": started.json()["events_after"]}) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and json.loads(line[6:]).get("propagation"):
                    if kind == "slice":
                        slices += 1
                    elif kind in ("done", "cancelled", "error"):
                        if kind != "done":
                            raise RuntimeError(line)
                        return slices
        raise RuntimeError("the event stream ended early")

    def download(self, job_id: str) -> None:
        self.client.get(f"/api/v1/jobs/{job_id}/result").raise_for_status()


def five_jobs(session: Session, prompts: list[dict]) -> int:
    slices = 0
    for prompt in prompts:
        job_id = session.upload()
        session.segment(job_id, prompt, 1)
        slices += session.propagate(job_id, prompt)
        session.download(job_id)
    return slices


def one_job(session: Session, prompts: list[dict]) -> int:
    job_id = session.upload()
    for number, prompt in enumerate(prompts, start=1):
        session.segment(job_id, prompt, number)
    slices = session.propagate(job_id, {"objects": [{**p, "object": n} for n, p in enumerate(prompts, start=1)]})
    session.download(job_id)
    return slices


def main() -> None:
    import httpx
    from phantoms import make_phantom
    from service_fixtures import Service

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="48,160,160", help="slices,rows,cols of the phantom volume")
    args = parser.parse_args()
    phantom = make_phantom(7, size=tuple(int(n) for n in args.size.split(",")), modality="ct")
    data, prompts = nifti_bytes(phantom.volume), object_prompts(phantom)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        service = Service(Path(folder)).start()
        try:
            with httpx.Client(base_url=service.url, timeout=900) as client:
                timed = {}
                for name, run in (("five jobs", five_jobs), ("one job", one_job)):
                    session = Session(client, data)
                    started = time.perf_counter()
                    slices = run(session, prompts)
                    timed[name] = time.perf_counter() - started
                    rows += [(f"{name}: uploads (MB sent)", f"{session.uploads} ({session.sent / 1e6:.1f})",
                              "1" if name == "one job" else "", ok(session.uploads == 1) if name == "one job" else ""),
                             (f"{name}: worker loads", str(session.loads), "", ""),
                             (f"{name}: slice events, seconds", f"{slices}, {timed[name]:.1f}", "", "")]
                rows.append(("five jobs / one job (time)", f"{timed['five jobs'] / timed['one job']:.2f}", "> 1",
                             ok(timed["five jobs"] > timed["one job"])))
        finally:
            service.stop()
    print(f"phantom {args.size} int16, {OBJECTS} objects, fixture model on CPU (1 thread)")
    print_table("Five objects on one volume through the service (upload, 2D box, propagate, download each)", rows)


if __name__ == "__main__":
    main()
