"""Celery tasks: the model work of a job, run in the worker process that holds the job's volume.

Every task is claimed once by its request id (a broker redelivery never runs it twice) and answers through the
job store: a reply for the API to hand back, events for the job's stream, the job's state and progress.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import numpy as np
from celery import shared_task, signals

from MedSAM2HITLLib.engine import EARLY_STOP_PATIENCE, PREFETCH_MAX_NEIGHBOURS
from MedSAM2HITLLib.errors import BadInputError, MedSAM2Error, PropagationCancelled

from MedSAM2HITLLib import mask_codec, slice_rules
from . import ahead
from .celery_app import worker_queue
from .session import LABELS_FILE, WorkerSession, keep
from .settings import Settings, load
from .store import JobStore, connect

log = logging.getLogger("medsam2hitl_server.worker")
# This process's worker, set up when the worker starts (_set_up): importing the tasks reads no settings, opens no
# connection and loads no model.
settings: Settings
store: JobStore
session: WorkerSession
NAME: str
_model_info: dict = {}
_busy = threading.Event()


class NotBound(MedSAM2Error):
    """A task for a job that is bound to another worker now (this one stalled and was given up meanwhile)."""


@signals.worker_init.connect
def _set_up(**_) -> None:
    global settings, store, session, NAME
    settings = load()
    store = JobStore(connect(settings.redis_url), settings.job_ttl_seconds, settings.worker_dead_after_seconds)
    session = WorkerSession(settings)
    NAME = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


@signals.worker_ready.connect
def _start(**_) -> None:
    """Load the model once, then announce this worker (and its queue) with a heartbeat of its own thread."""
    _model_info.update(session.load_model())
    log.info("worker %s ready on %s", NAME, _model_info.get("device"))
    threading.Thread(target=_heartbeat, name="heartbeat", daemon=True).start()


@signals.worker_shutdown.connect
def _stop(**_) -> None:
    store.worker_gone(NAME)


def _heartbeat() -> None:
    """Beat every few seconds. Before the first beat, jobs still bound to this worker's name are released: they
    are an exited process's of the same name (a container restarted as the same pid, a fixed
    MEDSAM2HITL_WORKER_NAME). After it, a worker that replaces one its supervisor saw exit declares that one dead,
    so that the API moves its jobs here at once rather than after its heartbeat lapses."""
    first = True
    while True:
        try:
            if first:
                for job_id in store.jobs_of(NAME):
                    store.orphaned(job_id)
                    store.bind(job_id, None)  # parked: the API binds it to a live worker, then it loads afresh
            store.heartbeat(NAME, worker_queue(NAME), {"pid": os.getpid(), "host": socket.gethostname(),
                                                      "busy": _busy.is_set(), "model": _model_info})
            if first and settings.replaces_pid:
                for name in store.replaced(socket.gethostname(), settings.replaces_pid, NAME):
                    log.info("worker %s replaces %s, whose process exited", NAME, name)
            first = False
        except Exception as error:  # Redis restarting: keep trying, the key expires meanwhile
            log.warning("heartbeat failed: %s", error.__class__.__name__)
        time.sleep(settings.worker_heartbeat_seconds)


def _failure(error: BaseException, job_id: str) -> dict:
    """The one-line error of a failed task; a job deleted while the task ran is no fault (its files went away)."""
    if isinstance(error, MedSAM2Error):
        return {"kind": error.kind, "message": str(error)}
    if store.get(job_id) is None:
        return {"kind": "bad_input", "message": "the job was deleted"}
    log.exception("task failed")
    return {"kind": "internal", "message": f"{error.__class__.__name__} in the worker; see the worker's log"}


def _replying(function):
    """Run a request/reply task once and always answer, with the result or a one-line error."""

    def run(job_id: str, request_id: str, *args):
        if not store.claim(request_id):
            return
        _busy.set()
        try:
            store.reply(request_id, {"ok": function(job_id, *args)})
        except Exception as error:
            store.reply(request_id, {"error": _failure(error, job_id)})
        finally:
            _busy.clear()
            _drop_if_deleted(job_id)

    run.__name__ = function.__name__
    return run


def _opened(job_id: str):
    """The job's volume in this worker, for a job bound to this worker only; loaded again (stored labels and the
    slice events after them) when this copy is from an earlier binding."""
    record = store.get(job_id)
    if record is None:
        raise BadInputError("the job no longer exists")
    if record.worker != NAME:
        raise NotBound("the job moved to another model worker; send the request again")
    fresh = job_id not in session.jobs or session.jobs[job_id].binding != record.binding
    volume = session.open(job_id, record.volume_file, record.binding)
    if fresh:
        for named in record.objects:  # objects named before, also the empty ones
            volume.voxels.setdefault(named["object"], 0)
        if _replay(job_id, volume, record.labels_event):
            _save(job_id, volume)
    if not record.loaded:
        store.update(job_id, loaded=True, geometry=volume.geometry())
        if record.state == "queued":
            store.set_state(job_id, "ready")
    return volume


@shared_task(name="medsam2hitl.load_job")
@_replying
def load_job(job_id: str) -> dict:
    return _opened(job_id).geometry()


@shared_task(name="medsam2hitl.segment_2d")
@_replying
def segment_2d(job_id: str, params: dict) -> dict:
    volume = _opened(job_id)
    engine = session.engine_for(job_id, volume)
    points = params.get("points") or None
    number = params.get("object", 1)
    prompt = _prompt(volume, params, need_box=not points, key_mask=False)
    axis, index = prompt["axis"], prompt["index"]
    cached = engine.is_cached(axis, index, params.get("window", "mr"))
    current = volume.object_slice(axis, index, number) if points else None  # what the clicks correct
    started = time.perf_counter()
    mask = engine.segment_slice(axis, index, prompt["box"], params.get("window", "mr"), points, current)
    seconds = time.perf_counter() - started
    volume.write(axis, index, mask, number)
    _save(job_id, volume)
    return {"object": number, "view": params["view"], "array_axis": axis, "slice": index,
            "box": None if prompt["box"] is None else list(prompt["box"]), "seconds": round(seconds, 4),
            "embedding_cached": cached, "mask": mask_codec.encode(mask)}


@shared_task(name="medsam2hitl.write_slice")
@_replying
def write_slice(job_id: str, params: dict) -> dict:
    from MedSAM2HITLLib.roi_box import array_axis_for_view

    volume = _opened(job_id)
    axis = array_axis_for_view(volume.node, params["view"])
    index = params["slice"]
    slice_rules.check_slice(index, volume.labels.shape[axis], f"the {params['view']} view")
    number = params.get("object", 1)
    voxels = _write_encoded(volume, axis, index, params["mask"], number)
    _save(job_id, volume)
    return {"object": number, "view": params["view"], "array_axis": axis, "slice": index, "voxels": voxels}


@shared_task(name="medsam2hitl.propagate")
def propagate(job_id: str, propagation_id: str, params: dict) -> None:
    """Fill the range slice by slice for each of the request's objects in one pass (each slice encoded once); each
    slice of each object is an event, and the labels keep every finished slice."""
    if not store.claim(propagation_id):
        return
    _busy.set()
    completed: list[int] = []
    try:
        volume = _opened(job_id)
        engine = session.engine_for(job_id, volume)
        shared = {name: value for name, value in params.items() if name != "objects"}
        numbers, prompts, kept = [], [], []
        found = [_prompt(volume, {**shared, **item}, need_box=False) for item in params["objects"]]
        axis = found[0]["axis"]
        start, end = min(f["start"] for f in found), max(f["end"] for f in found)
        for item, prompt in zip(params["objects"], found):
            number, key, user_mask = item.get("object", 1), prompt["index"], prompt.get("mask")
            conditioning = _conditioning(volume, axis, item.get("conditioning") or [], key, number)
            if user_mask is not None:  # "from this slice": the user's slice stays exactly as drawn
                volume.write(axis, key, user_mask, number)
            numbers.append(number)
            prompts.append({**conditioning, key: user_mask if user_mask is not None else prompt["box"]})
            kept.append(slice_rules.user_slices(prompts[-1]))
        store.set_state(job_id, "running", done=0, total=(end - start + 1) * len(numbers), error="")
        early_stop = params.get("early_stop", True) is True and params.get("range", "whole") != "custom"
        slices = engine.propagate_objects(axis, prompts, start, end, params.get("window", "mr"),
                                          bool(params.get("largest_component")),
                                          lambda: store.cancel_requested(job_id, propagation_id),
                                          EARLY_STOP_PATIENCE if early_stop else None)
        for item in slices:
            number = numbers[item.object]
            told = store.event(job_id, "slice", {
                "propagation": propagation_id, "object": number, "slice": item.index, "array_axis": axis,
                "done": item.completed, "total": item.total, "mask": mask_codec.encode(item.mask)},
                holder=propagation_id)
            if told is None:  # deleted, or given up by the API: this propagation no longer owns the job
                raise PropagationCancelled(completed)
            volume.last_event = told
            if item.index not in kept[item.object]:
                volume.write(axis, item.index, item.mask, number)
            slice_rules.note_completed(completed, item.index)
            store.update(job_id, done=item.completed, total=item.total)
            _save(job_id, volume, force=False)
        _save(job_id, volume)
        outcome = ("succeeded", "", "done", {"propagation": propagation_id, "slices": len(completed),
                                             "ended_early": slices.ended_early})
    except PropagationCancelled as cancelled:
        _keep(job_id)
        outcome = ("cancelled", "", "cancelled", {"propagation": propagation_id, "slices": len(cancelled.completed)})
    except Exception as error:
        _keep(job_id)
        failure = _failure(error, job_id)
        outcome = ("failed", failure["message"], "error",
                   {"propagation": propagation_id, **failure, "slices_kept": len(completed)})
    finally:
        held = store.unlock(job_id, propagation_id)
        _busy.clear()
        _drop_if_deleted(job_id)
    if held:  # told after the unlock: a client that reads them may act at once; else the job is gone or moved
        state, message, kind, data = outcome
        store.set_state(job_id, state, error=message)
        store.event(job_id, kind, data)


@signals.worker_ready.connect
def _nothing_waits(**_) -> None:
    ahead.reset(store.redis, NAME)


@signals.task_prerun.connect
def _request_started(sender=None, **_) -> None:
    ahead.started(store.redis, NAME, sender.name)


@shared_task(name=ahead.PREFETCH_TASK)
def prefetch(job_id: str, request_id: str, params: dict) -> None:
    """Encode the slice the user looks at and its neighbours while no real request waits (see ahead.py); the
    reply, which nobody waits for, says what was encoded and whether it gave way."""
    from MedSAM2HITLLib.roi_box import array_axis_for_view

    if not store.claim(request_id):
        return

    def gives_way() -> bool:
        return ahead.gives_way(store.redis, NAME, request_id)

    try:
        if gives_way():
            store.reply(request_id, {"ok": {"encoded": [], "gave_way": True}})
            return
        volume = _opened(job_id)
        engine = session.engine_for(job_id, volume)
        encoded, gave_way = engine.prefetch_around(array_axis_for_view(volume.node, params["view"]),
                                                   params["slice"], params.get("window", "mr"),
                                                   PREFETCH_MAX_NEIGHBOURS, gives_way)
        store.reply(request_id, {"ok": {"encoded": encoded, "gave_way": gave_way}})
    except Exception as error:
        store.reply(request_id, {"error": _failure(error, job_id)})
    finally:
        _drop_if_deleted(job_id)


@shared_task(name="medsam2hitl.export")
@_replying
def export(job_id: str, fmt: str, number: int | None = None, names: list[str] | None = None,
           colors: list[str] | None = None) -> dict:
    """Write one object's mask (0/1), or all objects (label value = object number; in .seg.nrrd one segment per
    object, named and coloured (rrggbb hex, else Slicer's default) by `names` and `colors` in number order, as the
    client shows them), as NIfTI (the input's affine and voxel order) or .seg.nrrd."""
    from MedSAM2HITLLib.export import export_label_array_nifti, export_seg_nrrd
    from MedSAM2HITLLib.segment_writer import create_segmentation, get_or_create_segment, write_slices

    volume = _opened(job_id)
    known = sorted(volume.voxels) or [1]
    if number is not None and number not in volume.voxels:
        raise BadInputError(f"the job has no object {number}; its objects are {', '.join(map(str, known))}")
    numbers = known if number is None else [number]
    names, colors = list(names or []), list(colors or [])
    if len(names) > len(numbers) or len(colors) > len(numbers):
        raise BadInputError(f"more segment names or colours than the {len(numbers)} object(s) of the result: give "
                            "at most one per object")
    names += [f"Segment_{n}" for n in numbers[len(names):]]
    name = f"result.{fmt}"  # written, read back and only then put in place by the exporters
    if fmt == "seg.nrrd":
        segmentation = create_segmentation(session.scene, volume.node, "result")
        try:
            for at, (value, segment_name) in enumerate(zip(numbers, names)):
                segment_id = get_or_create_segment(segmentation, segment_name)
                if at < len(colors):
                    segmentation.GetSegmentation().GetSegment(segment_id).SetColor(
                        *(int(colors[at][i:i + 2], 16) / 255 for i in (0, 2, 4)))
                planes = {k: plane == value for k, plane in enumerate(volume.labels)}
                write_slices(segmentation, segment_id, volume.node, 0, {k: m for k, m in planes.items() if m.any()})
            export_seg_nrrd(segmentation, volume.folder / name)
        finally:
            session.scene.RemoveNode(segmentation)
    else:
        labels = volume.labels if number is None else (volume.labels == number).astype(np.uint8)
        export_label_array_nifti(labels, volume.node, volume.folder / name)
    keep(settings, job_id, volume.folder / name)
    return {"file": name, "objects": numbers, "names": names}


@shared_task(name="medsam2hitl.forget")
def forget(job_id: str) -> None:
    session.delete(job_id)


def _drop_if_deleted(job_id: str) -> None:
    """After each task: a job deleted while it ran leaves nothing in this worker, in memory or on disk."""
    if store.get(job_id) is None:
        session.delete(job_id)


def _keep(job_id: str) -> None:
    """Save what a stopped propagation finished; a failure here is logged, never hides the first one."""
    volume = session.jobs.get(job_id)
    try:
        if volume is not None:
            _save(job_id, volume)
    except Exception:
        if store.get(job_id) is not None:  # a deleted job's folder may go away under the save
            log.exception("could not save the labels of a stopped propagation")


def _save(job_id: str, volume, force: bool = True) -> None:
    """Save the labels and note the last slice event they include: a worker taking over replays the rest.

    Only while the job exists and is bound to this worker under the binding its copy was loaded from: a deleted
    job's folder is not re-created, and a stale copy never overwrites what another worker saved. A worker with a
    data folder of its own sends them to the API only at the end of an action.
    """
    record = store.get(job_id)
    if record is None or record.worker != NAME or record.binding != volume.binding:
        return
    if not volume.save_labels(force):
        return
    store.update(job_id, objects=volume.objects())
    if settings.api_url and not force:
        return
    keep(settings, job_id, volume.folder / LABELS_FILE)
    store.update(job_id, labels_event=volume.last_event)


def _replay(job_id: str, volume, after: str) -> int:
    """Apply the slices streamed after the labels were last saved (their worker stopped before saving them)."""
    replayed = 0
    for entry_id, kind, data in store.events_since(job_id, after):
        if kind == "slice":
            event = json.loads(data)
            _write_encoded(volume, event["array_axis"], event["slice"], event["mask"], event.get("object", 1))
            replayed += 1
        volume.last_event = entry_id
    return replayed


def _write_encoded(volume, axis: int, index: int, payload: dict, number: int) -> int:
    """Write an encoded mask (a client's, or a slice event's) as object `number`'s on one slice; the voxels it
    holds there now."""
    mask = mask_codec.decode(payload, slice_rules.slice_shape(volume.labels.shape, axis))
    return volume.write(axis, index, mask, number)


def _conditioning(volume, axis: int, slices: list[int], key: int, number: int) -> dict[int, np.ndarray]:
    """Object `number`'s current masks on the user's corrected slices (index → mask); each must hold one."""
    masks = {}
    for index in slices:
        if index == key:
            continue
        slice_rules.check_slice(index, volume.labels.shape[axis], "this view", "conditioning slice")
        mask = volume.object_slice(axis, index, number)
        if not mask.any():
            raise BadInputError(f"conditioning slice {index} has no mask of object {number}: draw it "
                                "(PUT .../slices) first")
        masks[index] = mask
    return masks


def _prompt(volume, params: dict, need_box: bool, key_mask: bool = True) -> dict:
    """Axis, key slice, box (or, with `key_mask`, the mask that prompts without one) and range of a request, from
    RAS corners or voxel indices."""
    from MedSAM2HITLLib.roi_box import (array_axis_for_view, key_slice_index, roi_box, roi_from_corners,
                                        roi_slice_range)

    axis = array_axis_for_view(volume.node, params["view"])
    count = volume.array.shape[axis]
    found: dict = {"axis": axis}
    extent = None
    if params.get("box_ras") is not None:
        roi = roi_from_corners(session.scene, volume.node, params["box_ras"])
        try:
            found["index"] = key_slice_index(volume.node, roi, axis)
            found["box"] = roi_box(volume.node, roi, axis, found["index"])
            extent = roi_slice_range(volume.node, roi, axis)
        finally:
            session.scene.RemoveNode(roi)
    else:
        found["index"] = params.get("slice")
        if found["index"] is None:
            raise BadInputError("give 'slice' (the key slice) with 'box', or a 'box_ras'")
        slice_rules.check_slice(found["index"], count, f"the {params['view']} view")
        found["box"] = params.get("box")
    if found["box"] is None and (need_box or key_mask):
        if need_box:
            raise BadInputError("give a 'box' (with 'slice') or a 'box_ras'")
        if params.get("mask") is not None:
            found["mask"] = mask_codec.decode(params["mask"], slice_rules.slice_shape(volume.array.shape, axis))
        else:
            number = params.get("object", 1)
            found["mask"] = volume.object_slice(axis, found["index"], number)
            if not found["mask"].any():
                raise BadInputError(f"slice {found['index']} has no mask yet (object {number}): segment it first "
                                    "or send a box")
    start, end = slice_rules.resolve_range(params.get("range") or "whole", count, extent, params.get("start"),
                                           params.get("end"))
    found["start"], found["end"] = slice_rules.check_range(start, end, count, [found["index"]])
    return found
