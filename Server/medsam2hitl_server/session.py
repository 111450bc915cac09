"""What a worker process keeps warm: the model (Engine) and, per job, its volume, labels and geometry.

A job's objects share one uint8 label array whose value is the object's number (0: none). A voxel belongs to one
object at most, the one that took it first: writing another object's slice (a segment-2d, a propagated slice, a
PUT) leaves it to its holder, so objects never clobber each other. To give it to another object, clear it from
its holder first (PUT that object's slice).

Volumes are read with MedSAM2HITLLib's loader into a headless MRML scene, so voxel indices, RAS boxes and the
exported NIfTI follow exactly the rules of the Slicer module and the CLI.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from MedSAM2HITLLib.errors import BadInputError

from . import shared_files
from .settings import Settings

LABELS_FILE = "labels.npy"
SAVE_EVERY_SECONDS = 5.0


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir / "jobs" / job_id


def keep(settings: Settings, job_id: str, path: Path) -> None:
    """A file the API serves or a later worker reads: sent to the API when this worker's folder is its own."""
    if settings.api_url:
        shared_files.send_file(settings, job_id, path)


@dataclass
class JobVolume:
    """One job's volume node, its [k, j, i] array (read-only view) and the labels made so far."""

    node: object
    array: np.ndarray
    labels: np.ndarray
    folder: Path
    binding: str = ""  # the job's binding to this worker when it was loaded (JobStore.bind)
    saved_at: float = field(default_factory=time.monotonic)
    last_event: str = "0-0"  # the last slice event of the job's stream that the labels include
    voxels: dict[int, int] = field(default_factory=dict)  # object number → voxels it holds (named objects only)

    def __post_init__(self):
        counts = np.zeros(256, np.int64)
        for plane in self.labels:  # slice by slice: bincount of the whole array would make an int64 copy of it
            counts += np.bincount(plane.ravel(), minlength=256)
        self.voxels = {int(number): int(counts[number]) for number in np.flatnonzero(counts[1:]) + 1}

    def object_slice(self, axis: int, index: int, number: int) -> np.ndarray:
        """Object `number`'s mask on one slice."""
        return np.take(self.labels, index, axis=axis) == number

    def write(self, axis: int, index: int, mask: np.ndarray, number: int) -> int:
        """Make `mask` object `number`'s mask on one slice, except voxels another object holds; returns the voxels
        the object holds there now."""
        region = [slice(None)] * 3
        region[axis] = index
        plane = self.labels[tuple(region)]  # a view into the labels
        held = plane == number
        taken = mask.astype(bool) & ((plane == 0) | held)
        plane[held] = 0
        plane[taken] = number
        now = int(np.count_nonzero(taken))
        self.voxels[number] = self.voxels.get(number, 0) - int(np.count_nonzero(held)) + now
        return now

    def objects(self) -> list[dict]:
        return [{"object": number, "voxels": count} for number, count in sorted(self.voxels.items())]

    def geometry(self) -> dict:
        from MedSAM2HITLLib.roi_box import array_axis_for_view, volume_ijk_to_world

        views = {}
        for view in ("axial", "coronal", "sagittal"):
            axis = array_axis_for_view(self.node, view)
            views[view] = {"array_axis": axis, "slices": int(self.array.shape[axis])}
        return {"shape_kji": list(self.array.shape), "dtype": str(self.array.dtype),
                "ijk_to_ras": np.round(volume_ijk_to_world(self.node), 6).tolist(), "views": views}

    def save_labels(self, force: bool = True) -> bool:
        """Keep the labels on disk (atomically); without `force` at most every few seconds. True if saved."""
        if not force and time.monotonic() - self.saved_at < SAVE_EVERY_SECONDS:
            return False
        partial = self.folder / f".{LABELS_FILE}.partial"
        with open(partial, "wb") as f:
            np.save(f, self.labels, allow_pickle=False)
        os.replace(partial, self.folder / LABELS_FILE)
        self.saved_at = time.monotonic()
        return True


class WorkerSession:
    """The engine and the jobs this worker process holds."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = None
        self.scene = None
        self.jobs: dict[str, JobVolume] = {}

    def load_model(self) -> dict:
        from MedSAM2HITLLib.checkpoints import resolve_checkpoint
        from MedSAM2HITLLib.engine import Engine
        from MedSAM2HITLLib.mrml_scene import create_scene

        self.scene = create_scene()
        checkpoint = resolve_checkpoint(self.settings.checkpoint)
        self.engine = Engine.load(checkpoint, device=self.settings.device, threads=self.settings.threads or None,
                                  precision=self.settings.precision)
        return self.engine.info()

    def open(self, job_id: str, volume_file: str, binding: str = "") -> JobVolume:
        """Load a job's volume (and labels saved by an earlier worker) unless this process has it already, from the
        same `binding`: a copy from an earlier one is dropped, since another worker may have changed the labels."""
        import slicer.util

        from MedSAM2HITLLib.mrml_scene import load_volume
        from MedSAM2HITLLib.volume_file import check_self_contained

        if job_id in self.jobs:
            if self.jobs[job_id].binding == binding:
                return self.jobs[job_id]
            self.close(job_id)
        folder = job_dir(self.settings, job_id)
        path = folder / volume_file
        if self.settings.api_url:
            for needed in (path, folder / LABELS_FILE):
                if not needed.is_file():
                    shared_files.fetch_file(self.settings, job_id, needed)
        if not path.is_file():
            raise BadInputError("the job's volume is no longer on the server; upload it again")
        check_self_contained(path)  # again here: a file may reach the data folder by other means than an upload
        node = load_volume(self.scene, path, name=job_id, max_bytes=self.settings.max_volume_bytes)
        array = slicer.util.arrayFromVolume(node)
        array.flags.writeable = False
        labels = np.zeros(array.shape, np.uint8)
        saved = folder / LABELS_FILE
        if saved.is_file():
            stored = np.load(saved, allow_pickle=False)
            if stored.shape == labels.shape:
                labels[...] = stored
        self.jobs[job_id] = JobVolume(node, array, labels, folder, binding)
        return self.jobs[job_id]

    def engine_for(self, job_id: str, volume: JobVolume):
        self.engine.set_volume(volume.array, job_id)
        return self.engine

    def close(self, job_id: str) -> None:
        volume = self.jobs.pop(job_id, None)
        if volume is not None and self.scene is not None:
            self.scene.RemoveNode(volume.node)
        if self.engine is not None:
            self.engine.forget_volume(job_id)

    def delete(self, job_id: str) -> None:
        """Forget a deleted job and remove its folder here too (a folder of this worker's own, or what a save
        racing the API's removal left)."""
        self.close(job_id)
        shutil.rmtree(job_dir(self.settings, job_id), ignore_errors=True)
