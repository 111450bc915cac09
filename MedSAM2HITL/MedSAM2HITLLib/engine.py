"""MedSAM2 inference on a volume: one slice from a box and/or clicks, or slices propagated from conditioning slices.

Built on PyPI sam2 1.1.0's image and video predictors, with three things that package lacks: input frames made
on demand from the caller's volume (no float32 copy of the stack), feature sizes that follow image_size, and
release of per-slice tracking outputs the memory bank no longer reads, so memory does not grow with the range.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import ChainMap, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from . import slice_rules
from .box import validate_box, validate_points
from .errors import BadInputError, OutOfMemoryError, PropagationCancelled
from .model import LoadedModel, load_model
from .preprocessing import IntensityWindow, frame_tensor, mask_prompt_logits, parse_window


@dataclass
class SliceMask:
    """One propagated slice of one object (its position in the request): index along the axis, mask, progress."""

    index: int
    mask: np.ndarray
    completed: int
    total: int
    object: int = 0


PREFETCH_MAX_NEIGHBOURS = 2  # a prefetch encodes at most 5 slices: the embedding cache (8) keeps recent prompts
EARLY_STOP_PATIENCE = 3  # empty slices in a row after which an object counts as ended (measured: bench_early_stop.py)


class Propagation:
    """The slices of a propagation as they are computed (iterate over it), and where tracking stopped early.

    `ended_early` fills in as the pass goes: direction ("forward" / "backward") → the last slice done there, for
    each direction where every object had ended before the range did.
    """

    def __init__(self, run: Callable[[dict], Iterator[SliceMask]]):
        self.ended_early: dict[str, int] = {}
        self._slices = run(self.ended_early)

    def __iter__(self) -> "Propagation":
        return self

    def __next__(self) -> SliceMask:
        return next(self._slices)


def describe_early_end(ended_early: Mapping[str, int], objects: int = 1) -> str:
    """A line for the user: where tracking stopped because the object(s) ended ("" when it did not)."""
    if not ended_early:
        return ""
    what = "the object ended" if objects == 1 else "all objects ended"
    where = " and ".join(f"slice {index} ({direction})" for direction, index in sorted(ended_early.items(),
                                                                                      reverse=True))
    return f"done at {where}: {what}"


class VolumeFrames:
    """The slices start..end of a volume along an axis as model input frames, made when asked for."""

    def __init__(self, volume: np.ndarray, axis: int, start: int, end: int, window: IntensityWindow, model: LoadedModel):
        self.volume, self.axis, self.start, self.end = volume, axis, start, end
        self.window, self.image_size, self.device = window, model.image_size, model.device

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __getitem__(self, frame: int):
        if not 0 <= frame < len(self):
            raise IndexError(frame)
        image = self.window.to_uint8(np.take(self.volume, self.start + frame, axis=self.axis))
        return frame_tensor(image, self.image_size, self.device)


def check_volume(volume) -> np.ndarray:
    """A read-only view of a scalar 3D volume, or a BadInputError saying what is wrong with it."""
    if not isinstance(volume, np.ndarray):
        raise BadInputError(f"the volume must be a numpy array, got {type(volume).__name__}")
    if volume.ndim != 3:
        hint = " (a colour or multi-component image?)" if volume.ndim == 4 else ""
        raise BadInputError(f"the volume must be a scalar 3D array, got shape {volume.shape}{hint}")
    if volume.dtype.kind not in "iuf" or volume.dtype.kind == "b":
        raise BadInputError(f"the volume must hold real numbers, got dtype {volume.dtype}")
    if min(volume.shape) < 1:
        raise BadInputError(f"the volume is empty (shape {volume.shape})")
    if volume.dtype.kind == "f":
        bad = volume.size - int(np.count_nonzero(np.isfinite(volume)))
        if bad:
            raise BadInputError(f"the volume has {bad} voxel(s) that are NaN or infinite; replace them (e.g. by "
                                "the background value) and load it again")
    view = volume.view()
    view.flags.writeable = False
    return view


class Engine:
    """A loaded model, the current volume and an LRU cache of slice embeddings."""

    def __init__(self, model: LoadedModel, embedding_cache_size: int = 8):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.image_predictor = SAM2ImagePredictor(model.predictor)
        self.image_predictor._bb_feat_sizes = model.feature_sizes
        self.embedding_cache_size = embedding_cache_size
        self._embeddings: OrderedDict = OrderedDict()  # (volume_id, axis, index, window) → features
        self._windows: dict = {}  # (volume_id, spec) → IntensityWindow
        self._sources: dict[str, weakref.ref] = {}  # volume_id → the caller's array its cache entries came from
        self._checked: dict[str, np.ndarray] = {}  # volume_id → read-only view of that array, checked once
        self.volume: np.ndarray | None = None
        self.volume_id: str | None = None

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        config: str | Path | None = None,
        device: str = "auto",
        threads: int | None = None,
        image_size: int | None = None,
        precision: str = "auto",
    ) -> "Engine":
        from .device import set_cpu_threads

        set_cpu_threads(threads)
        return cls(load_model(checkpoint, config, device, image_size, precision))

    def info(self) -> dict:
        return self.model.describe()

    def set_volume(self, volume: np.ndarray, volume_id: str) -> None:
        """Use this volume for the following requests; it is referenced (read-only), never copied or changed.

        Cached embeddings of other volumes stay (a server switches between jobs); new content under a known ID
        drops that ID's entries.
        """
        source = self._sources.get(volume_id)
        if source is not None and source() is volume:
            self.volume, self.volume_id = self._checked[volume_id], volume_id
            return
        checked = check_volume(volume)
        self.forget_volume(volume_id)
        self._sources[volume_id] = weakref.ref(volume)
        self._checked[volume_id] = checked
        self.volume, self.volume_id = checked, volume_id

    def forget_volume(self, volume_id: str) -> None:
        """Drop the cached embeddings and windows of one volume."""
        for cache in (self._embeddings, self._windows):
            for key in [key for key in cache if key[0] == volume_id]:
                del cache[key]
        self._sources.pop(volume_id, None)
        self._checked.pop(volume_id, None)
        if self.volume_id == volume_id:
            self.volume = self.volume_id = None

    def window(self, spec) -> IntensityWindow:
        """The intensity window for the current volume, computed once per volume and spec."""
        key = (self.volume_id, spec if isinstance(spec, (str, IntensityWindow)) else tuple(spec))
        if key not in self._windows:
            self._windows[key] = parse_window(spec, self._require_volume())
        return self._windows[key]

    def is_cached(self, axis: int, index: int, window="mr") -> bool:
        """Whether a box on this slice costs only the mask decoder (its embedding is in the cache)."""
        return (self.volume_id, axis, index, self.window(window)) in self._embeddings

    def prefetch(self, axis: int, index: int, window="mr", should_stop: Callable[[], bool] | None = None) -> bool:
        """Encode a slice before a prompt on it arrives, into the embedding cache (same bound); True when it is
        there. `should_stop()` is asked before each block of the image encoder (a few milliseconds apart): when
        it says yes, the encoding is abandoned, nothing is cached, and the answer is False.
        """
        self._check_index(axis, index)

        def give_way(_module, _inputs) -> None:
            if should_stop is not None and should_stop():
                raise _GaveWay

        blocks = self.model.predictor.image_encoder.trunk.blocks
        hooks = [block.register_forward_pre_hook(give_way) for block in blocks]
        try:
            self._embedding(axis, index, self.window(window))
            return True
        except _GaveWay:
            return False
        finally:
            for hook in hooks:
                hook.remove()

    def prefetch_around(self, axis: int, index: int, window="mr", neighbours: int = 1,
                        should_stop: Callable[[], bool] | None = None) -> tuple[list[int], bool]:
        """Prefetch a slice, then its neighbours nearest first (at most PREFETCH_MAX_NEIGHBOURS a side, so the
        cache keeps recent prompts); the slices encoded, and whether it stopped early because `should_stop()`."""
        self._check_index(axis, index)
        count = self._require_volume().shape[axis]
        reach = min(max(neighbours, 0), PREFETCH_MAX_NEIGHBOURS)
        encoded: list[int] = []
        for offset in [0, *(sign * step for step in range(1, reach + 1) for sign in (1, -1))]:
            if not 0 <= index + offset < count:
                continue
            if (should_stop is not None and should_stop()) or not self.prefetch(axis, index + offset, window,
                                                                                  should_stop):
                return encoded, True
            encoded.append(index + offset)
        return encoded, False

    def segment_slice(self, axis: int, index: int, box=None, window="mr", points=None, mask=None) -> np.ndarray:
        """Mask (bool, the slice's shape) for a box and/or clicks on slice `index` along array axis `axis`.

        points: (x, y, label) clicks, label 1 positive / 0 negative. mask: the slice's current mask, which the
        prompts then correct (SAM2's mask input). One click alone gives the best of three candidate masks.
        """
        volume = self._require_volume()
        self._check_index(axis, index)
        shape = slice_rules.slice_shape(volume.shape, axis)
        checked_box = None if box is None else validate_box(box, shape)
        clicks = validate_points(points or [], shape)
        current = self._mask_input(mask, shape)
        if checked_box is None and current is None and not any(p.positive for p in clicks):
            raise BadInputError("a slice needs a box, at least one positive click, or a mask that the clicks correct "
                                "(negative clicks only remove from a mask)")
        features = self._embedding(axis, index, self.window(window))
        predictor = self.image_predictor
        # sam2 1.1.0 has no public way to reuse computed features: restore the state set_image would leave.
        predictor._features, predictor._orig_hw = features, [shape]
        predictor._is_image_set, predictor._is_batch = True, False
        multimask = checked_box is None and current is None and len(clicks) == 1
        with self._inference("segmenting a slice"):
            masks, scores, _ = predictor.predict(
                point_coords=np.array([p.as_list()[:2] for p in clicks], dtype=np.float32) if clicks else None,
                point_labels=np.array([p.positive for p in clicks], dtype=np.int32) if clicks else None,
                box=None if checked_box is None else np.asarray(checked_box.as_list(), dtype=np.float32),
                mask_input=None if current is None else mask_prompt_logits(current, self.model.image_size,
                                                                           self.model.device),
                multimask_output=multimask,
            )
        return masks[int(np.argmax(scores))] > 0

    def propagate(
        self,
        axis: int,
        key_index: int,
        prompt,
        start: int | None = None,
        end: int | None = None,
        window="mr",
        largest_component: bool = False,
        should_cancel: Callable[[], bool] | None = None,
        conditioning: Mapping[int, np.ndarray] | None = None,
        patience: int | None = None,
    ) -> Propagation:
        """Track the object from the key slice forward to `end` and backward to `start` (inclusive).

        `conditioning` adds slices the user drew or corrected (index → mask): each slice is tracked with the
        nearest conditioning slice on each side in its memory bank, so slices between two of them use both. Mask
        prompts come back exactly as given. Slices are yielded as they are computed: the forward pass from the
        first conditioning slice, then the backward pass. With `largest_component`, slices that the 3D
        largest-component filter changes are yielded again at the end. `should_cancel()` is asked before each
        slice; cancelling raises PropagationCancelled listing the slices already yielded, which stay valid.

        With `patience`, each direction stops once the object has been absent (an empty mask) on that many
        slices in a row and no conditioning slice lies further on; the slices beyond are not computed and not
        yielded. The slices that are yielded have the masks they have without it.
        """
        prompts = {**(conditioning or {}), key_index: prompt}
        return self.propagate_objects(axis, [prompts], start, end, window, largest_component, should_cancel,
                                      patience)

    def propagate_objects(
        self,
        axis: int,
        objects: Sequence[Mapping[int, object]],
        start: int | None = None,
        end: int | None = None,
        window="mr",
        largest_component: bool = False,
        should_cancel: Callable[[], bool] | None = None,
        patience: int | None = None,
    ) -> Propagation:
        """Several objects in one pass, each from its own conditioning slices (index → box or mask).

        Each slice is encoded once for all objects; each object is tracked as `propagate` tracks one, so the
        masks equal those of one request per object. SliceMask.object is the object's position in `objects`.
        With `patience`, an object that has ended in a direction is tracked no further there, and the pass stops
        in that direction when every object has ended.
        """
        volume = self._require_volume()
        if axis not in (0, 1, 2):
            raise BadInputError(f"axis must be 0, 1 or 2, got {axis}")
        if not objects or not all(objects):
            raise BadInputError("each object needs at least one conditioning slice (a box or a mask)")
        if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
            raise BadInputError(f"patience must be a whole number of slices ≥ 1, got {patience!r}")
        prompted = (i for prompts in objects for i in prompts)
        start, end = slice_rules.check_range(start, end, volume.shape[axis], prompted)
        shape = slice_rules.slice_shape(volume.shape, axis)
        checked = [{int(i) - start: self._conditioning(prompt, shape) for i, prompt in prompts.items()}
                   for prompts in objects]
        frames = VolumeFrames(volume, axis, start, end, self.window(window), self.model)
        return Propagation(lambda ended_early: self._propagate(frames, checked, largest_component, should_cancel,
                                                               patience, ended_early))

    def _propagate(self, frames, objects: list[dict], largest_component, should_cancel, patience,
                   ended_early: dict) -> Iterator[SliceMask]:
        predictor = self.model.predictor
        state = _tracking_state(frames, self.model.device)
        total = len(frames) * len(objects)
        firsts = [min(prompts) for prompts in objects]
        completed: list[int] = []
        yielded = 0
        kept = [{} for _ in objects] if largest_component else None
        try:
            for reverse in (False, True):
                order = range(max(firsts) - 1, -1, -1) if reverse else range(min(firsts), len(frames))
                if not order:
                    continue
                # Objects with nothing to track this way have ended in it from the start.
                ended = {obj for obj in range(len(objects)) if reverse and firsts[obj] == 0}
                absent = [0] * len(objects)  # empty slices in a row, per object, in this direction
                predictor.reset_state(state)
                with self._inference("preparing the conditioning slices"):
                    for obj, prompts in enumerate(objects):
                        for frame, (add, _) in prompts.items():
                            add(predictor, state, frame, obj + 1)
                    predictor.propagate_in_video_preflight(state)
                for frame in order:
                    for obj, prompts in enumerate(objects):
                        # Forward: from the object's first slice on; backward: below it; not once it has ended.
                        if (frame >= firsts[obj]) == reverse or obj in ended:
                            continue
                        if should_cancel is not None and should_cancel():
                            raise PropagationCancelled(completed)
                        exact = prompts[frame][1] if frame in prompts else None
                        if exact is None:
                            with self._inference("propagating"):
                                exact = _track_frame(predictor, state, obj, frame, reverse)
                        index = frames.start + frame
                        slice_rules.note_completed(completed, index)
                        if kept is not None:
                            kept[obj][frame] = exact
                        absent[obj] = 0 if exact.any() else absent[obj] + 1
                        if patience is not None and absent[obj] >= patience and \
                                not any(f < frame if reverse else f > frame for f in prompts):
                            ended.add(obj)
                            total -= frame if reverse else len(frames) - 1 - frame  # its slices not to be done
                        yielded += 1
                        yield SliceMask(index, exact, yielded, total, obj)
                    _release_unneeded_outputs(predictor, state, frame, reverse)
                    if len(ended) == len(objects):
                        if frame != order[-1]:
                            ended_early["backward" if reverse else "forward"] = frames.start + frame
                        break
        finally:
            predictor.reset_state(state)
            state.clear()
        for obj, masks in enumerate(kept or []):
            for item in _largest_component_changes(masks, frames.start, total):
                item.object = obj
                yield item

    def _conditioning(self, prompt, shape):
        """Check a conditioning prompt now (before any work): (how to add it to a tracking state, the mask to
        return for its slice as is, or None for a box, whose slice the model segments)."""
        if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
            slice_rules.check_mask_shape(prompt.shape, shape, "the mask prompt")
            mask = prompt.astype(bool)
            if not mask.any():
                raise BadInputError("the mask prompt is empty: draw the object on the key slice first")
            return (lambda predictor, state, frame, obj: predictor.add_new_mask(state, frame, obj, mask)), mask
        box = np.asarray(validate_box(prompt, shape).as_list(), dtype=np.float32)
        return (lambda predictor, state, frame, obj: predictor.add_new_points_or_box(state, frame, obj, box=box)), None

    @staticmethod
    def _mask_input(mask, shape) -> np.ndarray | None:
        """A slice's current mask to correct, or None when there is none (absent or empty)."""
        if mask is None:
            return None
        mask = np.asarray(mask)
        slice_rules.check_mask_shape(mask.shape, shape, "the current mask")
        mask = mask.astype(bool)
        return mask if mask.any() else None

    def _embedding(self, axis: int, index: int, window: IntensityWindow) -> dict:
        """Image-encoder features of one slice, cached per (volume, axis, slice, window)."""
        key = (self.volume_id, axis, index, window)
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        model = self.model
        image = window.to_uint8(np.take(self.volume, index, axis=axis))
        with self._inference("encoding a slice"):
            frame = frame_tensor(image, model.image_size, model.device)[None]
            features = _image_features(model, frame)
        self._embeddings[key] = features
        while len(self._embeddings) > self.embedding_cache_size:
            self._embeddings.popitem(last=False)
        return features

    @contextlib.contextmanager
    def _inference(self, what: str):
        """inference_mode + the model's precision (autocast); out-of-memory becomes an OutOfMemoryError with advice."""
        import torch

        from .device import autocast, free_cached_memory, is_out_of_memory

        try:
            with torch.inference_mode(), autocast(self.model.device, self.model.precision):
                yield
        except Exception as exc:
            if not is_out_of_memory(exc) or isinstance(exc, OutOfMemoryError):
                raise
            self._embeddings.clear()
            free_cached_memory(self.model.device)
            raise OutOfMemoryError(
                f"out of memory while {what} on {self.model.device}: propagate a smaller range, "
                "close other GPU programs, or use the CPU device"
            ) from exc

    def _require_volume(self) -> np.ndarray:
        if self.volume is None:
            raise BadInputError("no volume set: call set_volume first")
        return self.volume

    def _check_index(self, axis: int, index: int) -> None:
        volume = self._require_volume()
        if axis not in (0, 1, 2):
            raise BadInputError(f"axis must be 0, 1 or 2, got {axis}")
        slice_rules.check_slice(index, volume.shape[axis], f"array axis {axis}")


class _GaveWay(Exception):
    """A prefetch stopped encoding because real work is waiting."""


def _image_features(model: LoadedModel, frame) -> dict:
    """What SAM2ImagePredictor.set_image computes, at the model's own feature sizes."""
    sam = model.predictor
    backbone_out = sam.forward_image(frame)
    _, vision_feats, _, _ = sam._prepare_backbone_features(backbone_out)
    if sam.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
    feats = [
        feat.permute(1, 2, 0).reshape(1, -1, *size)
        for feat, size in zip(vision_feats[::-1], model.feature_sizes[::-1])
    ][::-1]
    return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}


def _tracking_state(frames: VolumeFrames, device) -> dict:
    """The inference state SAM2VideoPredictor.init_state builds, over lazily made frames."""
    rows, cols = slice_rules.slice_shape(frames.volume.shape, frames.axis)
    return {
        "images": frames,
        "num_frames": len(frames),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": rows,
        "video_width": cols,
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def _track_frame(predictor, state: dict, obj: int, frame: int, reverse: bool) -> np.ndarray:
    """One object's mask on one slice from its memory bank (what sam2's propagate_in_video does per object)."""
    outputs = state["output_dict_per_obj"][obj]
    if frame in outputs["cond_frame_outputs"]:
        logits = outputs["cond_frame_outputs"][frame]["pred_masks"]
    else:
        current, logits = predictor._run_single_frame_inference(state, _memory_bank(outputs, frame), frame, 1, False,
                                                                 None, None, reverse, True)
        outputs["non_cond_frame_outputs"][frame] = current
    state["frames_tracked_per_obj"][obj][frame] = {"reverse": reverse}
    _, video_logits = predictor._get_orig_video_res_output(state, logits)
    return (video_logits[0, 0] > 0).cpu().numpy()


def _memory_bank(outputs: dict, frame: int) -> dict:
    """The memory one slice is tracked from: of the conditioning slices, the nearest on each side condition it.

    sam2 gives every conditioning slice the temporal position of the current one; a user slice far away, on the
    other side of the key, then pulled the tracking off (a corrected slice 23 slices below the key took the
    slices above it from Dice 0.94 to 0 on a twisting object). Farther conditioning slices still count where sam2
    counts unselected ones: as recent slices, when within the memory's reach.
    """
    conditioning = outputs["cond_frame_outputs"]
    before = max((f for f in conditioning if f < frame), default=None)
    after = min((f for f in conditioning if f > frame), default=None)
    nearest = {f: conditioning[f] for f in (before, after) if f is not None}
    farther = {f: out for f, out in conditioning.items() if f not in nearest}
    recent = ChainMap(outputs["non_cond_frame_outputs"], farther)
    return {"cond_frame_outputs": nearest, "non_cond_frame_outputs": recent}


def _release_unneeded_outputs(predictor, state: dict, frame: int, reverse: bool) -> None:
    """Drop tracked outputs farther back than the memory bank and object-pointer window can reach."""
    reach = max(predictor.num_maskmem * predictor.memory_temporal_stride_for_eval, predictor.max_obj_ptrs_in_encoder)
    for outputs in state["output_dict_per_obj"].values():
        tracked = outputs["non_cond_frame_outputs"]
        for old in [f for f in tracked if (f - frame if reverse else frame - f) > reach]:
            del tracked[old]


def _largest_component_changes(masks: dict[int, np.ndarray], start: int, total: int) -> Iterator[SliceMask]:
    """Keep the largest 3D connected component; yield the slices it changed."""
    import SimpleITK as sitk

    frames = sorted(masks)
    stack = np.stack([masks[f] for f in frames]).astype(np.uint8)
    if not stack.any():
        return
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(stack)))
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for position, frame in enumerate(frames):
        kept = labels[position] == largest
        if not np.array_equal(kept, masks[frame]):
            yield SliceMask(start + frame, kept, total, total)
