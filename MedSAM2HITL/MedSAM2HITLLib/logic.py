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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import roi_box, segment_writer
from .client import Request, WorkerClient
from .errors import BadInputError, MedSAM2Error

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

    def segment_slice(self, volume_node, roi_node, segmentation_node=None, segment_id: str | None = None,
                      axis="axial", window="mr", on_done=None, on_error=None) -> Request:
        """Segment the slice through the ROI centre from the ROI's box; result: (segmentation node, segment id).

        Only that slice of the segment is replaced. Without a segmentation node one is created; without a
        segment ID the segment named after the ROI is used (created if missing).
        """
        check_volume_node(volume_node)
        axis_index = self.array_axis(volume_node, axis)
        index = self.key_slice(volume_node, roi_node, axis_index)
        box = roi_box.roi_box(volume_node, roi_node, axis_index, index)
        segmentation_node, segment_id = self._target(volume_node, segmentation_node, segment_id, roi_node)
        result = Request(self.client, "segment_slice", on_done=on_done, on_error=on_error)

        def write(mask: np.ndarray) -> None:
            self.history(segmentation_node).save_state()
            segment_writer.write_slice(segmentation_node, segment_id, volume_node, axis_index, index, mask)
            result.finish((segmentation_node, segment_id))

        volume_id = self._send_volume(volume_node)
        request = self.client.segment_slice(volume_id, axis_index, index, box, self.window(volume_node, window))
        request.then(_guarded(write, result), result.fail)
        return result

    def propagate(self, volume_node, segmentation_node, segment_id: str, axis="axial", roi_node=None,
                  from_segment: bool = False, key_index: int | None = None, start: int | None = None,
                  end: int | None = None, range_from_roi: bool = False, window="mr", largest_component: bool = False,
                  on_progress: Callable[[int, int], None] | None = None, on_done=None, on_error=None) -> Request:
        """Fill slices forward and backward from a key slice; result: the list of slice indices written.

        The prompt is the ROI's box on the slice through its centre, or (`from_segment`) the segment's own mask
        on `key_index`, which is kept exactly as drawn. Slices are written as they arrive; a cancelled or failed
        propagation keeps the slices already written, and one `undo()` removes them all.
        """
        check_volume_node(volume_node)
        axis_index = self.array_axis(volume_node, axis)
        if from_segment:
            if key_index is None:
                raise BadInputError("'propagate from this slice' needs the slice index (key_index)")
            prompt = segment_writer.read_slice(segmentation_node, segment_id, volume_node, axis_index, key_index)
            if not prompt.any():
                raise BadInputError(f"segment '{segment_id}' is empty on slice {key_index}: draw or segment it first")
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
        writer = _StreamWriter(self.history(segmentation_node), segmentation_node, segment_id, volume_node,
                               axis_index, skip=key_index if from_segment else None)
        result = Request(self.client, "propagate", on_done=on_done, on_error=on_error)

        def arrived(item) -> None:
            writer.add(item.index, item.mask)
            if on_progress is not None:
                on_progress(item.completed, item.total)

        def finished(completed) -> None:
            writer.flush()
            result.finish(writer.written)

        def failed(error: MedSAM2Error) -> None:
            writer.flush()  # completed work is kept on cancel or crash
            result.fail(error)

        volume_id = self._send_volume(volume_node)
        request = self.client.propagate(volume_id, axis_index, key_index, prompt, start, end,
                                        self.window(volume_node, window), largest_component,
                                        on_slice=_guarded(arrived, result))
        request.then(_guarded(finished, result), _guarded(failed, result))
        return result

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
        count = roi_box.volume_shape(volume_node)[axis]
        first, last = 0 if start is None else start, count - 1 if end is None else end
        if not 0 <= first <= key_index <= last < count:
            raise BadInputError(f"slice range {first}..{last} must lie within slices 0..{count - 1} and contain the "
                                f"key slice {key_index}")

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
    def _target(volume_node, segmentation_node, segment_id, roi_node):
        if segmentation_node is None:
            segmentation_node = segment_writer.create_segmentation(volume_node.GetScene(), volume_node)
        name = roi_node.GetName() if roi_node is not None else "MedSAM2"
        return segmentation_node, segment_writer.get_or_create_segment(segmentation_node, name, segment_id)


class _StreamWriter:
    """Collects streamed slices and writes them in batches; the undo state is saved before the first write."""

    def __init__(self, history, segmentation_node, segment_id, volume_node, axis: int, skip: int | None):
        self.history, self.skip = history, skip
        self.target = (segmentation_node, segment_id, volume_node, axis)
        self.pending: dict[int, np.ndarray] = {}
        self.written: list[int] = []
        self.last_write = time.monotonic()

    def add(self, index: int, mask: np.ndarray) -> None:
        if index != self.skip:
            self.pending[index] = mask
        if time.monotonic() - self.last_write >= WRITE_INTERVAL_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if not self.written:
            self.history.save_state()
        segmentation_node, segment_id, volume_node, axis = self.target
        segment_writer.write_slices(segmentation_node, segment_id, volume_node, axis, self.pending)
        self.written.extend(i for i in self.pending if i not in self.written)
        self.pending = {}
        self.last_write = time.monotonic()


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
