"""The scripting API: ROI box prompts and propagation into segments, through the background worker.

Works on any MRML scene (Slicer's, or a headless slicer-core one). Requests are asynchronous: each method
returns a `Request` at once and calls `on_done`/`on_error` later on the thread that pumps the worker (Slicer's
main thread, or the caller of `Request.wait()`), so every MRML write happens on that thread. A segmentation
history state is saved right before each write, so `undo()` removes exactly one action.

Console example (Slicer's Python console; node names are examples):

    import MedSAM2HITLLib.logic as m
    logic = m.SegmentationLogic()
    logic.load_model("MedSAM2_latest").wait()
    volume = getNode("CTChest"); roi = getNode("R"); seg = None
    request = logic.segment_slice(volume, roi, seg, axis="axial", window="lung")
    seg, segment_id = request.wait()
    logic.propagate(volume, seg, segment_id, axis="axial", roi_node=roi, window="lung").wait()
    logic.undo(seg)

Clicks come from a markups point list (label "-" = negative; `point_prompts.add_point` labels them), e.g.
`logic.segment_slice(volume, None, seg, segment_id, points_node=getNode("P"))` corrects that slice; several
ROIs go through one pass with `logic.propagate_objects(volume, seg, [(roi1, None), (roi2, None)])`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import point_prompts, roi_box, segment_writer, slice_rules, slice_sources
from .errors import BadInputError, MedSAM2Error
from .worker_client import WorkerClient
from .worker_request import Request

WRITE_INTERVAL_SECONDS = 0.3  # streamed slices are written (and rendered) at most this often


class SegmentationLogic:
    """MedSAM2 prompts → segments, with undo; one worker client shared by all requests."""

    def __init__(self, client: WorkerClient | None = None, editor_for: Callable | None = None):
        """`editor_for(segmentation_node)`: the Segment Editor whose undo stack results go on (None: our own)."""
        self.client = client or WorkerClient()
        self.editor_for = editor_for
        self._histories: dict[str, segment_writer.SegmentationHistory] = {}
        self._volume_ids: dict[str, str] = {}  # volume node ID → ID of the array the worker has

    def load_model(self, checkpoint: str | Path = "MedSAM2_latest", device: str = "auto", threads: int | None = None,
                   precision: str = "auto", on_done=None, on_error=None) -> Request:
        """Start the worker with a registry checkpoint name or a local file (raises if it is not downloaded)."""
        from .checkpoints import resolve_checkpoint

        path = resolve_checkpoint(str(checkpoint))
        return self.client.load_model(path, device=device, threads=threads, precision=precision, on_done=on_done,
                                      on_error=on_error)

    def segment_slice(self, volume_node, roi_node=None, segmentation_node=None, segment_id: str | None = None,
                      axis="axial", window="mr", points_node=None, on_done=None, on_error=None) -> Request:
        """Segment one slice from the ROI's box and/or the clicks of a point list; result: (segmentation, segment id).

        The slice is the one through the ROI centre, or without an ROI the one of the last point placed. Clicks
        on that slice correct the segment's current mask there (SAM2's mask input). Only that slice of the
        segment is replaced, and it becomes one of the user's (conditioning) slices. Without a segmentation node
        one is created; without a segment ID the segment named after the ROI (or point list) is used.
        """
        check_volume_node(volume_node)
        if roi_node is None and points_node is None:
            raise BadInputError("segmenting a slice needs an ROI (a box) or a point list (clicks)")
        axis_index = self.array_axis(volume_node, axis)
        if roi_node is not None:
            index = self.key_slice(volume_node, roi_node, axis_index)
            box = roi_box.roi_box(volume_node, roi_node, axis_index, index)
        else:
            index = point_prompts.latest_point_slice(volume_node, points_node, axis_index)
            box = None
        points = [] if points_node is None else point_prompts.slice_points(volume_node, points_node, axis_index, index)
        if box is None and not any(p.positive for p in points):
            raise BadInputError(f"no positive click of '{points_node.GetName()}' lies on slice {index}: add one "
                                "inside the object (or use an ROI)")
        segmentation_node, segment_id = self._target(volume_node, segmentation_node, segment_id,
                                                     roi_node or points_node)
        current = None
        if points:
            current = segment_writer.read_slice(segmentation_node, segment_id, volume_node, axis_index, index)
        result = Request(self.client, "segment_slice", on_done=on_done, on_error=on_error)

        def write(mask: np.ndarray) -> None:
            self.history(segmentation_node).save_state()
            segment_writer.write_slice(segmentation_node, segment_id, volume_node, axis_index, index, mask)
            slice_sources.record(segmentation_node, segment_id, axis_index, user=[index])
            result.finish((segmentation_node, segment_id))

        volume_id = self._send_volume(volume_node)
        request = self.client.segment_slice(volume_id, axis_index, index, box, self.window(volume_node, window),
                                            points=[p.as_list() for p in points], mask=current)
        request.then(_guarded(write, result), result.fail)
        return result

    def propagate(self, volume_node, segmentation_node, segment_id: str, axis="axial", roi_node=None,
                  from_segment: bool = False, key_index: int | None = None, start: int | None = None,
                  end: int | None = None, range_from_roi: bool = False, window="mr", largest_component: bool = False,
                  early_stop: bool = True, on_progress: Callable[[int, int], None] | None = None, on_done=None,
                  on_error=None) -> Request:
        """Fill slices forward and backward from a key slice; result: the list of slice indices written.

        The prompt is the ROI's box on the slice through its centre, or (`from_segment`) the segment's own mask
        on `key_index` (a corrected slice). Every other slice of the user's in the range conditions the tracking
        too and is kept exactly as drawn. From a corrected slice without a given range, only what depends on it
        is re-run: the slices between the user's nearest slices below and above it. Slices are written as they
        arrive; a cancelled or failed propagation keeps the slices already written, and one `undo()` removes
        them all.

        `early_stop` (whole volume and ROI-extent ranges): each direction stops once the object has ended, and
        the slices beyond are left as they are; the result's `reply["ended_early"]` says where. A range you give
        is followed exactly, and so is the range a corrected slice depends on once the segment has predicted
        slices (it already ends where the segment does, and stopping sooner would leave stale slices in it).
        """
        check_volume_node(volume_node)
        axis_index = self.array_axis(volume_node, axis)
        whole = start is None and end is None
        if from_segment:
            if key_index is None:
                raise BadInputError("'propagate from this slice' needs the slice index (key_index)")
            prompt = segment_writer.read_slice(segmentation_node, segment_id, volume_node, axis_index, key_index)
            if not prompt.any():
                raise BadInputError(f"segment '{segment_id}' is empty on slice {key_index}: draw or segment it first")
            if start is None and end is None and not range_from_roi:
                start, end = self._dependent_range(volume_node, segmentation_node, segment_id, axis_index, key_index)
        elif roi_node is None:
            raise BadInputError("propagation needs an ROI (box prompt) or from_segment=True")
        else:
            if key_index is None:
                key_index = self.key_slice(volume_node, roi_node, axis_index)
            prompt = roi_box.roi_box(volume_node, roi_node, axis_index, key_index)
        if range_from_roi:
            if roi_node is None:
                raise BadInputError("a range from the ROI's extent needs an ROI")
            start, end = roi_box.roi_slice_range(volume_node, roi_node, axis_index)
        self.check_range(volume_node, axis_index, key_index, start, end)
        segmentation_node, segment_id = self._target(volume_node, segmentation_node, segment_id, roi_node)
        early_stop = early_stop and (range_from_roi or (whole and not (
            from_segment and self.slice_sources(segmentation_node, segment_id).predicted_slices(axis_index))))
        prompts = {**self._user_slices(volume_node, segmentation_node, segment_id, axis_index, start, end),
                   key_index: prompt}
        result = Request(self.client, "propagate", on_done=on_done, on_error=on_error)
        writer = _StreamWriter(self.history(segmentation_node), segmentation_node, [(segment_id, key_index, prompts)],
                               volume_node, axis_index, allow_overlap=True, on_progress=on_progress)
        volume_id = self._send_volume(volume_node)
        request = self.client.propagate_objects(volume_id, axis_index, [prompts], start, end,
                                                self.window(volume_node, window), largest_component,
                                                on_slice=_guarded(writer.arrived, result), early_stop=early_stop)
        _finish_with(request, writer, result, segment_id)
        return result

    def propagate_objects(self, volume_node, segmentation_node, objects, axis="axial", start: int | None = None,
                          end: int | None = None, window="mr", allow_overlap: bool = False, early_stop: bool = True,
                          on_progress: Callable[[int, int], None] | None = None, on_done=None,
                          on_error=None) -> Request:
        """Several objects in one pass: `objects` is [(ROI node, segment ID or None)], each ROI's box on the slice
        through its centre, with the segment's own user slices as more conditioning. Result: segment ID →
        slice indices written. Each slice is encoded once for all objects. Unless `allow_overlap`, a voxel
        already given to an earlier object of the list on that slice is left out of later ones. `early_stop`
        (whole volume only): each direction stops once every object has ended there.
        """
        check_volume_node(volume_node)
        if not objects:
            raise BadInputError("propagate_objects needs at least one (ROI, segment) pair")
        axis_index = self.array_axis(volume_node, axis)
        if segmentation_node is None:
            segmentation_node = segment_writer.create_segmentation(volume_node.GetScene(), volume_node)
        targets = []
        for roi_node, segment_id in objects:
            key_index = self.key_slice(volume_node, roi_node, axis_index)
            self.check_range(volume_node, axis_index, key_index, start, end)
            segmentation_node, segment_id = self._target(volume_node, segmentation_node, segment_id, roi_node)
            prompts = {**self._user_slices(volume_node, segmentation_node, segment_id, axis_index, start, end),
                       key_index: roi_box.roi_box(volume_node, roi_node, axis_index, key_index)}
            targets.append((segment_id, key_index, prompts))
        if len({segment_id for segment_id, _, _ in targets}) != len(targets):
            raise BadInputError("two objects write into the same segment: give each ROI a segment of its own")
        result = Request(self.client, "propagate", on_done=on_done, on_error=on_error)
        writer = _StreamWriter(self.history(segmentation_node), segmentation_node, targets, volume_node, axis_index,
                               allow_overlap=allow_overlap, on_progress=on_progress)
        volume_id = self._send_volume(volume_node)
        request = self.client.propagate_objects(volume_id, axis_index, [prompts for _, _, prompts in targets], start,
                                                end, self.window(volume_node, window),
                                                on_slice=_guarded(writer.arrived, result),
                                                early_stop=early_stop and start is None and end is None)
        _finish_with(request, writer, result)
        return result

    def prefetch(self, volume_node, axis, index: int, window="mr", on_done=None, on_error=None) -> Request:
        """Have an idle worker encode slice `index` (and its neighbours) ahead of a prompt drawn there; it gives
        way to any real request (client.prefetch)."""
        check_volume_node(volume_node)
        return self.client.prefetch(self._send_volume(volume_node), self.array_axis(volume_node, axis), index,
                                    self.window(volume_node, window), on_done=on_done, on_error=on_error)

    def slice_sources(self, segmentation_node, segment_id: str) -> slice_sources.SliceSources:
        """Which slices of the segment are the user's (conditioning) and which were predicted."""
        return slice_sources.read(segmentation_node, segment_id)

    def cancel(self) -> bool:
        """Stop the running request; completed slices stay."""
        return self.client.cancel()

    def undo(self, segmentation_node) -> bool:
        return self.history(segmentation_node).undo()

    def redo(self, segmentation_node) -> bool:
        return self.history(segmentation_node).redo()

    def stop_worker(self, at_once: bool = False) -> None:
        """Stop the worker politely, or `at_once` (Slicer closing or reloading the module must not wait)."""
        if at_once:
            self.client.kill()
        else:
            self.client.shutdown()

    def forget_scene(self) -> None:
        """The scene is closing: the worker drops its copies of the scene's volumes, undo histories go."""
        for volume_id in self._volume_ids.values():
            self.client.forget_volume(volume_id)
        self._volume_ids.clear()
        self._histories.clear()

    def use_client(self, client: WorkerClient) -> None:
        """Run from now on through `client` (this computer ↔ the service); undo histories are kept."""
        self.client.shutdown()
        self.client = client
        self._volume_ids.clear()

    def history(self, segmentation_node) -> segment_writer.SegmentationHistory:
        key = segmentation_node.GetID()
        history = self._histories.get(key)
        if history is None or history.segmentation_node is not segmentation_node:  # IDs recur in a new scene
            editor = self.editor_for(segmentation_node) if self.editor_for else None
            history = self._histories[key] = segment_writer.SegmentationHistory(segmentation_node, editor)
        return history

    @staticmethod
    def array_axis(volume_node, axis) -> int:
        """A view name (axial/coronal/sagittal) or an array axis (0, 1, 2 of the [k, j, i] array)."""
        if isinstance(axis, str):
            return roi_box.array_axis_for_view(volume_node, axis)
        return int(axis)

    @staticmethod
    def key_slice(volume_node, roi_node, axis: int) -> int:
        """The slice through the ROI's centre; a NaN or infinite centre (a hand-edited file) is refused."""
        if roi_node is not None and not np.all(np.isfinite(roi_node.GetCenterWorld())):
            centre = list(roi_node.GetCenterWorld())
            raise BadInputError(f"ROI '{roi_node.GetName()}' has no finite centre ({centre}); place the ROI again")
        return roi_box.key_slice_index(volume_node, roi_node, axis)

    @staticmethod
    def check_range(volume_node, axis: int, key_index: int, start: int | None, end: int | None) -> None:
        """Refuse a range outside the volume, or without the key slice, before any work is sent to the worker."""
        slice_rules.check_range(start, end, roi_box.volume_shape(volume_node)[axis], [key_index])

    @staticmethod
    def window(volume_node, window):
        """'display' means the volume's current display window/level (read, never changed)."""
        if window != "display":
            return window
        display = volume_node.GetDisplayNode()
        if display is None:
            raise BadInputError(f"volume '{volume_node.GetName()}' has no display node to take a window from")
        return (display.GetWindow(), display.GetLevel())

    def _send_volume(self, volume_node) -> str:
        """The worker gets each volume once; a changed voxel array gets a new ID and is sent again."""
        import slicer.util

        node_id = volume_node.GetID()
        volume_id = f"{node_id}@{volume_node.GetImageData().GetMTime()}"
        if self._volume_ids.get(node_id) != volume_id:
            if node_id in self._volume_ids:
                self.client.forget_volume(self._volume_ids[node_id])
            self.client.set_volume(volume_id, slicer.util.arrayFromVolume(volume_node))
            self._volume_ids[node_id] = volume_id
        return volume_id

    @staticmethod
    def _target(volume_node, segmentation_node, segment_id, prompt_node):
        if segmentation_node is None:
            segmentation_node = segment_writer.create_segmentation(volume_node.GetScene(), volume_node)
        name = prompt_node.GetName() if prompt_node is not None else "MedSAM2"
        return segmentation_node, segment_writer.get_or_create_segment(segmentation_node, name, segment_id)

    @staticmethod
    def _user_slices(volume_node, segmentation_node, segment_id, axis: int, start, end) -> dict[int, np.ndarray]:
        """The segment's user slices in the range that still hold a mask, as mask prompts (index → mask)."""
        first, last = slice_rules.slice_range(start, end, roi_box.volume_shape(volume_node)[axis])
        prompts = {}
        for index in slice_sources.read(segmentation_node, segment_id).user_slices(axis):
            if first <= index <= last:
                mask = segment_writer.read_slice(segmentation_node, segment_id, volume_node, axis, index)
                if mask.any():
                    prompts[index] = mask
        return prompts

    @staticmethod
    def _dependent_range(volume_node, segmentation_node, segment_id, axis: int, key_index: int) -> tuple[int, int]:
        """What a correction on `key_index` changes: up to the user's nearest slices on each side, or where
        there is none, to the end of what the segment has on that side (the volume's end if nothing)."""
        sources = slice_sources.read(segmentation_node, segment_id)
        below, above = sources.neighbours(axis, key_index)
        extent = sources.extent(axis)
        last = roi_box.volume_shape(volume_node)[axis] - 1
        if below is None:
            below = extent[0] if extent and extent[0] < key_index else 0
        if above is None:
            above = extent[1] if extent and extent[1] > key_index else last
        return below, above


class _StreamWriter:
    """Writes streamed slices of one or more objects into their segments in batches, and records which slices
    are the user's and which predicted. The undo state is saved before the first write; the user's mask
    slices (conditioning) are never written. Without `allow_overlap`, a voxel an earlier object of the list
    holds on a slice is left out of later objects' masks there."""

    def __init__(self, history, segmentation_node, targets, volume_node, axis: int, allow_overlap: bool,
                 on_progress=None):
        self.history, self.segmentation_node, self.volume_node, self.axis = history, segmentation_node, volume_node, axis
        self.targets = targets  # [(segment ID, key slice, {index: box or mask})]
        self.allow_overlap, self.on_progress = allow_overlap, on_progress
        self.pending: dict[int, dict[int, np.ndarray]] = {n: {} for n in range(len(targets))}
        self.held: dict[int, dict[int, np.ndarray]] = {}  # slice → object → its mask (for the overlap rule)
        self.written: dict[str, list[int]] = {segment_id: [] for segment_id, _, _ in targets}
        self.saved = False
        self.last_write = time.monotonic()

    def arrived(self, item) -> None:
        segment_id, _, prompts = self.targets[item.object]
        if item.index not in slice_rules.user_slices(prompts):
            if self.allow_overlap:
                self.pending[item.object][item.index] = item.mask
            else:  # objects reach a slice in any order (other passes): each later one loses what earlier ones hold
                masks = self.held.setdefault(item.index, {})
                masks[item.object] = item.mask
                taken = np.zeros_like(item.mask)
                for number in sorted(masks):
                    if number >= item.object:
                        self.pending[number][item.index] = masks[number] & ~taken
                    taken |= masks[number]
        if self.on_progress is not None:
            self.on_progress(item.completed, item.total)
        if time.monotonic() - self.last_write >= WRITE_INTERVAL_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not any(self.pending.values()):
            return
        if not self.saved:
            self.history.save_state()
            self.saved = True
        for number, masks in self.pending.items():
            if not masks:
                continue
            segment_id, key_index, _ = self.targets[number]
            segment_writer.write_slices(self.segmentation_node, segment_id, self.volume_node, self.axis, masks)
            for index in masks:
                slice_rules.note_completed(self.written[segment_id], index)
            slice_sources.record(self.segmentation_node, segment_id, self.axis,
                                 user=[key_index] if key_index in masks else (), predicted=masks)
        self.pending = {n: {} for n in self.pending}
        self.last_write = time.monotonic()

    def finish(self) -> dict[str, list[int]]:
        """Write what is left (also after a cancel or a failure: finished work is kept); segment ID → slices."""
        self.flush()
        if self.saved:  # the key slice of a "from this slice" propagation is the user's, though never written
            for segment_id, key_index, prompts in self.targets:
                slice_sources.record(self.segmentation_node, segment_id, self.axis,
                                     user=sorted(slice_rules.user_slices(prompts)))
        return self.written


def check_volume_node(volume_node) -> None:
    """Refuse what is not a volume node in a scene with a clear message, instead of an AttributeError later."""
    if isinstance(volume_node, np.ndarray):
        raise BadInputError(
            f"expected a volume node, got a numpy array ({volume_node.dtype}); add it to the scene as a volume first "
            "(as an integer or float32 array: VTK has no bool or float16 voxels)"
        )
    if not hasattr(volume_node, "GetImageData"):
        raise BadInputError(f"expected a volume node, got {type(volume_node).__name__}; select a loaded volume")
    if volume_node.GetScene() is None:
        raise BadInputError(f"volume '{volume_node.GetName()}' is no longer in the scene; select a loaded volume")
    roi_box.volume_shape(volume_node)  # refuses a node without voxels


def _finish_with(request: Request, writer: _StreamWriter, result: Request, segment_id: str | None = None) -> None:
    """End `result` when the propagation ends: with the slices written (of `segment_id`, or per segment), or with
    the error, after writing what had arrived (completed work is kept on cancel or crash)."""

    def finished(_) -> None:
        written = writer.finish()
        result.reply = request.reply  # e.g. where the object ended (`ended_early`)
        result.finish(written if segment_id is None else written[segment_id])

    def failed(error: MedSAM2Error) -> None:
        writer.finish()
        result.fail(error)

    request.then(_guarded(finished, result), _guarded(failed, result))


def _guarded(callback, result: Request):
    """Run a step of a request; an exception fails the request instead of vanishing in a callback."""

    def run(argument) -> None:
        try:
            callback(argument)
        except MedSAM2Error as error:
            result.fail(error)
        except Exception as error:  # a bug must still end the request, with its message
            result.fail(MedSAM2Error(f"{error.__class__.__name__}: {error}"))

    return run
