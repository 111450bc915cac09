"""A DICOMweb job's volume keeps the series' geometry, gantry tilt included (issue 23).

The service turns a series fetched from the PACS into the worker's `volume.nrrd` (`dicomweb_jobs`). Here the PACS
is the only thing stood in for: its retrieval copies a series written with pydicom (a CT phantom, axial or turned
about the left-right axis, whose slice positions are sheared by a gantry tilt, and a bright marker) into the job's folder; the conversion itself runs as
the API runs it. The NRRD must have the geometry `read_dicom` gives (origin, spacing, direction within 1e-4), the
orthogonal grid the tags imply, the same voxels, and the marker where the tags put it. test_dicomweb.py covers the
retrieval from a real Orthanc.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_fixtures import write_ct_series

pytestmark = pytest.mark.unit

MARKER_HU, MARKER_CENTRE = 20000, (10, 31, 33)  # k, row, column of a 3x3x3 cube, far above any phantom tissue
SPACING = (0.9, 0.8, 2.5)  # between columns, between rows, between slices (mm)


def shear_and_mark(folder: Path, tilt_degrees: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shift each slice along its column direction by tan(tilt) per mm along the normal (a gantry tilt) and draw the
    marker; returns the slice positions in slice order, the row and column directions and the marker's centre
    (LPS mm), all from the tags as written."""
    files = sorted(folder.iterdir(), key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    positions = []
    for k, file in enumerate(files):
        ds = pydicom.dcmread(file)
        orientation = np.array(ds.ImageOrientationPatient, float)
        row, column = orientation[:3], orientation[3:]
        position = np.array(ds.ImagePositionPatient, float) + k * SPACING[2] * np.tan(np.radians(tilt_degrees)) * column
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        if abs(k - MARKER_CENTRE[0]) <= 1:
            pixels = ds.pixel_array.copy()
            pixels[MARKER_CENTRE[1] - 1:MARKER_CENTRE[1] + 2, MARKER_CENTRE[2] - 1:MARKER_CENTRE[2] + 2] = MARKER_HU
            ds.PixelData = pixels.astype(np.int16).tobytes()
        ds.save_as(file, enforce_file_format=True)
        positions.append(position)
    k, j, i = MARKER_CENTRE
    marker = positions[k] + i * SPACING[0] * row + j * SPACING[1] * column
    return np.array(positions), row, column, marker


@pytest.mark.parametrize("tilt_degrees, turn_degrees", [(20.0, 0.0), (-15.0, 25.0)], ids=["axial_tilt_+20",
                                                                                        "oblique_25_tilt_-15"])
def test_a_dicomweb_jobs_volume_of_a_tilted_series_has_read_dicoms_geometry(tilt_degrees, turn_degrees, tmp_path,
                                                                            monkeypatch):
    from medsam2hitl_server import dicomweb_jobs

    from MedSAM2HITLLib.dicom_series import read_dicom
    from MedSAM2HITLLib.dicomweb import DicomWebServer

    series = write_ct_series(tmp_path / "pacs", seed=11, size=(20, 64, 64), tilt_degrees=turn_degrees,
                             spacing=SPACING)
    positions, row, column, marker = shear_and_mark(series.folder, tilt_degrees)

    def retrieve_from_the_pacs(server, series_uid, folder, study_uid=None):  # the PACS, without a server
        assert series_uid == series.series_uid
        shutil.copytree(series.folder, folder)
        return Path(folder)

    monkeypatch.setattr(dicomweb_jobs, "retrieve_series", retrieve_from_the_pacs)
    job = tmp_path / "job"
    job.mkdir()
    name, header = dicomweb_jobs._fetch_and_convert(DicomWebServer("http://127.0.0.1:9"),
                                                    dicomweb_jobs.DicomWebSeries(series=series.series_uid), job,
                                                    2**30)
    written = sitk.ReadImage(str(job / name))
    expected = read_dicom(job / dicomweb_jobs.DICOM_FOLDER, series.series_uid)
    assert expected.tilt_degrees == pytest.approx(abs(tilt_degrees), abs=0.05)
    reference = expected.sitk_image()
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected.voxels)
    assert written.GetSize()[1] > 64 and list(header.shape_ijk) == list(written.GetSize())  # widened for the tilt

    # the orthogonal grid the tags imply, whatever read_dicom computes
    np.testing.assert_allclose(written.GetSpacing(), SPACING, atol=1e-4)
    np.testing.assert_allclose(np.array(written.GetDirection()).reshape(3, 3),
                               np.column_stack([row, column, np.cross(row, column)]), atol=1e-4)
    lowest_column_shift = min((positions - positions[0]) @ column)  # the grid starts at the most negative shift
    np.testing.assert_allclose(written.GetOrigin(), positions[0] + lowest_column_shift * column, atol=1e-3)

    voxels = sitk.GetArrayFromImage(written)
    k, j, i = np.nonzero(voxels > MARKER_HU / 2)
    weights = voxels[k, j, i].astype(float)
    index = [float(np.average(axis, weights=weights)) for axis in (i, j, k)]
    found = np.array(written.TransformContinuousIndexToPhysicalPoint(index))
    assert np.linalg.norm(found - marker) < min(SPACING)
