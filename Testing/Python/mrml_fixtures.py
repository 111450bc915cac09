"""Helpers shared by the headless MRML tests (ROI → box, segment writes, export).

Expected results are computed independently of MRML: geometry from nibabel's affine with plain numpy, and
the correspondence between Slicer's array and the NIfTI file's voxels from voxel IDs stored in the file
(Slicer may flip or reorder axes on reading; the IDs say where every file voxel went).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

DATA = Path(__file__).resolve().parents[1] / "Data"


def rotation(*degrees_xyz: float) -> np.ndarray:
    return Rotation.from_euler("xyz", degrees_xyz, degrees=True).as_matrix()


def affine_from(linear: np.ndarray, origin) -> np.ndarray:
    result = np.eye(4)
    result[:3, :3] = linear
    result[:3, 3] = origin
    return result


# Volume grids (IJK→RAS as nibabel writes them) covering flips, a left-handed (LAS-like) grid and obliques.
AFFINES = {
    "flipped": affine_from(np.diag([-1.5, 2.0, -1.0]), [40.0, -30.0, 12.0]),
    "left_handed": affine_from(np.diag([-1.0, 1.2, 2.0]), [25.0, -20.0, -15.0]),
    "oblique": affine_from(rotation(20, -10, 35) @ np.diag([0.9, 1.2, 2.0]), [5.0, -7.0, 11.0]),
    "oblique_left_handed": affine_from(rotation(-25, 15, 40) @ np.diag([1.1, -0.8, 1.6]), [-3.0, 9.0, 2.0]),
}
SHAPE_IJK = (36, 30, 24)  # NIfTI order (i, j, k)


@pytest.fixture
def scene():
    from MedSAM2HITLLib.mrml_scene import create_scene

    return create_scene()


def write_id_volume(folder: Path, affine: np.ndarray, shape_ijk=SHAPE_IJK, name="volume.nii.gz") -> Path:
    """A NIfTI whose voxel values are their own flat index in the file (C order over (i, j, k))."""
    path = folder / name
    nib.save(nib.Nifti1Image(np.arange(np.prod(shape_ijk), dtype=np.int32).reshape(shape_ijk), affine), path)
    return path


def file_index_of(slicer_array: np.ndarray, shape_ijk=SHAPE_IJK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an ID volume as read by Slicer ([k, j, i]), the file (i, j, k) of each Slicer voxel."""
    return np.unravel_index(slicer_array.astype(np.int64), shape_ijk)


def to_slicer_order(file_values: np.ndarray, slicer_ids: np.ndarray) -> np.ndarray:
    """Values given on the file's (i, j, k) grid, rearranged to Slicer's [k, j, i] array of the same volume."""
    return file_values.ravel()[slicer_ids.astype(np.int64)]


def add_transform(scene, matrix: np.ndarray, parent=None):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_roi(scene, object_to_node: np.ndarray, size, parent=None, name="ROI"):
    """A box ROI whose centre and axes are given by `object_to_node` (node coordinates)."""
    import slicer

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetSize(*size)
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    if parent is not None:
        roi.SetAndObserveTransformNodeID(parent.GetID())
    return roi


def inside_roi(ijk_to_world: np.ndarray, object_to_world: np.ndarray, size, shape_ijk=SHAPE_IJK) -> np.ndarray:
    """Reference: bool (i, j, k) array of file voxels whose centres lie inside the box ROI."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape_ijk], indexing="ij"), axis=-1).reshape(-1, 3)
    homogeneous = np.concatenate([grid, np.ones((len(grid), 1))], axis=1)
    in_box = (np.linalg.inv(object_to_world) @ ijk_to_world @ homogeneous.T)[:3].T
    return np.all(np.abs(in_box) <= np.asarray(size) / 2 + 1e-4, axis=1).reshape(shape_ijk)


def bounding_box_2d(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x_min, y_min, x_max, y_max) of a 2D mask, x = column."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1])
