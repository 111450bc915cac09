"""Write model masks into a Slicer segmentation, slice by slice, with exact undo/redo.

Conventions shared with the Engine: volume arrays are `arrayFromVolume` order [k, j, i]; a slice is
`np.take(array, index, axis)`; masks are 2D bool arrays of that slice's shape.

Protocol for callers (the module logic and the CLI):
  history = SegmentationHistory(segmentation_node)
  history.save_state(); write_slice(...)                  # Segment slice: one undo step
  history.save_state(); for batch in ...: write_slices(...)  # Propagate: one undo step for the whole run,
                                                           # also when it is cancelled half-way
  history.undo() / history.redo()

Writes only replace the given slices of the given segment: each run of consecutive slices is cleared with
MODE_MERGE_MIN and filled with MODE_MERGE_MAX over that run's extent (MODE_REPLACE would replace the whole
segment). The written segment gets a labelmap layer of its own first, so other segments are never touched.
The segmentation shares the volume's voxel grid (`ensure_geometry`), so slices map one to one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .errors import BadInputError

MAX_UNDO_STATES = 30


def _slicer():
    import slicer

    return slicer


class SegmentationHistory:
    """Undo/redo of a segmentation's content (Slicer's vtkSegmentationHistory, which exists in every Slicer).

    Call `save_state()` right before each user-level operation; `undo()` then restores the content from
    before that operation exactly, and `redo()` returns to it.
    """

    def __init__(self, segmentation_node, max_states: int = MAX_UNDO_STATES):
        self._history = _slicer().vtkSegmentationHistory()
        self._history.SetMaximumNumberOfStates(max_states)
        self._history.SetSegmentation(segmentation_node.GetSegmentation())
        self.segmentation_node = segmentation_node

    def save_state(self) -> None:
        """Remember the current content; drops any redo states (a new operation starts a new branch)."""
        self._history.SaveState()

    @property
    def can_undo(self) -> bool:
        return bool(self._history.IsRestorePreviousStateAvailable())

    @property
    def can_redo(self) -> bool:
        return bool(self._history.IsRestoreNextStateAvailable())

    def undo(self) -> bool:
        """Restore the content from before the last operation; False when there is nothing to undo."""
        return self.can_undo and bool(self._history.RestorePreviousState())

    def redo(self) -> bool:
        """Re-apply the last undone operation; False when there is nothing to redo."""
        return self.can_redo and bool(self._history.RestoreNextState())

    def clear(self) -> None:
        self._history.RemoveAllStates()


def create_segmentation(scene, volume_node, name: str | None = None):
    """Add a segmentation node on `volume_node`'s grid (same parent transform), with display nodes."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def ensure_geometry(segmentation_node, volume_node) -> None:
    """Make sure the segmentation's labelmaps share the volume's voxel grid, so slice i is slice i.

    A segmentation without reference geometry, or one that is still empty, adopts the volume's grid (and its
    parent transform). A non-empty segmentation on another grid is refused with what to do about it:
    resampling a user's existing segments silently would change them.
    """
    slicer = _slicer()
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    if source != slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        raise BadInputError(
            f"segmentation '{segmentation_node.GetName()}' stores its segments as '{source}', not as a binary "
            "labelmap; switch its source representation to binary labelmap in the Segmentations module first"
        )
    same_transform = segmentation_node.GetTransformNodeID() == volume_node.GetTransformNodeID()
    if same_transform and _geometry_matches(segmentation_node, volume_node):
        return
    if _is_empty(segmentation_node):
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return
    what = "is under a different transform than" if not same_transform else "was made on a different voxel grid than"
    raise BadInputError(
        f"segmentation '{segmentation_node.GetName()}' {what} volume '{volume_node.GetName()}' and already "
        "has content; select (or create) a segmentation for this volume, or resample it to this volume with "
        "'Specify geometry' in the Segmentations module"
    )


def get_or_create_segment(segmentation_node, name: str, segment_id: str | None = None) -> str:
    """Return the ID of the segment with this ID (or, without an ID, this name); add an empty one if missing."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_id and segmentation.GetSegment(segment_id) is not None:
        return segment_id
    if not segment_id:
        existing = segmentation.GetSegmentIdBySegmentName(name)
        if existing:
            return existing
    return segmentation.AddEmptySegment(segment_id or "", name)


def write_slice(segmentation_node, segment_id: str, volume_node, axis: int, index: int, mask: np.ndarray) -> None:
    """Replace one slice of a segment by `mask`; every other slice and segment stays as it was."""
    write_slices(segmentation_node, segment_id, volume_node, axis, {index: mask})


def write_slices(
    segmentation_node,
    segment_id: str,
    volume_node,
    axis: int,
    masks: Mapping[int, np.ndarray] | Iterable[tuple[int, np.ndarray]],
) -> None:
    """Replace several slices of a segment at once (e.g. the SliceMasks of a propagation that arrived together).

    Consecutive slices are written as one slab and the segmentation node emits its modified events once at
    the end, so views re-render once per call rather than once per slice.
    """
    slicer = _slicer()
    items = dict(masks.items() if isinstance(masks, Mapping) else masks)
    if not items:
        return
    shape = _volume_shape(volume_node)
    _check_axis(axis)
    _check_segment(segmentation_node, segment_id)
    ensure_geometry(segmentation_node, volume_node)
    expected = tuple(np.delete(shape, axis))
    for index, mask in items.items():
        if not 0 <= index < shape[axis]:
            raise BadInputError(f"slice index {index} is outside 0..{shape[axis] - 1} along array axis {axis}")
        if np.shape(mask) != expected:
            raise BadInputError(f"mask for slice {index} has shape {np.shape(mask)}, expected {expected}")

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        if len(segmentation.GetSegmentIDsForLayer(segmentation.GetLayerIndex(segment_id))) > 1:
            # MODE_MERGE_MAX into a layer shared with other segments writes the modifier's raw values, i.e.
            # into another segment's label (measured on slicer-core 5.13, where IsSharedBinaryLabelmap also
            # answers the opposite); a layer of its own makes merges exact.
            segmentation.SeparateSegmentLabelmap(segment_id)
        label = segmentation.GetSegment(segment_id).GetLabelValue()
        for run in _consecutive_runs(sorted(items)):
            slab = np.stack([np.asarray(items[index], dtype=bool) for index in run], axis=axis)
            extent = _slab_extent(shape, axis, run[0], run[-1])
            clear = _oriented_image(volume_node, extent, np.zeros(slab.shape, np.uint8))
            fill = _oriented_image(volume_node, extent, slab.astype(np.uint8) * np.uint8(label))
            logic.SetBinaryLabelmapToSegment(clear, segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent)
            logic.SetBinaryLabelmapToSegment(fill, segmentation_node, segment_id, logic.MODE_MERGE_MAX, extent)
    finally:
        segmentation_node.EndModify(was_modifying)


def read_slice(segmentation_node, segment_id: str, volume_node, axis: int, index: int) -> np.ndarray:
    """The segment's mask on one slice, as a 2D bool array (the prompt for "Propagate from this slice")."""
    shape = _volume_shape(volume_node)
    _check_axis(axis)
    if not 0 <= index < shape[axis]:
        raise BadInputError(f"slice index {index} is outside 0..{shape[axis] - 1} along array axis {axis}")
    block = _read_block(segmentation_node, segment_id, volume_node, _slab_extent(shape, axis, index, index))
    return np.take(block, 0, axis=axis)


def read_segment(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The whole segment as a bool array of the volume's shape ([k, j, i])."""
    shape = _volume_shape(volume_node)
    extent = (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    return _read_block(segmentation_node, segment_id, volume_node, extent)


def _read_block(segmentation_node, segment_id: str, volume_node, extent: tuple[int, ...]) -> np.ndarray:
    """Segment voxels inside an IJK extent of the volume's grid, read from the internal labelmap in place."""
    slicer = _slicer()
    from vtk.util import numpy_support

    _check_segment(segmentation_node, segment_id)
    result = np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1), bool)
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if labelmap is None or labelmap.IsEmpty():
        return result
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    reference = _oriented_image(volume_node, extent, None)
    if not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, reference):
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled
        )
        labelmap = resampled
    have = labelmap.GetExtent()
    lo = [max(extent[2 * d], have[2 * d]) for d in range(3)]
    hi = [min(extent[2 * d + 1], have[2 * d + 1]) for d in range(3)]
    if any(lo[d] > hi[d] for d in range(3)):
        return result
    dims = labelmap.GetDimensions()
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    source = values[
        lo[2] - have[4] : hi[2] - have[4] + 1,
        lo[1] - have[2] : hi[1] - have[2] + 1,
        lo[0] - have[0] : hi[0] - have[0] + 1,
    ]
    result[
        lo[2] - extent[4] : hi[2] - extent[4] + 1,
        lo[1] - extent[2] : hi[1] - extent[2] + 1,
        lo[0] - extent[0] : hi[0] - extent[0] + 1,
    ] = source == label
    return result


def _oriented_image(volume_node, extent: tuple[int, ...], values: np.ndarray | None):
    """A vtkOrientedImageData on the volume's grid (IJK→RAS without parent transforms) over `extent`."""
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    if values is not None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = values.ravel()
    return image


def _geometry_matches(segmentation_node, volume_node) -> bool:
    slicer = _slicer()
    import vtk

    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    serialized = segmentation_node.GetSegmentation().GetConversionParameter(name)
    if not serialized:
        return False
    matrix = vtk.vtkMatrix4x4()
    extent = [0, -1, 0, -1, 0, -1]
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, matrix, extent):
        return False
    volume_matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(volume_matrix)
    ours = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    theirs = np.array([[volume_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    shape = _volume_shape(volume_node)
    return list(extent) == [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1] and np.allclose(
        ours, theirs, rtol=1e-6, atol=1e-5
    )


def _is_empty(segmentation_node) -> bool:
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in segmentation.GetSegmentIDs():
        labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
        if labelmap is not None and not labelmap.IsEmpty():
            return False
    return True


def _volume_shape(volume_node) -> tuple[int, int, int]:
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise BadInputError("the volume has no image data; load or select a volume first")
    dims = image.GetDimensions()
    return dims[2], dims[1], dims[0]


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise BadInputError(f"array axis must be 0, 1 or 2 ([k, j, i] order), got {axis!r}")


def _check_segment(segmentation_node, segment_id: str) -> None:
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise BadInputError(
            f"segment '{segment_id}' does not exist in segmentation '{segmentation_node.GetName()}'; "
            "create it with get_or_create_segment"
        )


def _slab_extent(shape: tuple[int, int, int], axis: int, first: int, last: int) -> tuple[int, ...]:
    """IJK extent (i0, i1, j0, j1, k0, k1) of slices first..last along array axis `axis` ([k, j, i])."""
    extent = [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1]
    ijk = 2 - axis
    extent[2 * ijk], extent[2 * ijk + 1] = first, last
    return tuple(extent)


def _consecutive_runs(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs
