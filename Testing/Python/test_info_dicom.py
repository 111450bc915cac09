"""`medsam2hitl info` on a DICOM series says how its slices are numbered and how far the series was tilted
(issue 23), as it says the index order of a NIfTI file."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from test_real_files import LPS_TO_RAS, write_series

pytestmark = pytest.mark.unit

GAP = 2.0


@pytest.mark.parametrize("tilt_degrees", [0.0, -20.0])
def test_info_names_a_dicom_series_index_order_and_its_tilt(tilt_degrees, tmp_path, capsys, caplog):
    from MedSAM2HITLLib.cli import main

    voxels = np.arange(12 * 24 * 20, dtype=np.int16).reshape(12, 24, 20)
    origin = np.array([-30.0, -45.0, -20.0])
    positions = write_series(tmp_path / "series", voxels, origin, (1, 0, 0), (0, 1, 0), (0.9, 1.1), GAP,
                             (0.0, np.tan(np.radians(tilt_degrees))))  # files named in reverse slice order
    with caplog.at_level(logging.WARNING):
        assert main(["info", str(tmp_path / "series"), "--device", "cpu"]) == 0
    stdout, warnings = capsys.readouterr().out, caplog.text
    assert ("index order: i along a row, j down the rows, k along the slice normal (row x column of "
            "ImageOrientationPatient): slice n here and in --start/--end is the n-th image by its "
            "ImagePositionPatient on that normal, not by file name or InstanceNumber\n") in stdout
    if tilt_degrees:
        assert ("tilt:        20.0 degrees (gantry tilt or sheared slice positions): resampled onto an orthogonal "
                "grid that holds every slice (--no-regularize refuses it)\n") in stdout
        assert "warning: the DICOM series is tilted by 20.0 degrees" in warnings
        # the grid widened towards the slices that moved to -y: it starts where the last slice's first row is
        start = positions[0] + (positions[-1] - positions[0])[1] * np.array([0, 1.0, 0])
    else:
        assert "tilt:        none (the slice positions lie on the slice normal)\n" in stdout
        assert "tilted" not in warnings
        start = positions[0]  # the lowest position along the normal, though its file sorts last by name
    origin_ras = (LPS_TO_RAS @ [*start, 1.0])[:3]
    assert f"origin RAS:  {' '.join(f'{v:g}' for v in origin_ras)}\n" in stdout
