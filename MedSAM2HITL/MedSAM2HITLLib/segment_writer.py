"""Write model masks into a Slicer segmentation, slice by slice, with exact undo/redo.

Conventions shared with the Engine: volume arrays are `arrayFromVolume` order [k, j, i]; a slice is
`np.take(array, index, axis)`; masks are 2D bool arrays of that slice's shape.

Protocol for callers (the module logic and the CLI):
  history = SegmentationHistory(segmentation_node)
  history.save_state(); write_slice(...)                  # Segment slice: one undo step
  history.save_state(); for batch in ...: write_slices(...)  # Propagate: one undo step for the whole run,
                                                           # also when it is cancelled half-way
  history.undo() / history.redo()

Writes replace only the given slices of the given segment. They edit the segment's own labelmap layer in
place (grown to the masks' extent when needed): Slicer's SetBinaryLabelmapToSegment merges re-process the
whole segment on every call (0.25 s per slice on a 512×512×300 volume, and MODE_REPLACE replaces the whole
segment), and merging into a layer shared with other segments writes into their labels (slicer-core 5.13).
The segmentation shares the volume's voxel grid (`ensure_geometry`), so slices map one to one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .errors import BadInputError
from .roi_box import check_axis, matrix_to_numpy, volume_shape
from .slice_rules import check_mask_shape, check_slice, slice_axes, slice_shape

MAX_UNDO_STATES = 30


def _slicer():
    import slicer

    return slicer


class SegmentationHistory:
    """Undo/redo of a segmentation's content, kept by the Segment Editor's logic (vtkSlicerSegmentEditorLogic).

    One history per segmentation, shared with the Segment Editor: its Undo removes a propagation and the panel's
    Undo removes a paint stroke, in the order they happened (two histories of whole snapshots would each drop
    the other's work). `editor` is anything with that logic's SaveStateForUndo/Undo/Redo/CanUndo/CanRedo (in
    Slicer: the panel's embedded Segment Editor); without one, a logic of our own is made (scripts, headless).
    Call `save_state()` right before each operation; `undo()` restores the content from before it exactly.
    """

    def __init__(self, segmentation_node, editor=None, max_states: int = MAX_UNDO_STATES):
        self.segmentation_node = segmentation_node
        self.editor = editor if editor is not None else _editor_logic(segmentation_node, max_states)

    def save_state(self) -> None:
        """Remember the current content; drops any redo states (a new operation starts a new branch)."""
        self.editor.SaveStateForUndo()

    @property
    def can_undo(self) -> bool:
        return bool(self.editor.CanUndo())

    @property
    def can_redo(self) -> bool:
        return bool(self.editor.CanRedo())

    def undo(self) -> bool:
        """Restore the content from before the last operation; False when there is nothing to undo."""
        if not self.can_undo:
            return False
        self.editor.Undo()
        return True

    def redo(self) -> bool:
        """Re-apply the last undone operation; False when there is nothing to redo."""
        if not self.can_redo:
            return False
        self.editor.Redo()
        return True


def _editor_logic(segmentation_node, max_states: int):
    """A Segment Editor logic on this segmentation, with a parameter node that is not saved with the scene."""
    slicer = _slicer()
    scene = segmentation_node.GetScene()
    parameters = slicer.vtkMRMLSegmentEditorNode()
    parameters.SetName(scene.GenerateUniqueName("MedSAM2HITL history"))
    parameters.SetSaveWithScene(False)
    parameters.SetHideFromEditors(True)
    scene.AddNode(parameters)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(parameters)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetMaximumNumberOfUndoStates(max_states)
    return logic


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

    The segment is marked modified once per call, so views re-render once per batch rather than once per slice.
    """
    items = dict(masks.items() if isinstance(masks, Mapping) else masks)
    if not items:
        return
    shape = volume_shape(volume_node)
    check_axis(axis)
    _check_segment(segmentation_node, segment_id)
    ensure_geometry(segmentation_node, volume_node)
    expected = slice_shape(shape, axis)
    for index, mask in items.items():
        check_slice(index, shape[axis], f"array axis {axis}")
        check_mask_shape(np.shape(mask), expected, f"the mask for slice {index}")

    segmentation = segmentation_node.GetSegmentation()
    if len(segmentation.GetSegmentIDsForLayer(segmentation.GetLayerIndex(segment_id))) > 1:
        # Other segments share this labelmap layer: give the segment a layer of its own, so that editing its
        # voxels can never touch theirs.
        segmentation.SeparateSegmentLabelmap(segment_id)
    masks_by_index = {index: np.asarray(mask, dtype=bool) for index, mask in items.items()}
    labelmap = _editable_labelmap(segmentation_node, segment_id, volume_node, _nonzero_extent(axis, masks_by_index))
    if labelmap is None:
        return  # an empty segment stays empty
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    extent = labelmap.GetExtent()
    low = (extent[4], extent[2], extent[0])  # [k, j, i] offsets of the labelmap inside the volume
    high = (extent[5], extent[3], extent[1])
    rows, columns = slice_axes(axis)
    slices = np.moveaxis(_array(labelmap), axis, 0)  # a view: writing to it edits the labelmap
    was_modifying = segmentation_node.StartModify()
    try:
        for index, mask in masks_by_index.items():
            if low[axis] <= index <= high[axis]:  # outside the extent the mask is empty and so is the segment
                window = mask[low[rows] : high[rows] + 1, low[columns] : high[columns] + 1]
                slices[index - low[axis]] = np.where(window, label, 0)
        labelmap.Modified()  # one "source representation modified" for the whole batch
    finally:
        segmentation_node.EndModify(was_modifying)


def _nonzero_extent(axis: int, masks: Mapping[int, np.ndarray]) -> tuple[int, ...] | None:
    """IJK extent (i0, i1, j0, j1, k0, k1) of the masks' non-zero voxels, None if all masks are empty."""
    low, high = [0, 0, 0], [0, 0, 0]  # [k, j, i]
    rows, columns = slice_axes(axis)
    found = False
    for index, mask in masks.items():
        hit_rows = np.flatnonzero(mask.any(axis=1))
        if hit_rows.size == 0:
            continue
        hit_columns = np.flatnonzero(mask.any(axis=0))
        box = {axis: (index, index), rows: (hit_rows[0], hit_rows[-1]), columns: (hit_columns[0], hit_columns[-1])}
        for a, (first, last) in box.items():
            low[a] = min(low[a], first) if found else first
            high[a] = max(high[a], last) if found else last
        found = True
    if not found:
        return None
    return (int(low[2]), int(high[2]), int(low[1]), int(high[1]), int(low[0]), int(high[0]))


def _editable_labelmap(segmentation_node, segment_id: str, volume_node, needed: tuple[int, ...] | None):
    """The segment's own labelmap on the volume's grid, grown to contain `needed`; None if empty and not needed.

    Editing it in place is safe for undo: the history (vtkSegmentationHistory) stores deep copies (or its own earlier copies),
    never the live labelmap, and restoring gives the segment a fresh deep copy.
    """
    slicer = _slicer()
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    current = None if labelmap.IsEmpty() else tuple(labelmap.GetExtent())
    if current is not None:
        shape = volume_shape(volume_node)
        reference = _oriented_image(volume_node, (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1))
        if not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, reference):
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                labelmap, reference, resampled
            )
            labelmap.ShallowCopy(resampled)
            current = tuple(labelmap.GetExtent())
    if needed is None:
        return None if current is None else labelmap
    target = needed if current is None else _union(current, needed)
    if target != current:
        grown = _oriented_image(volume_node, target, dtype=np.uint8 if current is None else _array(labelmap).dtype)
        if current is not None:
            _array(grown)[
                current[4] - target[4] : current[5] - target[4] + 1,
                current[2] - target[2] : current[3] - target[2] + 1,
                current[0] - target[0] : current[1] - target[0] + 1,
            ] = _array(labelmap)
        labelmap.ShallowCopy(grown)
    return labelmap


def _union(first: tuple[int, ...], second: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(first[d], second[d]) if d % 2 == 0 else max(first[d], second[d]) for d in range(6))


def _array(image) -> np.ndarray:
    """[k, j, i] numpy view of an image's scalars (writes go to the image)."""
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])


def read_slice(segmentation_node, segment_id: str, volume_node, axis: int, index: int) -> np.ndarray:
    """The segment's mask on one slice, as a 2D bool array (the prompt for "Propagate from this slice")."""
    shape = volume_shape(volume_node)
    check_axis(axis)
    check_slice(index, shape[axis], f"array axis {axis}")
    block = _read_block(segmentation_node, segment_id, volume_node, _slab_extent(shape, axis, index, index))
    return np.take(block, 0, axis=axis)


def read_segment(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The whole segment as a bool array of the volume's shape ([k, j, i])."""
    shape = volume_shape(volume_node)
    extent = (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    return _read_block(segmentation_node, segment_id, volume_node, extent)


def _read_block(segmentation_node, segment_id: str, volume_node, extent: tuple[int, ...]) -> np.ndarray:
    """Segment voxels inside an IJK extent of the volume's grid, read from the internal labelmap in place."""
    slicer = _slicer()

    _check_segment(segmentation_node, segment_id)
    result = np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1), bool)
    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if labelmap is None or labelmap.IsEmpty():
        return result
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    reference = _oriented_image(volume_node, extent)
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
    source = _array(labelmap)[
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


def _oriented_image(volume_node, extent: tuple[int, ...], dtype=None):
    """A vtkOrientedImageData on the volume's grid (IJK→RAS without parent transforms) over `extent`.

    With a dtype, zero-filled scalars of that type are allocated; without, it only describes geometry.
    """
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    if dtype is not None:
        image.AllocateScalars(numpy_support.get_vtk_array_type(np.dtype(dtype)), 1)
        _array(image)[:] = 0
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
    ours, theirs = matrix_to_numpy(matrix), matrix_to_numpy(volume_matrix)
    shape = volume_shape(volume_node)
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
