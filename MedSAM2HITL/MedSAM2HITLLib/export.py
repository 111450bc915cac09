"""Save segments to files: Slicer's `.seg.nrrd`, and a NIfTI labelmap aligned with the source volume.

The .seg.nrrd goes through Slicer's own storage node; the NIfTI labelmap through nibabel, so that it can
reproduce the source file's affine and voxel order exactly. Nothing is added to the scene. Every file is written
beside its final name, read back, and only then renamed into place (`replace_verified`): an older result is never
replaced by a broken file, and nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import BadInputError
from .roi_box import matrix_to_numpy
from .segment_writer import ensure_geometry, read_segment


DISK_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


def _slicer():
    import slicer

    return slicer


def check_output(path: str | Path, *suffixes: str) -> Path:
    """`path` as an output file name: it must end with one of `suffixes` and must not be a folder."""
    path = Path(path)
    if not path.name.lower().endswith(suffixes):
        raise BadInputError(f"output '{path.name}' must end with {' or '.join(suffixes)}")
    if path.is_dir():
        raise BadInputError(f"output '{path}' is a folder; give a file name ending with {' or '.join(suffixes)}")
    return path


def check_distinct(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Refuse an output that is an input or another output, also through a symlink or a hard link.

    Keys name the paths in the message (e.g. "-o", "the input volume"). Writing such an output would replace the
    input (a CT) with a segmentation, or one output with the other.
    """
    seen = list(inputs.items())
    for label, output in outputs.items():
        for other_label, other in seen:
            if _same_file(Path(output), Path(other)):
                raise BadInputError(f"{label} '{output}' is the same file as {other_label} '{other}'; "
                                    "write the result to another path")
        seen.append((label, output))


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def replace_verified(path: Path, write: Callable[[Path], object], read_back: Callable[[Path], object]) -> Path:
    """`write` a file beside `path`, `read_back` all of it, and only then rename it over `path`.

    Writers can report success on a full disk (Slicer's storage node does), so what was written is checked
    before it replaces an older result. Whatever fails, `path` is left as it was, no partial file remains, and
    the BadInputError says why (a full disk in so many words).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{os.getpid()}.{path.name}")  # same suffix: writers pick formats by it
    try:
        write(partial)
        try:
            if not partial.is_file() or partial.stat().st_size == 0:
                raise OSError("nothing was written")
            read_back(partial)
        except Exception as error:  # any failure to read it back means the file is not whole
            full = shutil.disk_usage(path.parent).free < DISK_FULL_BYTES
            last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]  # readers' errors are long
            raise _cannot_write(path, full, f"it does not read back: {last_line}") from error
        with open(partial, "r+b") as f:  # space the file system allocates late fails here, not in write()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as error:
        full = error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        raise _cannot_write(path, full, error.strerror or str(error)) from error
    finally:
        partial.unlink(missing_ok=True)
    return path


def _cannot_write(path: Path, full: bool, reason: str) -> BadInputError:
    if full:
        return BadInputError(f"could not write '{path}': the disk is full; free some space or write elsewhere "
                             "(the file was left as it was)")
    return BadInputError(f"could not write '{path}' ({reason}); the file was left as it was: check that the "
                         "folder is writable and has free space")


def export_seg_nrrd(segmentation_node, path: str | Path) -> Path:
    """Write the whole segmentation (all segments, names, colours, geometry) to a `.seg.nrrd` file."""
    import SimpleITK as sitk

    def write(partial: Path) -> None:  # success is judged by reading the file back, not by WriteData
        storage = _slicer().vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(partial))
        storage.SetCropToMinimumExtent(False)  # keep the reference grid so the file lines up with the volume
        storage.WriteData(segmentation_node)

    # SimpleITK, not Slicer's reader: that one aborts the process on a truncated file.
    return replace_verified(check_output(path, ".seg.nrrd"), write, lambda partial: sitk.ReadImage(str(partial)))


def export_labelmap_nifti(
    segmentation_node, volume_node, path: str | Path, segment_ids: list[str] | None = None
) -> dict[int, str]:
    """Write segments as one NIfTI labelmap on the source volume's grid (nibabel).

    Segment n of `segment_ids` (default: all, in the segmentation's order) gets label n (1-based); where
    segments overlap, the later one wins. Returns {label: segment name}.

    When the volume was read from a NIfTI file, the labelmap is written in that file's voxel order with a copy of
    its header: the same NIfTI version, qform and sform with their codes, and xyzt_units, so it lines up index for
    index and millimetre for millimetre with the source in every tool. The volume's grid is the file's with K
    reversed for a left-handed file (`nifti_volume`), or the one Slicer's reader made of it. Otherwise (another
    format, or a grid that is not the file's) the affine is the volume's IJK→RAS.
    """
    path = check_output(path, ".nii", ".nii.gz")
    labels, names = labelmap_array(segmentation_node, volume_node, segment_ids)
    export_label_array_nifti(labels, volume_node, path)
    return names


def export_label_array_nifti(labels: np.ndarray, volume_node, path: str | Path) -> Path:
    """Write a label array ([k, j, i] on the volume's grid) as NIfTI, aligned as `export_labelmap_nifti` says."""
    import nibabel as nib

    path = check_output(path, ".nii", ".nii.gz")
    dtype = labels.dtype
    data = labels.transpose(2, 1, 0)  # [k, j, i] → NIfTI's [i, j, k]
    image = _on_source_grid(data, volume_node)
    if image is None:
        affine = volume_ijk_to_ras(volume_node)
        image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    image.set_data_dtype(dtype)
    return replace_verified(path, lambda partial: nib.save(image, str(partial)),
                            lambda partial: np.asanyarray(nib.load(str(partial)).dataobj))


def _on_source_grid(data: np.ndarray, volume_node):
    """`data` ([i, j, k] on the volume's grid) as a NIfTI image in the source file's voxel order, with the source's
    header transforms and units; None when the volume does not come from a NIfTI file or is not on its grid."""
    from .nifti_volume import load_nifti_geometry, open_nifti

    storage = volume_node.GetStorageNode()
    name = storage.GetFileName() if storage is not None else None
    geometry = load_nifti_geometry(name) if name else None
    if geometry is None:
        return None
    source = open_nifti(name)
    reordered = _reorder_to_grid(data, volume_ijk_to_ras(volume_node), geometry.affine, source.shape[:3])
    if reordered is None:
        return None
    header = source.header.copy()
    header.set_slope_inter(1, 0)
    header["cal_min"], header["cal_max"] = 0, 0
    header["intent_code"] = 0
    image = type(source)(np.ascontiguousarray(reordered), None, header)
    image.set_qform(source.header.get_qform(), code=int(source.header["qform_code"]))
    image.set_sform(source.header.get_sform(), code=int(source.header["sform_code"]))
    return image


def labelmap_array(
    segmentation_node, volume_node, segment_ids: list[str] | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Segments as one label array [k, j, i] on the volume's grid, and {label: segment name}.

    Segment n of `segment_ids` (default: all, in the segmentation's order) gets label n (1-based); where segments
    overlap, the later one wins. The one source of labels for every export (NIfTI, DICOM SEG).
    """
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
    return labels, names


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's own 4x4 IJK→RAS (without parent transforms), i.e. the grid its file describes."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


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
