"""CT series written with pydicom from the training phantoms: axial or oblique, files named out of slice order."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from phantoms import Phantom, make_phantom  # noqa: E402

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class CtSeries:
    """A written series: its folder, UIDs, the SOP Instance UID of slice k, and its grid (IJK → RAS, 4x4)."""

    folder: Path
    phantom: Phantom
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: list[str]
    ijk_to_ras: np.ndarray

    def ras(self, i: float, j: float, k: float) -> np.ndarray:
        return (self.ijk_to_ras @ [i, j, k, 1.0])[:3]

    def target_box_ras(self, margin: int = 1) -> list[str]:
        """--box-ras corners around the phantom's target on its key slice."""
        x0, y0, x1, y1 = self.phantom.box()
        k = self.phantom.key_index
        corners = (*self.ras(x0 - margin, y0 - margin, k), *self.ras(x1 + margin, y1 + margin, k))
        return [f"{v:.4f}" for v in corners]


def write_ct_series(folder: Path, seed: int = 7, size=(20, 64, 64), tilt_degrees: float = 0.0,
                    spacing=(0.9, 0.8, 2.5), origin_lps=(-30.0, -20.0, 40.0)) -> CtSeries:
    """One CT phantom as single-frame CT instances; `tilt_degrees` rotates the slices about the patient's
    left-right axis (an oblique series). Files are named in reverse slice order, so only positions order them."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    phantom = make_phantom(seed, size=size, modality="ct")
    angle = np.deg2rad(tilt_degrees)
    row = np.array([1.0, 0.0, 0.0])  # i runs along the rows (patient left)
    column = np.array([0.0, np.cos(angle), np.sin(angle)])  # j runs down the columns (posterior, tilted)
    normal = np.cross(row, column)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.column_stack([row * spacing[0], column * spacing[1], normal * spacing[2]])
    ijk_to_lps[:3, 3] = origin_lps
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    sop_uids = []
    depth = phantom.volume.shape[0]
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{depth - k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^CT", "PHANTOM-1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20260101", "120000", "1", "A1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, k + 1, "phantom"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (ijk_to_lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (between rows: j), column spacing (i)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = phantom.volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP = 120
        ds.PixelData = np.ascontiguousarray(phantom.volume[k].astype(np.int16)).tobytes()
        pydicom.dcmwrite(ds.filename, ds, enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
    return CtSeries(folder, phantom, study, series, frame_of_reference, sop_uids, LPS_FROM_RAS @ ijk_to_lps)


def decode_seg(path: Path, series: CtSeries) -> np.ndarray:
    """The SEG at `path` as labels [k, j, i] on the series' grid, decoded with pydicom alone (no highdicom).

    Each frame goes to the slice of the source instance it references, and its position must be that slice's
    position; its pixels get the frame's segment number.
    """
    import pydicom

    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    lps = LPS_FROM_RAS @ series.ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert np.allclose(orientation, [*(lps[:3, 0] / spacing[0]), *(lps[:3, 1] / spacing[1])], atol=1e-5)
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [spacing[1], spacing[0]])
    labels = np.zeros((len(series.sop_uids), seg.Rows, seg.Columns), np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = series.sop_uids.index(uid)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, (lps @ [0, 0, k, 1])[:3], atol=1e-4), f"frame on {uid} is not at slice {k}"
        segment = (item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence)[0]  # shared
        labels[k][frame > 0] = int(segment.ReferencedSegmentNumber)  # when the SEG has one segment
    return labels


def check_seg_against_labelmap(path: Path, series: CtSeries, labelmap: Path, names: list[str]) -> np.ndarray:
    """Everything a PACS user relies on: links to the series, names, algorithm, and the mask voxel for voxel equal
    to the CLI's NIfTI labelmap, decoded twice (highdicom, and pydicom alone). Returns the labels [k, j, i]."""
    import highdicom as hd
    import nibabel as nib

    nifti = nib.load(labelmap)
    assert np.allclose(nifti.affine, series.ijk_to_ras, atol=1e-4)
    expected = np.asarray(nifti.dataobj).transpose(2, 1, 0)
    seg = hd.seg.segread(path)
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    assert seg.StudyInstanceUID == series.study_uid and seg.PatientID == "PHANTOM-1"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC" and segment.SegmentAlgorithmName == "MedSAM2"
        assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "phantom_sam2"
    by_highdicom = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_uids, combine_segments=True)
    assert np.array_equal(by_highdicom, expected)
    assert np.array_equal(decode_seg(path, series), expected)
    return expected
