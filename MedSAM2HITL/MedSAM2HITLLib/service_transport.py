"""The inference service as a worker: the worker protocol's requests carried out over the service's HTTP API.

`WorkerClient(transport_factory=service_transport_factory(url, token))` gives SegmentationLogic, the panel and
the CLI the shared service instead of a local process, with the same requests, streamed slices, cancel and
errors. One thread talks HTTP (standard library only: nothing to install into Slicer); replies become protocol
frames that the client dispatches on the thread that pumps it, as with a local worker.

A volume is uploaded once per job as raw NRRD on an identity grid, so the service's voxel indices are the
array's own ([k, j, i]; array axes 0, 1, 2 are its axial, coronal and sagittal views). A job the service has
expired is uploaded again, transparently.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from typing import Callable

import numpy as np

from . import __version__, mask_codec, slice_rules
from .errors import MedSAM2Error
from .protocol import HEARTBEAT_SECONDS, PROTOCOL_VERSION, FrameReader, encode_bytes
from .subprocess_transport import SubprocessTransport

VIEW_OF_AXIS = ("axial", "coronal", "sagittal")  # on the identity grid of the uploaded NRRD
CONNECT_SECONDS = 10.0  # connecting, and any request that is not an upload or a wait for slices
UPLOAD_SECONDS = 600.0
SLICE_SECONDS = 120.0  # longest wait for the next event of a propagation (the service sends keep-alives)
LOAD_POLL_SECONDS = 0.1
NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
              "uint32": "uint32", "float32": "float", "float64": "double"}


class ServiceError(MedSAM2Error):
    """The service answered with an error; `kind` follows its HTTP status."""

    def __init__(self, message: str, kind: str = "internal", status: int | None = None):
        super().__init__(message)
        self.kind, self.status = kind, status


class Unreachable(Exception):
    """The service cannot be reached (refused, reset, timed out): the transport ends."""


def _ended_early_of_all(ends: list[dict]) -> dict:
    """Objects propagated one after another: a direction ended early where every object did, at the farthest
    slice any of them reached (as one pass over all of them reports it)."""
    farthest = {"forward": max, "backward": min}
    return {direction: pick(end[direction] for end in ends) for direction, pick in farthest.items()
            if ends and all(direction in end for end in ends)}


def service_transport_factory(url: str, token: str | None = None) -> Callable:
    """A WorkerClient transport factory for the service at `url` (e.g. http://gpu-box:8000)."""
    return lambda handler: ServiceTransport(handler, url, token)


def nrrd_bytes(array: np.ndarray) -> list:
    """A [k, j, i] array as an attached-header raw NRRD on the identity RAS grid (buffers, not copied)."""
    array = np.ascontiguousarray(array)
    kind = NRRD_TYPES.get(array.dtype.newbyteorder("=").name)
    if kind is None:
        raise ServiceError(f"volumes of type {array.dtype} cannot be sent to the service", "bad_input")
    header = (
        "NRRD0004\n"
        f"type: {kind}\ndimension: 3\nspace: right-anterior-superior\n"
        f"sizes: {array.shape[2]} {array.shape[1]} {array.shape[0]}\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\n"
        f"endian: {'big' if array.dtype.byteorder == '>' else 'little'}\nencoding: raw\nspace origin: (0,0,0)\n\n"
    )
    return [header.encode("ascii"), memoryview(array).cast("B")]


class ServiceApi:
    """The few calls the transport makes, with one-line errors. Standard library only."""

    def __init__(self, url: str, token: str | None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body=None, timeout: float = CONNECT_SECONDS, raw: bool = False):
        data, headers = body, dict(self.headers)
        if body is not None and not raw:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif raw:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(sum(len(part) for part in body))
            data = _Chunks(body)
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise self.failure(error.code, error.read()) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise Unreachable(f"the service at {self.url} is unreachable ({reason}); check the URL and that "
                              "it is running") from None
        return json.loads(payload) if payload else {}

    def events(self, job_id: str, after: str):
        """(kind, data) of the job's events after `after`, as they arrive."""
        request = urllib.request.Request(f"{self.url}/api/v1/jobs/{job_id}/events?after={after}",
                                         headers=self.headers)
        try:
            response = urllib.request.urlopen(request, timeout=SLICE_SECONDS)
        except urllib.error.HTTPError as error:
            raise self.failure(error.code, error.read()) from None
        except (urllib.error.URLError, OSError) as error:
            raise Unreachable(f"lost the connection to the service at {self.url} ({error})") from None
        with response:
            kind = None
            while True:
                try:
                    line = response.readline()
                except OSError as error:
                    raise Unreachable(f"lost the connection to the service at {self.url} ({error})") from None
                if not line:
                    raise Unreachable(f"the service at {self.url} closed the event stream")
                text = line.decode("utf-8").rstrip("\r\n")
                if text.startswith("event: "):
                    kind = text[7:]
                elif text.startswith("data: "):
                    yield kind, json.loads(text[6:])

    def failure(self, status: int, body: bytes) -> ServiceError:
        try:
            detail = json.loads(body).get("detail", "")
        except ValueError:
            detail = body[:200].decode("utf-8", "replace")
        if status == 401:
            return ServiceError(f"the service refused the token ({detail}); check the token you gave", "bad_input",
                                status)
        kind = {400: "bad_input", 409: "bad_input", 422: "bad_input", 413: "bad_input",
                503: "out_of_memory" if "memory" in str(detail) else "internal"}.get(status, "internal")
        return ServiceError(f"the service said: {detail} ({status})", kind, status)


class _Chunks:
    """A request body read from several buffers without joining them (a volume is not copied)."""

    def __init__(self, parts: list):
        self.parts = [memoryview(part).cast("B") for part in parts]

    def read(self, size: int = -1) -> bytes:
        while self.parts and not len(self.parts[0]):
            self.parts.pop(0)
        if not self.parts:
            return b""
        size = len(self.parts[0]) if size is None or size < 0 else size
        chunk, self.parts[0] = self.parts[0][:size], self.parts[0][size:]
        return bytes(chunk)


class ServiceTransport(SubprocessTransport):
    """A 'worker' that is the service: frames in, HTTP calls made by one thread, frames out."""

    def __init__(self, handler, url: str, token: str | None = None):
        super().__init__(handler)
        self.api = ServiceApi(url, token)
        self.jobs: dict[str, str] = {}  # volume_id → job id
        self.volumes: dict[str, np.ndarray] = {}  # kept to upload again when the service expired a job
        self.running: dict[int, str] = {}  # request id → job id of a running propagation
        self._requests: queue.Queue = queue.Queue()
        self._reader = FrameReader()
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._serve, name="service", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="service-heartbeat", daemon=True).start()

    def send(self, buffers: list) -> None:
        self._reader.feed(b"".join(bytes(b) for b in buffers))
        while (frame := self._reader.next_frame()) is not None:
            if frame.type == "cancel":  # at once, also while a propagation holds the request thread
                threading.Thread(target=self._cancel, args=(frame.fields.get("request"),), daemon=True).start()
            else:
                self._requests.put(frame)

    def close_input(self) -> None:
        self._requests.put(None)

    def kill(self) -> None:
        self._stopped.set()
        self._requests.put(None)
        self._events.put(("exit", "the connection to the service was stopped"))

    def close(self, timeout: float) -> None:
        self.kill()
        self.pump(0.5)

    def _dispatch(self, event) -> None:
        channel, data = event
        if channel == "exit":
            self.ended(data)
        else:
            super()._dispatch(event)

    # ---- the request thread ----

    def _reply(self, type: str, id, fields: dict | None = None, arrays: dict | None = None) -> None:
        self._events.put(("out", encode_bytes(type, id, fields or {}, arrays)))

    def _heartbeat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            self._reply("heartbeat", None)

    def _serve(self) -> None:
        while (frame := self._requests.get()) is not None and not self._stopped.is_set():
            try:
                handler = getattr(self, f"_on_{frame.type}", None)
                if handler is None:
                    raise ServiceError(f"'{frame.type}' is not available through the service", "bad_input")
                handler(frame)
            except ServiceError as error:
                self._reply("error", frame.id, {"kind": error.kind, "message": str(error)})
            except Unreachable as error:
                self._events.put(("exit", str(error)))
                return
        self._events.put(("exit", "the connection to the service was closed"))

    def _on_hello(self, frame) -> None:
        server = self.api.call("GET", "/api/v1/models")
        self._reply("done", frame.id, {"version": PROTOCOL_VERSION, "package": __version__, "server": server})

    def _on_load_model(self, frame) -> None:
        """The service has its own model; the answer says which (the requested checkpoint is not sent)."""
        server = self.api.call("GET", "/api/v1/models")
        if not server.get("models"):
            raise ServiceError("the service has no model worker running; ask its administrator", "model")
        model = server["models"][0]
        self._reply("done", frame.id, {"checkpoint": model["name"], "device": f"{model['device']} (service)",
                                       "image_size": model.get("image_size"), "service": self.api.url})

    def _on_set_volume(self, frame) -> None:
        volume_id, volume = frame.fields["volume_id"], frame.arrays["volume"]
        self.volumes[volume_id] = volume
        self.jobs.pop(volume_id, None)
        job_id = self._job(volume_id)
        self._reply("done", frame.id, {"volume_id": volume_id, "job": job_id, "shape": list(volume.shape),
                                       "dtype": str(volume.dtype)})

    def _on_forget_volume(self, frame) -> None:
        volume_id = frame.fields.get("volume_id")
        job_id = self.jobs.pop(volume_id, None)
        self.volumes.pop(volume_id, None)
        if job_id is not None:
            try:
                self.api.call("DELETE", f"/api/v1/jobs/{job_id}")
            except ServiceError:
                pass  # already expired or deleted: nothing left to free
        self._reply("done", frame.id, {})

    def _on_status(self, frame) -> None:
        self._reply("done", frame.id, {"service": self.api.call("GET", "/api/v1/models")})

    def _on_shutdown(self, frame) -> None:
        self._reply("done", frame.id, {})
        self._stopped.set()

    def _on_segment_2d(self, frame) -> None:
        f = frame.fields
        view = VIEW_OF_AXIS[f["axis"]]
        body = {"view": view, "slice": f["index"], "box": f.get("box"), "window": f.get("window", "mr")}
        if f.get("points"):
            body["points"] = f["points"]

        def segment(job: str) -> dict:
            if f.get("points"):  # the clicks correct the client's current mask of the slice: the job gets it first
                current = frame.arrays.get("mask")
                if current is None:
                    current = np.zeros(self._slice_shape(f["volume_id"], f["axis"]), dtype=bool)
                self._put_slice(job, view, f["index"], current)
            return self.api.call("POST", f"/api/v1/jobs/{job}/segment-2d", body, timeout=SLICE_SECONDS)

        reply = self._on_job(f["volume_id"], segment)
        mask = mask_codec.decode(reply["mask"], tuple(reply["mask"]["shape"]))
        self._reply("done", frame.id, {"seconds": reply["seconds"]}, {"mask": mask})

    def _on_propagate(self, frame) -> None:
        """The service propagates one object per request: several objects run one after another."""
        f = frame.fields
        completed: list[int] = []
        ends: list[dict] = []  # each object's `ended_early`
        done_before = 0
        try:
            for number, described in enumerate(f["objects"]):
                outcome = self._propagate_object(frame, number, described, completed, done_before, ends)
                if outcome is not None:
                    self._reply(*outcome)
                    return
                done_before += self._range_length(f)
            self._reply("done", frame.id, {"completed": completed, "ended_early": _ended_early_of_all(ends)})
        finally:
            self.running.pop(frame.id, None)

    def _propagate_object(self, frame, number: int, described: dict, completed: list[int], done_before: int,
                          ends: list[dict]):
        """Run one object's propagation, relaying its slices; a final reply (type, id, fields) if it failed or was
        cancelled. Where the object ended (its `done` event's `ended_early`) goes to `ends`.

        The event stream ends only in one of these events, or by raising when the connection is lost. Early stop
        (the frame's `early_stop`) reaches the service for the whole range only: it follows custom ranges exactly."""
        f = frame.fields
        axis, volume_id = f["axis"], f["volume_id"]
        view, total = VIEW_OF_AXIS[axis], self._range_length(f) * len(f["objects"])
        masks = {index: frame.arrays[f"mask{number}_{index}"] for index in described.get("masks") or []}
        boxes = {box[0]: box[1:] for box in described.get("boxes") or []}
        key = min(boxes) if boxes else min(masks)
        whole = f.get("early_stop") is True and f.get("start") is None and f.get("end") is None
        body = {"view": view, "slice": key, "window": f.get("window", "mr"), "range": "whole" if whole else "custom",
                "largest_component": bool(f.get("largest_component")), "early_stop": whole,
                "conditioning": sorted(index for index in masks if index != key)}
        if not whole:
            body["start"], body["end"] = self._range(f)
        if key in boxes:
            body["box"] = boxes[key]
        else:
            body["mask"] = mask_codec.encode(masks[key])

        def start(job: str) -> dict:
            for index in body["conditioning"]:  # the user's slices live in the job's labels while it propagates
                self._put_slice(job, view, index, masks[index])
            return {**self.api.call("POST", f"/api/v1/jobs/{job}/propagate", body), "job": job}

        started = self._on_job(volume_id, start)
        self.running[frame.id] = started["job"]
        shape = self._slice_shape(volume_id, axis)
        for kind, data in self.api.events(started["job"], started["events_after"]):
            if data.get("propagation") != started["propagation"]:
                continue
            if kind == "slice":
                slice_rules.note_completed(completed, data["slice"])
                self._reply("slice", frame.id, {"index": data["slice"], "completed": done_before + data["done"],
                                                "total": total, "object": number},
                            {"mask": mask_codec.decode(data["mask"], shape)})
            elif kind == "done":
                ends.append(data.get("ended_early") or {})
                return None
            elif kind == "cancelled":
                return "cancelled", frame.id, {"completed": completed}
            elif kind == "error":
                kind_of = data.get("kind") if data.get("kind") in ("bad_input", "out_of_memory") else "internal"
                return "error", frame.id, {"kind": kind_of, "message": data.get("message", "failed")}

    def _range(self, fields: dict) -> tuple[int, int]:
        """The request's slice range, a missing end meaning the volume's end on that side."""
        count = self.volumes[fields["volume_id"]].shape[fields["axis"]]
        return slice_rules.slice_range(fields.get("start"), fields.get("end"), count)

    def _range_length(self, fields: dict) -> int:
        start, end = self._range(fields)
        return end - start + 1

    def _slice_shape(self, volume_id: str, axis: int) -> tuple[int, int]:
        return slice_rules.slice_shape(self.volumes[volume_id].shape, axis)

    def _put_slice(self, job: str, view: str, index: int, mask: np.ndarray) -> None:
        self.api.call("PUT", f"/api/v1/jobs/{job}/slices",
                      {"view": view, "slice": index, "mask": mask_codec.encode(mask)}, timeout=SLICE_SECONDS)

    def _cancel(self, request_id) -> None:
        job_id = self.running.get(request_id)
        if job_id is None:
            return
        try:
            self.api.call("POST", f"/api/v1/jobs/{job_id}/cancel")
        except (ServiceError, Unreachable):
            pass  # finished meanwhile, or the service is gone: the request thread reports that

    def _job(self, volume_id: str) -> str:
        """The job holding this volume, uploading it (again) and waiting until a worker has loaded it."""
        if volume_id in self.jobs:
            return self.jobs[volume_id]
        if volume_id not in self.volumes:
            raise ServiceError(f"unknown volume '{volume_id}': send it first", "bad_input")
        created = self.api.call("POST", "/api/v1/jobs", nrrd_bytes(self.volumes[volume_id]), UPLOAD_SECONDS,
                                raw=True)
        job_id = created["id"]
        while not self._stopped.is_set():
            status = self.api.call("GET", f"/api/v1/jobs/{job_id}/status")
            if status["loaded"]:
                break
            if status.get("queue_position") is not None:  # 0-based, behind the task the worker is running
                self._reply("notice", None, {"message": "the service is busy: this volume is number "
                                                        f"{status['queue_position'] + 1} in its worker's queue"})
            self._stopped.wait(LOAD_POLL_SECONDS)
        self._reply("notice", None, {"message": ""})
        self.jobs[volume_id] = job_id
        return job_id

    def _on_job(self, volume_id: str, call: Callable[[str], dict]) -> dict:
        """Run a call on the volume's job; a job the service expired or lost is uploaded again once."""
        try:
            return call(self._job(volume_id))
        except ServiceError as error:
            if error.status not in (404, 410):
                raise
        self.jobs.pop(volume_id, None)
        return call(self._job(volume_id))
