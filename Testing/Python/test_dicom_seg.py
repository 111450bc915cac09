"""DICOM SEG export: the CLI on a CT series (oblique here) writes a SEG whose frames reference the right source
instances and decode onto the series' grid exactly as the NIfTI labelmap; references by projected position on a
regularized grid; refusals."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA
from dicom_fixtures import check_seg_against_labelmap, write_ct_series
from test_cli import cli

from MedSAM2HITLLib.dicom_seg import build_dicom_seg, read_source_series, segment_code
from MedSAM2HITLLib.errors import BadInputError

pytestmark = pytest.mark.slow

COMMON = ["--window", "abdomen", "--checkpoint", str(DATA / "phantom_sam2.pt"), "--device", "cpu", "--threads", "2"]


@pytest.fixture(scope="module")
def oblique_series(tmp_path_factory):
    return write_ct_series(tmp_path_factory.mktemp("oblique") / "ct", seed=7, size=(18, 48, 48), tilt_degrees=20.0)


def test_cli_writes_a_seg_of_two_named_objects_linked_to_an_oblique_series(oblique_series, tmp_path):
    series = oblique_series
    distractor = series.phantom.distractors[0]
    k = int(np.argmax(distractor.sum(axis=(1, 2))))
    y, x = np.nonzero(distractor[k])
    corners = (*series.ras(x.min() - 1, y.min() - 1, k), *series.ras(x.max() + 1, y.max() + 1, k))
    second_box = [f"{v:.4f}" for v in corners]
    seg, labelmap = tmp_path / "result.dcm", tmp_path / "labels.nii.gz"
    result = cli("segment", str(series.folder), "--box-ras", *series.target_box_ras(), "--box-ras", *second_box,
                 "--name", "Liver lesion", "--name", "Kidney", "--propagate", *COMMON, "-o", str(seg),
                 "--labelmap", str(labelmap))
    assert result.returncode == 0, result.stderr
    labels = check_seg_against_labelmap(seg, series, labelmap, ["Liver lesion", "Kidney"])
    assert {1, 2} <= set(np.unique(labels))
    assert np.count_nonzero(labels.any(axis=(1, 2))) >= 5  # propagated, not one slice
    import highdicom as hd

    codes = [s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in hd.seg.segread(seg).SegmentSequence]
    assert codes == ["Lesion", "Kidney"]


def test_frames_reference_source_instances_by_projected_position_on_a_regularized_grid(oblique_series):
    """A grid with the series' slice planes but another in-plane origin and pixel size (as a reader that regularizes
    a series may make): each frame still references the instance on its plane, and says locations were not preserved."""
    series = oblique_series
    sources = read_source_series(series.folder)
    grid = series.ijk_to_ras.copy()
    grid[:3, :2] *= 0.5  # half the pixel size in-plane
    grid[:3, 3] += grid[:3, 0] * 3.3 - grid[:3, 1] * 1.7  # shifted within the first slice's plane
    labels = np.zeros((18, 40, 40), np.uint8)
    labels[4:9, 10:20, 12:30] = 1
    seg = build_dicom_seg(labels, grid, {1: "Nodule"}, sources, "phantom_sam2")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid
    normal = lps[:3, 2] / np.linalg.norm(lps[:3, 2])
    slice_of_frame = {}
    for item in seg.PerFrameFunctionalGroupsSequence:
        offset = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]) - lps[:3, 3]
        k = int(round(offset @ normal / np.linalg.norm(lps[:3, 2])))
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        slice_of_frame[k] = source.ReferencedSOPInstanceUID
        assert source.SpatialLocationsPreserved == "NO"
    assert slice_of_frame == {k: series.sop_uids[k] for k in range(4, 9)}
    between = grid.copy()
    between[:3, 3] += grid[:3, 2] * 0.5  # slices halfway between the series' slices
    with pytest.raises(BadInputError, match="do not lie on the DICOM series' slices"):
        build_dicom_seg(labels, between, {1: "Nodule"}, sources, "phantom_sam2")


def test_a_seg_from_a_nifti_input_is_refused_before_any_work(tmp_path):
    import nibabel as nib

    volume = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), volume)
    result = cli("segment", str(volume), "--box-ras", "1", "1", "3", "5", "5", "3", *COMMON, "-o",
                 str(tmp_path / "x.dcm"))
    assert result.returncode == 2
    assert "a DICOM SEG needs a DICOM series as input" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("name, meaning", [("Liver lesion 2", "Lesion"), ("kidneys", "Kidney"),
                                           ("Tumour", "Neoplasm"), ("Object 1", "Tissue")])
def test_segment_names_pick_snomed_codes(name, meaning):
    from pydicom.sr.codedict import codes

    assert getattr(codes.SCT, segment_code(name).type).meaning == meaning


@pytest.mark.parametrize("arguments, message", [
    (["--box-ras", "1", "2", "3", "4", "5", "3", "-o", "x.seg.nrrd"],
     "give a volume (file or DICOM folder) or --dicomweb"),
    (["{folder}", "--box-ras", "1", "2", "3", "4", "5", "3", "-o", "a.dcm", "--dicom-seg", "b.dcm"],
     "-o already writes a DICOM SEG"),
    (["{folder}", "--store", "--box-ras", "1", "2", "3", "4", "5", "3", "-o", "a.dcm"], "--store and --study go with"),
    (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--box-ras", "1", "2", "3", "4", "5", "3", "-o", "a.dcm"],
     "--dicomweb needs the series to read: --series UID"),
    (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--series", "1.2", "--store", "--box-ras", "1", "2", "3", "4", "5",
      "3", "-o", "a.seg.nrrd"], "--store sends the DICOM SEG"),
])
def test_conflicting_dicom_options_are_refused_before_any_work(arguments, message, oblique_series, tmp_path,
                                                                capsys):
    from MedSAM2HITLLib.cli import main

    folder = str(oblique_series.folder)
    argv = ["segment", *[a.format(folder=folder) if a.startswith("{") else a for a in arguments]]
    argv = [str(tmp_path / a) if a.endswith((".dcm", ".seg.nrrd")) else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
