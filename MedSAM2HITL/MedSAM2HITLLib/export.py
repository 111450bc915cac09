"""Save segments to files: Slicer's `.seg.nrrd`, and a NIfTI labelmap aligned with the source volume.

The .seg.nrrd goes through Slicer's own storage node; the NIfTI labelmap through nibabel, so that it can
reproduce the source file's affine and voxel order exactly. Nothing is added to the scene.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import BadInputError
from .roi_box import matrix_to_numpy
from .segment_writer import ensure_geometry, read_segment


def _slicer():
    import slicer

    return slicer


def export_seg_nrrd(segmentation_node, path: str | Path) -> Path:
    """Write the whole segmentation (all segments, names, colours, geometry) to a `.seg.nrrd` file."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise BadInputError(f"'{path.name}' must end with .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = _slicer().vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetCropToMinimumExtent(False)  # keep the reference grid so the file lines up with the volume
    if not storage.WriteData(segmentation_node):
        raise BadInputError(f"could not write '{path}'; check that the folder is writable")
    return path


def export_labelmap_nifti(
    segmentation_node, volume_node, path: str | Path, segment_ids: list[str] | None = None
) -> dict[int, str]:
    """Write segments as one NIfTI labelmap on the source volume's grid (nibabel).

    Segment n of `segment_ids` (default: all, in the segmentation's order) gets label n (1-based); where
    segments overlap, the later one wins. Returns {label: segment name}.

    When the volume was read from a NIfTI file, the labelmap gets that file's affine, voxel order and sform/qform
    codes, so its array lines up index for index with the source file: Slicer flips the slice axis of
    left-handed NIfTI files (e.g. LAS) on reading, and a labelmap written through Slicer's writer keeps the flip.
    Otherwise the affine is the volume's IJK→RAS.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise BadInputError(f"'{path.name}' must end with .nii or .nii.gz")
    ensure_geometry(segmentation_node, volume_node)
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs()) if segment_ids is None else list(segment_ids)
    if not ids:
        raise BadInputError(f"segmentation '{segmentation_node.GetName()}' has no segments to export")
    dtype = np.uint8 if len(ids) < 256 else np.uint16
    labels = None
    names: dict[int, str] = {}
    for value, segment_id in enumerate(ids, start=1):
        mask = read_segment(segmentation_node, segment_id, volume_node)
        labels = np.zeros(mask.shape, dtype) if labels is None else labels
        labels[mask] = value
        names[value] = segmentation.GetSegment(segment_id).GetName()

    data = labels.transpose(2, 1, 0)  # [k, j, i] → NIfTI's [i, j, k]
    affine = volume_ijk_to_ras(volume_node)
    codes = (1, 1)
    source = _source_nifti(volume_node)
    if source is not None:
        reordered = _reorder_to_grid(data, affine, source.affine, source.shape[:3])
        if reordered is not None:
            data, affine = reordered, source.affine
            codes = (int(source.header["qform_code"]) or 1, int(source.header["sform_code"]) or 1)
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    image.set_data_dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        nib.save(image, str(path))
    except OSError as error:
        raise BadInputError(f"could not write '{path}' ({error}); check that the folder is writable") from error
    return names


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's own 4x4 IJK→RAS (without parent transforms), i.e. the grid its file describes."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def _source_nifti(volume_node):
    """The nibabel image (header only is read) of the NIfTI file the volume was loaded from, if any."""
    import nibabel as nib

    storage = volume_node.GetStorageNode()
    name = storage.GetFileName() if storage is not None else None
    if not name or not name.lower().endswith((".nii", ".nii.gz")) or not Path(name).is_file():
        return None
    try:
        return nib.load(name)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return None


def _reorder_to_grid(
    data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape
) -> np.ndarray | None:
    """`data` ([i, j, k] on `affine`) in the voxel order of the same grid described by `target_affine`.

    Returns None when the two affines do not describe the same voxels up to axis flips and permutations.
    """
    to_target = np.linalg.solve(target_affine, affine)  # our ijk → target ijk
    rotation = np.round(to_target[:3, :3])
    if not np.allclose(to_target[:3, :3], rotation, atol=1e-3) or not np.allclose(
        np.abs(rotation).sum(axis=0), 1
    ):
        return None
    order = [int(np.flatnonzero(rotation[row])[0]) for row in range(3)]
    if sorted(order) != [0, 1, 2]:
        return None
    result = np.transpose(data, order)
    for row in range(3):
        if rotation[row, order[row]] < 0:
            result = np.flip(result, axis=row)
    expected = np.where(np.diag(rotation[:, order]) < 0, np.array(result.shape) - 1, 0)
    if tuple(result.shape) != tuple(target_shape) or not np.allclose(to_target[:3, 3], expected, atol=1e-3):
        return None
    return result
