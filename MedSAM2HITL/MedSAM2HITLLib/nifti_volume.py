"""NIfTI-1 and NIfTI-2 volumes read with one geometry rule, the one nibabel, FSL and ITK-SNAP follow.

The voxel-to-RAS transform is the sform when its code is > 0, else the qform when its code is > 0, else the
pixdim scaling alone (the NIfTI standard's "method 1": origin 0, i along R, j along A, k along S; ITK points i and
j to L and P instead, nibabel centres the grid: a file without transforms has no true place). ITK, and so Slicer's
reader, prefers the qform, which puts a file whose two transforms differ somewhere else than every other tool; ITK
cannot read NIfTI-2 at all. A left-handed grid (e.g. LAS) is turned right-handed as Slicer's reader turns it, by
reversing K, so a slice number means the same slice here and in Slicer; `export` writes labelmaps back in the
file's own voxel order.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError

DISAGREEMENT_MM, DISAGREEMENT_DEGREES = 1.0, 1.0
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NiftiGeometry:
    """Where a NIfTI file's voxels are: its own voxel→RAS transform, and which of the header's transforms gave it."""

    affine: np.ndarray  # 4x4, the file's voxel (i, j, k) → RAS mm
    source: str  # "sform", "qform" or "pixdim"
    disagreement: str | None  # how far sform and qform differ, when both are set and differ beyond the tolerance

    @property
    def left_handed(self) -> bool:
        return bool(np.linalg.det(self.affine[:3, :3]) < 0)


@dataclass(frozen=True)
class NiftiVolume:
    voxels: np.ndarray  # [k, j, i], native byte order, on the right-handed grid `ijk_to_ras`
    ijk_to_ras: np.ndarray  # the file's affine, with K reversed where the file's grid is left-handed
    geometry: NiftiGeometry


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def nifti_errors() -> tuple[type[Exception], ...]:
    """What opening a broken or foreign file as NIfTI raises."""
    import nibabel as nib

    return (OSError, ValueError, EOFError, struct.error, nib.filebasedimages.ImageFileError,
            nib.wrapstruct.WrapStructError)


def open_nifti(path: str | Path):
    """nibabel's image (data not read) of a NIfTI-1/-2 file; gzip is told by its magic number, as ITK tells it,
    not by the name. Raises nibabel's and the file system's errors."""
    import nibabel as nib

    path = Path(path)
    with path.open("rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
    if gzipped == path.name.lower().endswith(".gz"):
        return nib.load(str(path))
    stream = gzip.open(path) if gzipped else path.open("rb")  # held open by the image's data proxy
    head = stream.read(4)
    stream.seek(0)
    image_class = nib.Nifti2Image if 540 in (struct.unpack("<i", head)[0], struct.unpack(">i", head)[0]) \
        else nib.Nifti1Image
    return image_class.from_file_map({"image": nib.FileHolder(str(path), stream)})


def nifti_geometry(header) -> NiftiGeometry:
    """The voxel→RAS transform of a nibabel NIfTI-1/-2 header, by the rule above."""
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    qform = header.get_qform() if qform_code > 0 else None
    if sform_code > 0:
        affine, source = header.get_sform(), "sform"
    elif qform is not None:
        affine, source = qform, "qform"
    else:
        affine, source = np.diag([*header.get_zooms()[:3], 1.0]).astype(float), "pixdim"
    disagreement = _disagreement(affine, qform) if source == "sform" and qform is not None else None
    return NiftiGeometry(np.asarray(affine, dtype=float), source, disagreement)


def load_nifti_geometry(path: str | Path) -> NiftiGeometry | None:
    """The geometry of the NIfTI file at `path` (its header only is read), or None for another or unreadable file."""
    if not is_nifti(path) or not Path(path).is_file():
        return None
    try:
        return nifti_geometry(open_nifti(path).header)
    except nifti_errors():
        return None


def read_nifti(path: Path) -> NiftiVolume:
    """The voxels and geometry of a checked (`volume_file.check_volume_file`) NIfTI file; scaled data as float32,
    as ITK reads them. Says in one log line when sform and qform disagree."""
    try:
        image = open_nifti(path)
        geometry = nifti_geometry(image.header)
        scaled = image.dataobj.slope != 1 or image.dataobj.inter != 0
        voxels = np.asanyarray(image.dataobj, dtype=np.float32 if scaled else image.get_data_dtype())
    except nifti_errors() as error:
        raise BadInputError(f"could not read volume '{path.name}' ({error}); copy or export the file again") from None
    voxels = voxels.reshape(voxels.shape[:3])  # a 4D file with one time point (checked) is a 3D volume
    if geometry.disagreement:
        _LOG.warning("warning: %s", geometry.disagreement)
    ijk_to_ras = geometry.affine
    if geometry.left_handed:
        voxels = voxels[:, :, ::-1]
        ijk_to_ras = ijk_to_ras @ _reverse_k(voxels.shape[2])
    voxels = np.ascontiguousarray(voxels.transpose(2, 1, 0))
    return NiftiVolume(voxels.astype(voxels.dtype.newbyteorder("="), copy=False), ijk_to_ras, geometry)


def _reverse_k(slices: int) -> np.ndarray:
    """The index map k → slices - 1 - k, as a 4x4."""
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = slices - 1
    return flip


def _disagreement(sform: np.ndarray, qform: np.ndarray) -> str | None:
    """'the NIfTI sform and qform differ by 12.2 mm and 0 degrees; ...' beyond the tolerances, else None."""
    shift = float(np.linalg.norm(sform[:3, 3] - qform[:3, 3]))
    axes_s = sform[:3, :3] / np.linalg.norm(sform[:3, :3], axis=0)
    axes_q = qform[:3, :3] / np.linalg.norm(qform[:3, :3], axis=0)
    cosines = np.clip(np.sum(axes_s * axes_q, axis=0), -1.0, 1.0)
    degrees = float(np.degrees(np.max(np.arccos(cosines))))
    if shift <= DISAGREEMENT_MM and degrees <= DISAGREEMENT_DEGREES:
        return None
    return (f"the NIfTI sform and qform differ by {shift:.3g} mm and {degrees:.3g} degrees; the sform is used, as "
            "nibabel, FSL and ITK-SNAP use it (Slicer would use the qform)")
