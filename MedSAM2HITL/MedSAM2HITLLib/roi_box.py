"""From a Slicer ROI markup to the Engine's prompt: slice axis, key slice, box and slice range.

The box is the bounding rectangle of the voxels of the key slice whose centres lie inside the ROI. Voxel
centres are mapped IJK → world (volume IJK→RAS and the volume's parent transforms) → ROI box coordinates
(inverse of the ROI's ObjectToWorld, which includes its own parent transforms) and tested with |p| ≤ size/2,
so rotated ROIs, transformed nodes and flipped or oblique volumes all work. (ROI `GetBounds()` ignores the
rotation and `IsPointInROI` does not test node coordinates, hence the explicit math.)

Box convention (same as the Engine): (x_min, y_min, x_max, y_max), inclusive pixel indices in the 2D slice
`np.take(array, index, axis)` of the [k, j, i] volume array; x = column (last remaining axis), y = row.
"""

from __future__ import annotations

import numpy as np

from .errors import BadInputError
from .slice_rules import check_slice, slice_axes

VIEW_NORMALS: dict[str, np.ndarray] = {
    "axial": np.array([0.0, 0.0, 1.0]),  # S
    "coronal": np.array([0.0, 1.0, 0.0]),  # A
    "sagittal": np.array([1.0, 0.0, 0.0]),  # R
}

# Voxel centres exactly on the ROI's faces count as inside, also after rounding in the matrix products
# (an ROI drawn in a slice view lies exactly on the slice's voxel centres and may be flat).
INSIDE_TOLERANCE_MM = 1e-4


def matrix_to_numpy(vtk_matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 numpy array."""
    return np.array([[vtk_matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def volume_ijk_to_world(volume_node) -> np.ndarray:
    """4x4 IJK → world (RAS) of a volume, including its parent transforms (which must be linear)."""
    import vtk

    if volume_node is None or volume_node.GetImageData() is None:
        raise BadInputError("the volume has no image data; load or select a volume first")
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return _parent_to_world(volume_node, "volume") @ matrix_to_numpy(ijk_to_ras)


def roi_world_to_box(roi_node) -> np.ndarray:
    """4x4 world → ROI box coordinates (origin at the ROI centre, axes along the ROI's edges)."""
    _parent_to_world(roi_node, "ROI")  # refuses non-linear parent transforms with a clear message
    object_to_world = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    if abs(np.linalg.det(object_to_world[:3, :3])) < 1e-12:
        raise BadInputError(f"ROI '{roi_node.GetName()}' has a degenerate orientation or transform")
    return np.linalg.inv(object_to_world)


def array_axis_for_view(volume_node, view: str) -> int:
    """Array axis ([k, j, i] order) whose IJK direction is closest to the view's normal (axial → S, ...).

    Works for any volume orientation: on a standard axial scan axial → 0, coronal → 1, sagittal → 2.
    """
    if view not in VIEW_NORMALS:
        raise BadInputError(f"unknown slice view '{view}'; use one of {', '.join(VIEW_NORMALS)}")
    alignment = np.abs(_array_axis_directions(volume_node) @ VIEW_NORMALS[view])
    return int(np.argmax(alignment))


def view_for_array_axis(volume_node, axis: int) -> str:
    """The slice view (axial/coronal/sagittal) whose normal is closest to an array axis's direction."""
    check_axis(axis)
    direction = _array_axis_directions(volume_node)[axis]
    return max(VIEW_NORMALS, key=lambda view: abs(float(direction @ VIEW_NORMALS[view])))


def key_slice_index(volume_node, roi_node, axis: int) -> int:
    """Index along `axis` of the slice through the ROI centre (nearest voxel centre)."""
    check_axis(axis)
    _check_roi(roi_node)
    centre = np.append(np.array(roi_node.GetCenterWorld(), dtype=float), 1.0)
    ijk = np.linalg.solve(volume_ijk_to_world(volume_node), centre)[:3]
    shape = volume_shape(volume_node)
    index = int(np.floor(ijk[2 - axis] + 0.5))
    if not 0 <= index < shape[axis]:
        raise BadInputError(
            f"the centre of ROI '{roi_node.GetName()}' is outside volume '{volume_node.GetName()}' along the "
            f"slice axis (slice {ijk[2 - axis]:.1f} of 0..{shape[axis] - 1}); move the ROI onto the volume or "
            "select the volume it was drawn on"
        )
    return index


def roi_slice_range(volume_node, roi_node, axis: int) -> tuple[int, int]:
    """First and last slice index along `axis` whose plane meets the ROI, clipped to the volume."""
    check_axis(axis)
    _check_roi(roi_node)
    half = np.array(roi_node.GetSize(), dtype=float) / 2.0
    corners = np.array([[sx, sy, sz, 1.0] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    corners[:, :3] *= half
    box_to_ijk = np.linalg.inv(volume_ijk_to_world(volume_node)) @ np.linalg.inv(roi_world_to_box(roi_node))
    along = (box_to_ijk @ corners.T)[2 - axis]
    count = volume_shape(volume_node)[axis]
    first = max(int(np.ceil(along.min() - 1e-6)), 0)
    last = min(int(np.floor(along.max() + 1e-6)), count - 1)
    if first > last:
        raise BadInputError(
            f"ROI '{roi_node.GetName()}' does not overlap volume '{volume_node.GetName()}' along the slice "
            "axis; move the ROI onto the volume"
        )
    return first, last


def roi_slice_mask(volume_node, roi_node, axis: int, index: int) -> np.ndarray:
    """2D bool mask of the voxels of slice `index` along `axis` whose centres lie inside the ROI."""
    check_axis(axis)
    _check_roi(roi_node)
    shape = volume_shape(volume_node)
    check_slice(index, shape[axis], f"array axis {axis}")
    ijk_to_box = roi_world_to_box(roi_node) @ volume_ijk_to_world(volume_node)
    row_axis, column_axis = slice_axes(axis)
    rows = np.arange(shape[row_axis], dtype=float)
    columns = np.arange(shape[column_axis], dtype=float)
    # Position in box coordinates = origin + row * (step per row) + column * (step per column).
    origin = ijk_to_box[:3, 3] + index * ijk_to_box[:3, 2 - axis]
    points = (
        origin[None, None, :]
        + rows[:, None, None] * ijk_to_box[:3, 2 - row_axis][None, None, :]
        + columns[None, :, None] * ijk_to_box[:3, 2 - column_axis][None, None, :]
    )
    half = np.array(roi_node.GetSize(), dtype=float) / 2.0 + INSIDE_TOLERANCE_MM
    return np.all(np.abs(points) <= half, axis=2)


def roi_box(volume_node, roi_node, axis: int, index: int | None = None) -> tuple[int, int, int, int]:
    """Engine box (x_min, y_min, x_max, y_max) of the ROI on slice `index` (default: the key slice).

    A plain tuple in the order `box.Box`/`Engine.segment_slice` take.
    """
    if index is None:
        index = key_slice_index(volume_node, roi_node, axis)
    inside = roi_slice_mask(volume_node, roi_node, axis, index)
    rows = np.flatnonzero(inside.any(axis=1))
    columns = np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        raise BadInputError(
            f"ROI '{roi_node.GetName()}' contains no voxel centre of slice {index} of volume "
            f"'{volume_node.GetName()}'; move the ROI onto the volume and make it at least one voxel wide in "
            "every direction (also along the slice axis)"
        )
    return int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1])


def roi_from_corners(scene, volume_node, corners) -> object:
    """An axis-aligned ROI node (in RAS) between two opposite corners (x1, y1, z1, x2, y2, z2).

    A box drawn on a slice is flat along one axis; it gets the volume's smallest voxel spacing as thickness so
    that it holds the voxel centres of one slice even when its coordinate falls between them.
    """
    values = np.asarray(corners, dtype=float).ravel()
    if values.size != 6 or not np.all(np.isfinite(values)):
        raise BadInputError(f"a box in RAS needs six finite numbers (two opposite corners), got {list(corners)}")
    first, second = values[:3], values[3:]
    size = np.abs(second - first)
    if not np.all(np.isfinite(size)) or np.abs(values).max() > 1e9:
        raise BadInputError(f"box {values.tolist()} is not in millimetres of any scanner (beyond ±1e9 mm)")
    if np.count_nonzero(size < 1e-6) > 1:
        raise BadInputError(f"box {values.tolist()} is a line or a point; give two opposite corners of a box")
    spacing = np.linalg.norm(volume_ijk_to_world(volume_node)[:3, :3], axis=0).min()
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    roi.SetCenter(*((first + second) / 2))
    roi.SetSize(*np.where(size < 1e-6, spacing, size))
    return roi


def _array_axis_directions(volume_node) -> np.ndarray:
    """Unit world directions of array axes 0, 1, 2 (K, J, I)."""
    linear = volume_ijk_to_world(volume_node)[:3, :3]
    directions = linear[:, [2, 1, 0]].T
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def _parent_to_world(node, what: str) -> np.ndarray:
    """4x4 node → world from the node's parent transforms; refuses non-linear ones."""
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise BadInputError(
            f"the {what} '{node.GetName()}' is under a non-linear transform ('{parent.GetName()}'); harden the "
            "transform or remove it"
        )
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return matrix_to_numpy(matrix)


def _check_roi(roi_node) -> None:
    if roi_node is None:
        raise BadInputError("no ROI selected; place an ROI around the object in a slice view")
    size = np.array(roi_node.GetSize(), dtype=float)
    if not np.all(np.isfinite(size)) or np.count_nonzero(size > 0) < 2:
        raise BadInputError(
            f"ROI '{roi_node.GetName()}' is degenerate (size {size.round(3).tolist()} mm); drag its handles so "
            "it encloses the object"
        )


def check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise BadInputError(f"array axis must be 0, 1 or 2 ([k, j, i] order), got {axis!r}")


def volume_shape(volume_node) -> tuple[int, int, int]:
    """The shape of the volume's [k, j, i] array, or a BadInputError when it has no voxels."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise BadInputError("the volume has no image data; load or select a volume first")
    dims = image.GetDimensions()
    return dims[2], dims[1], dims[0]
