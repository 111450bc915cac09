"""DICOM Segmentation objects (highdicom) from a labelmap on a DICOM series' grid, linked to that series.

A SEG is only useful in a PACS when it names its source: it shares the series' Frame of Reference and each frame
references the source instance it lies on. The frames are written on the labelmap's own grid (explicit plane
positions and orientation), so the mask stays exactly where the labelmap has it; highdicom then matches every frame
to the source instance at the same position along the slice normal, which also holds for an oblique series and for
one whose geometry the reader regularized. The source datasets are read here with pydicom (headers only), not from
the volume reader, so the references are the files' own UIDs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import BadInputError
from .export import check_output, replace_verified

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEGMENT_LABEL_MAX_CHARS = 64  # DICOM LO


@dataclass(frozen=True)
class SegmentCode:
    """A segment's SNOMED-CT category and type, as pydicom's code dictionary names them (`codes.SCT.<name>`)."""

    category: str
    type: str


GENERIC_CODE = SegmentCode("Tissue", "Tissue")  # Slicer's default for a segment it cannot name
PRESET_CODES = {  # a word in the segment's name → its codes (abnormal structures first: they win over the organ
    # that holds them); extend with names from pydicom.sr.codedict
    "lesion": SegmentCode("MorphologicallyAbnormalStructure", "Lesion"),
    "tumor": SegmentCode("MorphologicallyAbnormalStructure", "Neoplasm"),
    "tumour": SegmentCode("MorphologicallyAbnormalStructure", "Neoplasm"),
    "nodule": SegmentCode("MorphologicallyAbnormalStructure", "Nodule"),
    "cyst": SegmentCode("MorphologicallyAbnormalStructure", "Cyst"),
    "organ": SegmentCode("AnatomicalStructure", "Organ"),
    "liver": SegmentCode("AnatomicalStructure", "Liver"),
    "kidney": SegmentCode("AnatomicalStructure", "Kidney"),
    "spleen": SegmentCode("AnatomicalStructure", "Spleen"),
    "lung": SegmentCode("AnatomicalStructure", "Lung"),
    "pancreas": SegmentCode("AnatomicalStructure", "Pancreas"),
    "heart": SegmentCode("AnatomicalStructure", "Heart"),
    "brain": SegmentCode("AnatomicalStructure", "Brain"),
    "prostate": SegmentCode("AnatomicalStructure", "Prostate"),
    "bladder": SegmentCode("AnatomicalStructure", "Bladder"),
}


def segment_code(name: str) -> SegmentCode:
    """The codes of the first preset (in table order) named in `name`: 'Liver lesion 2' → Lesion, 'kidneys' →
    Kidney; generic tissue when none is."""
    words = set(name.lower().replace("_", " ").replace("-", " ").split())
    words |= {word[:-1] for word in words if word.endswith("s")}  # plurals
    return next((code for word, code in PRESET_CODES.items() if word in words), GENERIC_CODE)


def refuse_non_dicom(volume: str | Path) -> None:
    """A DICOM SEG needs a DICOM series to link to: refuse any other input before work is done."""
    if not Path(volume).is_dir():
        raise BadInputError(f"a DICOM SEG needs a DICOM series as input ('{Path(volume).name}' is a file, with no "
                            "patient, study or instances to link to); write .seg.nrrd or a NIfTI labelmap instead")


def read_source_series(folder: str | Path, series_uid: str | None = None) -> list:
    """The headers (pydicom, no pixels) of the image instances of one series in `folder`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM (a README, a DICOMDIR's companions): the volume reader skipped it too
        if "ImagePositionPatient" in dataset or "PerFrameFunctionalGroupsSequence" in dataset:
            datasets.append(dataset)
    series = sorted({str(d.SeriesInstanceUID) for d in datasets})
    if series_uid is None and len(series) == 1:
        series_uid = series[0]
    chosen = [d for d in datasets if str(d.SeriesInstanceUID) == series_uid]
    if not chosen:
        raise BadInputError(f"folder '{Path(folder).name}' has no DICOM image series "
                            f"{series_uid or '(several found; choose one with --series UID)'} to link a DICOM SEG to")
    missing = [tag for tag in ("FrameOfReferenceUID", "StudyInstanceUID", "PatientID") if tag not in chosen[0]]
    if missing:
        raise BadInputError(f"DICOM series {series_uid} lacks {', '.join(missing)}: a DICOM SEG cannot be linked "
                            "to it; export .seg.nrrd or a NIfTI labelmap instead")
    return chosen


def build_dicom_seg(labels: np.ndarray, ijk_to_ras: np.ndarray, names: dict[int, str], sources: list,
                    checkpoint_name: str):
    """A BINARY highdicom Segmentation: label n of `labels` ([k, j, i] on `ijk_to_ras`) is segment n, `names[n]`.

    Frame k lies at the grid's slice k; each frame references the source instance at its position along the
    slice normal. Raises BadInputError when the grid's slices do not lie on the source's slices.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ijk_to_lps = LPS_FROM_RAS @ np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    directions = ijk_to_lps[:3, :3] / spacing
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                          [float(v) for v in (ijk_to_lps @ [0.0, 0.0, k, 1.0])[:3]])
                 for k in range(labels.shape[0])]
    orientation = hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT,
                                              [float(v) for v in (*directions[:, 0], *directions[:, 1])])
    measures = hd.PixelMeasuresSequence(pixel_spacing=[float(spacing[1]), float(spacing[0])],
                                        slice_thickness=float(spacing[2]))
    algorithm = hd.AlgorithmIdentificationSequence(name="MedSAM2", version=checkpoint_name,
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   source=f"MedSAM2HITL {__version__}")
    descriptions = []
    for number in range(1, len(names) + 1):
        code = segment_code(names[number])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=names[number][:SEGMENT_LABEL_MAX_CHARS] or f"Object {number}",
            segmented_property_category=getattr(codes.SCT, code.category),
            segmented_property_type=getattr(codes.SCT, code.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algorithm))
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=np.ascontiguousarray(labels), segmentation_type="BINARY",
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedSAM2HITL",
            manufacturer_model_name="MedSAM2HITL", software_versions=__version__, device_serial_number="none",
            series_description="MedSAM2 segmentation", content_label="MEDSAM2",
            content_description=f"MedSAM2 ({checkpoint_name}), semi-automatic", plane_positions=positions,
            plane_orientation=orientation, pixel_measures=measures, omit_empty_frames=True)
    except ValueError as error:
        raise BadInputError(f"could not make a DICOM SEG on this series: {error}") from error
    frames = seg.get("PerFrameFunctionalGroupsSequence", [])
    if any(not item.get("DerivationImageSequence") for item in frames):
        raise BadInputError("the segmentation's slices do not lie on the DICOM series' slices, so its frames "
                            "cannot reference source instances; segment the series as read from its folder")
    return seg


def write_dicom_seg(labels: np.ndarray, ijk_to_ras: np.ndarray, names: dict[int, str], folder: str | Path,
                    series_uid: str | None, path: str | Path, checkpoint_name: str) -> Path:
    """Write the SEG of `labels` on the series in `folder` to `path` (.dcm), replacing it only once it reads back."""
    import pydicom

    path = check_output(path, ".dcm")
    seg = build_dicom_seg(labels, ijk_to_ras, names, read_source_series(folder, series_uid), checkpoint_name)
    return replace_verified(path, lambda partial: seg.save_as(partial),
                            lambda partial: pydicom.dcmread(partial).pixel_array)
