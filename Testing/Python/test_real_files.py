"""Real scanner files, and series built from a real MRI, land in the right place (issue 23).

Every file's geometry as read (what `info` prints) is held against an independent reader: nibabel's affine by the
NIfTI rule (sform, else qform, else pixdim; SimpleITK where the two agree), the DICOM tags themselves for series
and multi-frame files. The files come from installed packages (nibabel's test data, pydicom's and pydicom-data's
test files) and from Testing/Data; series are written here from nibabel's `anatomical.nii`, a real T1. A bright
marker of known position checks that tilted series are resampled to the right place, and the project's fixture
model segments a phantom through the CLI on a few representative grids: its mask centroid must lie within one
voxel of the object's true position in the labelmap's own space.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DATA
from mrml_fixtures import scene  # noqa: F401  (pytest fixture)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_cli import cli

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.mrml_scene import load_volume
from MedSAM2HITLLib.roi_box import volume_ijk_to_world

pytestmark = pytest.mark.slow

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_STORE = Path(__import__("data_store").__file__).parent / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ENHANCED_MR, ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def reverse_k(affine: np.ndarray, slices: int) -> np.ndarray:
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = slices - 1
    return affine @ flip


def right_handed(affine: np.ndarray, slices: int) -> np.ndarray:
    """The documented convention: a left-handed NIfTI grid has its K reversed, as Slicer's reader does."""
    return reverse_k(affine, slices) if np.linalg.det(affine[:3, :3]) < 0 else affine


def sitk_ijk_to_ras(path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ matrix


def anatomical() -> nib.Nifti1Image:
    return nib.load(NIBABEL_DATA / "anatomical.nii")


def nifti_variant(folder: Path, name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """A NIfTI derived from anatomical.nii (LAS): (file, expected [k, j, i] voxels, expected IJK→RAS)."""
    source = anatomical()
    data = np.asanyarray(source.dataobj).astype(np.int16)
    affine = source.affine
    path = folder / f"{name}.nii.gz"
    image = nib.Nifti1Image(data, affine)
    expected_affine, expected_data = affine, data.astype(np.float32) if name == "scaled_int16" else data
    if name == "sform_differs_from_qform":
        sform = affine.copy()
        sform[:3, 3] += (10.0, -5.0, 7.0)
        image.set_qform(affine, code=1)
        image.set_sform(sform, code=2)
        expected_affine = sform
    elif name == "qform_only":
        image.set_qform(affine, code=1)
        image.set_sform(np.eye(4), code=0)
    elif name == "no_transform":
        image.set_qform(None)
        image.set_sform(None)
        expected_affine = np.diag([*source.header.get_zooms()[:3], 1.0])
    elif name == "nifti2":
        image = nib.Nifti2Image(data, affine)
    elif name == "big_endian":
        header = nib.Nifti1Header(endianness=">")
        image = nib.Nifti1Image(data, affine, header)
    elif name == "scaled_int16":
        image.header.set_slope_inter(0.5, 10.0)
        expected_data = data * np.float32(0.5) + np.float32(10.0)
    nib.save(image, path)
    if name == "scaled_int16":  # nibabel stores data / slope - inter; what a reader must give back is this
        expected_data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    slices = data.shape[2]
    expected = expected_data[:, :, ::-1] if np.linalg.det(expected_affine[:3, :3]) < 0 else expected_data
    return path, expected.transpose(2, 1, 0), right_handed(expected_affine, slices)


NIFTI_VARIANTS = ("sform_differs_from_qform", "qform_only", "no_transform", "nifti2", "big_endian", "scaled_int16")


@pytest.mark.parametrize("name", NIFTI_VARIANTS)
def test_nifti_variants_read_by_the_rule(name, scene, tmp_path, caplog):  # noqa: F811
    import slicer.util

    path, voxels, ijk_to_ras = nifti_variant(tmp_path, name)
    with caplog.at_level(logging.WARNING):
        volume = load_volume(scene, path)
    np.testing.assert_allclose(volume_ijk_to_world(volume), ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(volume), voxels, rtol=1e-6)
    warned = [r.getMessage() for r in caplog.records if "sform and qform differ" in r.getMessage()]
    assert warned == (["warning: the NIfTI sform and qform differ by 13.2 mm and 0 degrees; the sform is used, as "
                       "nibabel, FSL and ITK-SNAP use it (Slicer would use the qform)"] if name.startswith("sform")
                      else [])
    if name in ("qform_only", "big_endian"):  # SimpleITK agrees where sform and qform do
        np.testing.assert_allclose(volume_ijk_to_world(volume), right_handed(sitk_ijk_to_ras(path), voxels.shape[0]),
                                   atol=1e-4)
    if name == "no_transform":  # the standard's method 1 points i to R and j to A; ITK (and Slicer) to L and P
        np.testing.assert_allclose(LPS_TO_RAS @ volume_ijk_to_world(volume), sitk_ijk_to_ras(path), atol=1e-4)


@pytest.mark.parametrize("path", [NIBABEL_DATA / "anatomical.nii", NIBABEL_DATA / "standard.nii.gz",
                                  DATA / "ch2bet.nii.gz"], ids=lambda p: p.name)
def test_shipped_nifti_files_match_nibabel_and_simpleitk(path, scene):  # noqa: F811
    import slicer.util

    source = nib.load(path)
    volume = load_volume(scene, path)
    expected = right_handed(source.affine, source.shape[2])
    np.testing.assert_allclose(volume_ijk_to_world(volume), expected, atol=1e-4)
    np.testing.assert_allclose(volume_ijk_to_world(volume), right_handed(sitk_ijk_to_ras(path), source.shape[2]),
                               atol=1e-3)
    data = np.asanyarray(source.dataobj)
    if np.linalg.det(source.affine[:3, :3]) < 0:
        data = data[:, :, ::-1]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), data.transpose(2, 1, 0))


def test_info_names_the_file_grid_the_reversed_k_and_a_qform_apart(tmp_path):
    path, _, _ = nifti_variant(tmp_path, "sform_differs_from_qform")  # anatomical.nii (LAS), sform moved 13.2 mm
    result = cli("info", str(path))
    assert result.returncode == 0, result.stderr
    assert "warning: the NIfTI sform and qform differ by 13.2 mm and 0 degrees; the sform is used" in result.stderr
    assert "origin RAS:  42 -45 39\n" in result.stdout  # the sform's origin (42 -45 -9) at the reversed K's start
    assert "orientation: LAI (I, J, K point towards)" in result.stdout
    assert "file grid:   LAS, origin RAS 42 -45 -9 (the NIfTI sform" in result.stdout
    assert ("index order: the file's grid is left-handed: turned right-handed as Slicer does, by reversing K; slice n "
            "here and in --start/--end is the file's k = 24 - n") in result.stdout


# DICOM series written from a real MRI


def write_series(folder: Path, voxels: np.ndarray, origin, row, column, spacing, slice_gap: float,
                 shear_mm_per_mm=(0.0, 0.0), skip=(), repeat=(), uid: str | None = None) -> list[np.ndarray]:
    """One int16 CT file per slice of `voxels` [k, j, i], named in reverse slice order (sorting must not rely on
    names); slice k at origin + k * gap * normal + k * gap * shear (along row, column). Returns the positions."""
    folder.mkdir(parents=True, exist_ok=True)
    row, column = np.asarray(row, float), np.asarray(column, float)
    normal = np.cross(row, column)
    uid = uid or generate_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    positions = []
    for k in [*[k for k in range(len(voxels)) if k not in skip], *repeat]:
        depth = k * slice_gap
        shear = shear_mm_per_mm[0] * row + shear_mm_per_mm[1] * column
        position = np.asarray(origin) + depth * (normal + shear)
        positions.append(position)
        piece = sitk.GetImageFromArray(voxels[k].astype(np.int16))
        piece.SetSpacing(spacing)
        tags = {"0008|0016": CT_IMAGE, "0008|0018": f"{uid}.{len(positions)}", "0008|0060": "CT",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid, "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0020|0037": "\\".join(f"{v:.8f}" for v in (*row, *column)), "0028|0030": f"{spacing[1]}\\{spacing[0]}"}
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{len(voxels) * 2 - len(positions):04d}.dcm"))
        writer.Execute(piece)
    return positions


def real_slices() -> np.ndarray:
    """anatomical.nii as [k, j, i] int16 (halved: below 16000), with a marker cube of 32000 centred at i=16, j=20,
    k=12."""
    voxels = (np.asanyarray(anatomical().dataobj) // 2).astype(np.int16).transpose(2, 1, 0).copy()
    voxels[11:14, 19:22, 15:18] = 32000
    return voxels


def marker_centroid_ras(volume) -> np.ndarray:
    import slicer.util

    array = slicer.util.arrayFromVolume(volume)
    k, j, i = np.nonzero(array > 16000)
    weights = array[k, j, i].astype(float)
    ijk = np.array([np.average(i, weights=weights), np.average(j, weights=weights), np.average(k, weights=weights)])
    return (volume_ijk_to_world(volume) @ [*ijk, 1.0])[:3]


def oblique_axes(degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column directions (LPS) of axial slices turned about the L axis."""
    angle = np.radians(degrees)
    return np.array([1.0, 0, 0]), np.array([0, np.cos(angle), np.sin(angle)])


SERIES_CASES = {  # name: (row/column turn in degrees, shear along the column per mm along the normal)
    "axial": (0.0, 0.0),
    "tilt_+10": (0.0, np.tan(np.radians(10))),
    "tilt_-10": (0.0, -np.tan(np.radians(10))),
    "tilt_+30": (0.0, np.tan(np.radians(30))),
    "tilt_-30": (0.0, -np.tan(np.radians(30))),
    "oblique_25_table_steps": (25.0, 0.0),
    "oblique_25_tilt_+20": (25.0, np.tan(np.radians(20))),
}


@pytest.mark.parametrize("name", SERIES_CASES)
def test_dicom_series_from_a_real_mri_geometry_and_marker(name, scene, tmp_path, caplog):  # noqa: F811
    """Size, spacing, directions from the tags; a tilted series resampled with its tilt named, and the marker where
    the tags put it (within a voxel)."""
    turn, shear = SERIES_CASES[name]
    voxels = real_slices()
    row, column = oblique_axes(turn)
    origin, spacing, gap = np.array([-30.0, -45.0, -20.0]), (0.9, 1.1), 2.0
    positions = write_series(tmp_path / name, voxels, origin, row, column, spacing, gap, (0.0, shear))
    marker = positions[12] + 16 * spacing[0] * row + 20 * spacing[1] * column  # centre of the marker cube
    with caplog.at_level(logging.WARNING):
        volume = load_volume(scene, tmp_path / name)
    ijk_to_ras = volume_ijk_to_world(volume)
    normal = np.cross(row, column)
    expected_directions = LPS_TO_RAS[:3, :3] @ np.column_stack([row, column, normal])
    np.testing.assert_allclose(ijk_to_ras[:3, :3], expected_directions * (*spacing, gap), atol=1e-5)
    tilt = np.degrees(np.arctan(abs(shear)))
    warnings = [r.getMessage() for r in caplog.records if "tilted" in r.getMessage()]
    if shear:
        assert warnings == [f"warning: the DICOM series is tilted by {tilt:.1f} degrees (gantry tilt or sheared slice "
                            "positions): resampled onto an orthogonal grid that holds every slice, as Slicer's DICOM "
                            "reader does (--no-regularize refuses it instead)"]
        assert volume.GetImageData().GetDimensions()[1] > voxels.shape[1]  # widened to hold every slice
    else:
        assert not warnings
        assert volume.GetImageData().GetDimensions() == voxels.shape[::-1]
        np.testing.assert_allclose(ijk_to_ras[:3, 3], (LPS_TO_RAS @ [*positions[0], 1.0])[:3], atol=1e-4)
    voxel = min(*spacing, gap)
    assert np.linalg.norm(marker_centroid_ras(volume) - (LPS_TO_RAS @ [*marker, 1.0])[:3]) < voxel


def test_a_tilted_series_is_refused_under_no_regularize(tmp_path):
    write_series(tmp_path / "tilted", real_slices(), (0, 0, 0), (1, 0, 0), (0, 1, 0), (1.0, 1.0), 2.0,
                 (0.0, np.tan(np.radians(20))))
    result = cli("info", str(tmp_path / "tilted"), "--no-regularize")
    assert result.returncode == 2
    assert ("is tilted by 20.0 degrees (gantry tilt, or slice positions sheared off the slice normal) and resampling "
            "is off (--no-regularize)") in result.stderr


@pytest.mark.parametrize("case, message", [
    ("duplicate", r"'slice\d+.dcm' and 'slice\d+.dcm' have the same slice position \(10 mm along the slice normal\): "
                  "the folder holds a slice twice"),
    ("missing", r"1 slice is missing between 'slice\d+.dcm' and 'slice\d+.dcm' \(4 mm apart, the others 2 mm\)"),
    ("truncated", r"DICOM file 'slice0013.dcm' is truncated or corrupt: The number of bytes of pixel data is less "
                  "than expected"),
    ("no_geometry", r"DICOM file 'JPEG2000_UNC.dcm' has no patient geometry"),
], ids=["duplicate", "missing", "truncated", "no_geometry"])
def test_broken_series_are_refused_naming_the_files(case, message, scene, tmp_path):  # noqa: F811
    folder = tmp_path / case
    voxels = real_slices()[:10]
    if case == "no_geometry":
        folder.mkdir()
        (folder / "JPEG2000_UNC.dcm").write_bytes((PYDICOM_STORE / "JPEG2000_UNC.dcm").read_bytes())
    else:
        write_series(folder, voxels, (0, 0, 0), (1, 0, 0), (0, 1, 0), (1.0, 1.0), 2.0,
                     skip=(4,) if case == "missing" else (), repeat=(5,) if case == "duplicate" else ())
    if case == "truncated":
        file = folder / "slice0013.dcm"
        file.write_bytes(file.read_bytes()[:-500])
    with pytest.raises(BadInputError, match=message):
        load_volume(scene, folder)


# Multi-frame files


def write_enhanced(path: Path, voxels: np.ndarray, sop_class: str, origin, row, column, spacing, gap: float,
                   intercept: float = 0.0) -> list[np.ndarray]:
    """An enhanced MR/CT file (pydicom): one frame per slice of `voxels`, stored in reverse order, geometry in the
    functional groups. Returns the positions in slice order."""
    row, column = np.asarray(row, float), np.asarray(column, float)
    normal = np.cross(row, column)
    positions = [np.asarray(origin, float) + k * gap * normal for k in range(len(voxels))]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR" if sop_class == ENHANCED_MR else "CT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = voxels.shape[1], voxels.shape[2], len(voxels)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared, orientation, measures = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [*row, *column]
    measures.PixelSpacing, measures.SliceThickness = [spacing[1], spacing[0]], gap
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    if intercept:
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
        shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in reversed(range(len(voxels))):
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        group.PlanePositionSequence = [plane]
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.ascontiguousarray(voxels[::-1].astype("<i2")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return positions


@pytest.mark.parametrize("sop_class", [ENHANCED_MR, ENHANCED_CT], ids=["enhanced_mr", "enhanced_ct"])
def test_enhanced_multiframe_from_a_real_mri(sop_class, scene, tmp_path):  # noqa: F811
    import slicer.util

    voxels = real_slices()
    row, column = oblique_axes(-15.0)
    intercept = -1024.0 if sop_class == ENHANCED_CT else 0.0
    positions = write_enhanced(tmp_path / "enhanced.dcm", voxels, sop_class, (5.0, -60.0, 30.0), row, column,
                               (0.8, 0.9), 1.5, intercept)
    volume = load_volume(scene, tmp_path / "enhanced.dcm")
    expected = np.eye(4)
    expected[:3, :3] = np.column_stack([row * 0.8, column * 0.9, np.cross(row, column) * 1.5])
    expected[:3, 3] = positions[0]
    np.testing.assert_allclose(volume_ijk_to_world(volume), LPS_TO_RAS @ expected, atol=1e-5)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), voxels.astype(float) + intercept)


def test_enhanced_frames_that_are_not_one_stack_are_refused(scene, tmp_path):  # noqa: F811
    """Two echoes of the same 12 slices in one file: frames share positions."""
    voxels = real_slices()[:12]
    write_enhanced(tmp_path / "echoes.dcm", np.concatenate([voxels, voxels]), ENHANCED_MR, (0.0, 0.0, 0.0),
                   (1, 0, 0), (0, 1, 0), (1.0, 1.0), 1.0)
    positions = pydicom.dcmread(tmp_path / "echoes.dcm").PerFrameFunctionalGroupsSequence
    for frame in range(12, 24):  # the second echo at the first one's positions
        positions[frame].PlanePositionSequence[0].ImagePositionPatient = \
            positions[frame - 12].PlanePositionSequence[0].ImagePositionPatient
    dataset = pydicom.dcmread(tmp_path / "echoes.dcm")
    dataset.PerFrameFunctionalGroupsSequence = positions
    dataset.save_as(tmp_path / "echoes.dcm")
    with pytest.raises(BadInputError, match=r"frame \d+ of 'echoes.dcm' and frame \d+ of 'echoes.dcm' have the same "
                                            r"slice position .*: its frames are not one stack"):
        load_volume(scene, tmp_path / "echoes.dcm")


def test_shipped_multiframe_files_match_their_tags(scene):  # noqa: F811
    """eCT_Supplemental (enhanced CT, pydicom-data) and rtdose (pydicom): geometry from the functional groups /
    Grid Frame Offset Vector, values rescaled (HU, Gy); emri_small, whose functional groups were stripped, is
    refused for want of geometry."""
    import slicer.util

    ct = pydicom.dcmread(PYDICOM_STORE / "eCT_Supplemental.dcm")
    volume = load_volume(scene, PYDICOM_STORE / "eCT_Supplemental.dcm")
    shared = ct.SharedFunctionalGroupsSequence[0]
    positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float)
                 for f in ct.PerFrameFunctionalGroupsSequence]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    first = min(positions, key=lambda p: p @ normal)
    ijk_to_ras = volume_ijk_to_world(volume)
    np.testing.assert_allclose(ijk_to_ras[:3, 3], (LPS_TO_RAS @ [*first, 1.0])[:3], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(ijk_to_ras[:3, :3], axis=0)[:2],
                               np.array(shared.PixelMeasuresSequence[0].PixelSpacing, float)[::-1], atol=1e-6)
    rescale = shared.PixelValueTransformationSequence[0]
    raw = ct.pixel_array[np.argsort([p @ normal for p in positions])]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(volume),
                               raw * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept))

    for name in ("rtdose.dcm", "rtdose_1frame.dcm"):
        dose = pydicom.dcmread(PYDICOM_DATA / name)
        volume = load_volume(scene, PYDICOM_DATA / name)
        np.testing.assert_allclose(volume_ijk_to_world(volume)[:3, 3],
                                   (LPS_TO_RAS @ [*map(float, dose.ImagePositionPatient), 1.0])[:3], atol=1e-4)
        frames = dose.pixel_array.reshape(-1, dose.Rows, dose.Columns)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(volume), frames * float(dose.DoseGridScaling),
                                   rtol=1e-6)
    with pytest.raises(BadInputError, match="DICOM file 'emri_small.dcm' has no patient geometry"):
        load_volume(scene, PYDICOM_STORE / "emri_small.dcm")


def test_nifti_labelmap_keeps_the_source_header(tmp_path, scene):  # noqa: F811
    """Written on the input's own grid: voxel order, qform and sform with their codes, xyzt_units, NIfTI version."""
    from MedSAM2HITLLib.export import export_labelmap_nifti
    from MedSAM2HITLLib.segment_writer import create_segmentation, write_slice

    for name in ("sform_differs_from_qform", "nifti2"):
        path, voxels, _ = nifti_variant(tmp_path, name)
        source = nib.load(path)
        source.header.set_xyzt_units("mm", "sec")
        nib.save(source, path)
        volume = load_volume(scene, path)
        segmentation = create_segmentation(scene, volume)
        mask = np.zeros(voxels.shape[1:], bool)
        mask[20:25, 10:14] = True
        segment_id = segmentation.GetSegmentation().AddEmptySegment("lesion")
        write_slice(segmentation, segment_id, volume, 0, 3, mask)
        export_labelmap_nifti(segmentation, volume, tmp_path / f"{name}_labels.nii.gz")
        written = nib.load(tmp_path / f"{name}_labels.nii.gz")
        assert type(written) is type(source)
        for field in ("qform_code", "sform_code", "xyzt_units"):
            assert written.header[field] == source.header[field], field
        np.testing.assert_allclose(written.header.get_qform(), source.header.get_qform(), atol=1e-5)
        np.testing.assert_allclose(written.header.get_sform(), source.header.get_sform(), atol=1e-5)
        labels = np.asarray(written.dataobj)
        k = source.shape[2] - 1 - 3  # slice 3 of the right-handed grid is the LAS file's k = 24 - 3
        assert np.flatnonzero(labels.any(axis=(0, 1))).tolist() == [k]
        assert np.array_equal(np.argwhere(labels[..., k]).min(0), [10, 20])


# Segmentation through the CLI: the mask lands on the object


def mask_centroid(mask2d: np.ndarray) -> np.ndarray:
    """(column, row) centroid of a 2D mask indexed [row, column]."""
    rows, columns = np.nonzero(mask2d)
    return np.array([columns.mean(), rows.mean()])


def segment_key_slice(volume: Path, box_corners_ras: np.ndarray, tmp_path: Path) -> nib.Nifti1Image:
    labelmap = tmp_path / "labels.nii.gz"
    result = cli("segment", str(volume), "--box-ras", *[f"{v:.4f}" for v in box_corners_ras.ravel()],
                 "--window", "abdomen", "--checkpoint", str(DATA / "phantom_sam2.pt"), "--device", "cpu",
                 "--threads", "2", "-o", str(tmp_path / "out.seg.nrrd"), "--labelmap", str(labelmap))
    assert result.returncode == 0, result.stderr
    return nib.load(labelmap)


def test_cli_mask_on_a_gantry_tilted_series_lies_on_the_object(tmp_path):
    """A 20-degree tilt: the series is resampled, and the key slice's mask centroid, mapped through the labelmap's
    own affine, lies within one voxel of where the tags put the object."""
    from phantoms import make_phantom

    phantom = make_phantom(31, size=(40, 80, 96), modality="ct")
    row, column, spacing, gap = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), (0.8, 0.8), 1.5
    positions = write_series(tmp_path / "tilted", phantom.volume, (-40.0, -30.0, 10.0), row, column, spacing, gap,
                             (0.0, np.tan(np.radians(20))))
    k = phantom.key_index
    x0, y0, x1, y1 = phantom.box()

    def lps_to_ras(x: float, y: float) -> np.ndarray:  # slice k's pixel (x, y) in RAS
        return (LPS_TO_RAS @ [*(positions[k] + x * spacing[0] * row + y * spacing[1] * column), 1.0])[:3]

    written = segment_key_slice(tmp_path / "tilted", np.array([lps_to_ras(x0 - 1, y0 - 1), lps_to_ras(x1 + 1, y1 + 1)]),
                                tmp_path)
    labels = np.asarray(written.dataobj) > 0
    assert np.flatnonzero(labels.any(axis=(0, 1))).tolist() == [k]
    i, j = mask_centroid(labels[..., k].T)
    found = (written.affine @ [i, j, k, 1.0])[:3]
    assert np.linalg.norm(found - lps_to_ras(*mask_centroid(phantom.mask[k]))) < max(*spacing, gap)


def test_cli_mask_on_a_las_nifti_with_sform_and_qform_apart_lies_on_the_object(tmp_path):
    """The sform places the box; the labelmap has the file's voxel order, sform and qform, and its mask centroid lies
    within one voxel of the object in the file's own voxels."""
    from phantoms import make_phantom

    phantom = make_phantom(31, size=(40, 80, 96), modality="ct")
    sform = np.array([[-1.0, 0, 0, 50.0], [0, 1.1, 0, -40.0], [0, 0, 1.5, -30.0], [0, 0, 0, 1]])  # LAS
    qform = sform.copy()
    qform[:3, 3] += (8.0, 0.0, -6.0)
    image = nib.Nifti1Image(phantom.volume.transpose(2, 1, 0), sform)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    nib.save(image, tmp_path / "phantom.nii.gz")
    k = phantom.key_index
    x0, y0, x1, y1 = phantom.box()
    corners = np.array([(sform @ [x0 - 1, y0 - 1, k, 1.0])[:3], (sform @ [x1 + 1, y1 + 1, k, 1.0])[:3]])
    written = segment_key_slice(tmp_path / "phantom.nii.gz", corners, tmp_path)
    np.testing.assert_allclose(written.header.get_sform(), sform, atol=1e-5)
    np.testing.assert_allclose(written.header.get_qform(), qform, atol=1e-4)
    labels = np.asarray(written.dataobj) > 0
    assert np.flatnonzero(labels.any(axis=(0, 1))).tolist() == [k]
    assert np.linalg.norm(mask_centroid(labels[..., k].T) - mask_centroid(phantom.mask[k])) < 1.0
