"""Awkward NIfTI files through the service (issue 23): the result comes back on the upload's own grid.

Real processes (redis-server, one Celery worker with the fixture model, the API). A phantom whose object's
position is known is uploaded as (a) a left-handed LAS NIfTI whose sform and qform disagree, (b) an oblique NIfTI-2
and (c) a big-endian NIfTI of scaled int16; it is segmented on its key slice and propagated a few slices. The
status's geometry must be nibabel's reading after the documented convention (the sform, K reversed on a
left-handed grid), the downloaded `/result` must keep the input's header transforms with their codes,
`xyzt_units`, NIfTI version and voxel order, and its mask centroid must lie within one voxel of the object's in the
result's own voxels.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO
from service_fixtures import Service
from test_end_to_end import GRIDS
from test_real_files import right_handed
from test_service import create_job, read_events

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from phantoms import make_phantom  # noqa: E402

pytestmark = pytest.mark.service

SIZE = (24, 64, 72)  # phantom [k, j, i]
REACH = 3  # slices propagated on each side of the key slice
LAS = np.array([[-1.0, 0, 0, 50.0], [0, 1.1, 0, -40.0], [0, 0, 1.5, -30.0], [0, 0, 0, 1]])
CASES = ("las_sform_differs_from_qform", "nifti2_oblique", "big_endian_scaled_int16")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = Service(tmp_path_factory.mktemp("service")).start()
    yield running
    running.stop()


def write_case(name: str, volume: np.ndarray, folder: Path) -> tuple[Path, np.ndarray]:
    """The phantom's [k, j, i] volume as the file `name` describes (file voxel (i, j, k) = volume[k, j, i]);
    returns the file and its affine by nibabel's rule (the sform)."""
    data = volume.transpose(2, 1, 0)
    path = folder / f"{name}.nii"
    if name == "las_sform_differs_from_qform":
        image = nib.Nifti1Image(data, LAS)
        qform = LAS.copy()
        qform[:3, 3] += (8.0, 0.0, -6.0)  # 10 mm away: ITK (and Slicer's reader) would use this one
        image.set_qform(qform, code=1)
        image.set_sform(LAS, code=2)
    elif name == "nifti2_oblique":
        image = nib.Nifti2Image(data, GRIDS["oblique"])
    else:  # stored (HU + 1024) / 2 as big-endian int16, scl_slope 2 and scl_inter -1024 bring back the HU
        header = nib.Nifti1Header(endianness=">")
        header.set_data_dtype(np.int16)
        image = nib.Nifti1Image(((data.astype(np.int32) + 1024) // 2).astype(">i2"), GRIDS["flipped"], header)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    if name == "big_endian_scaled_int16":  # nibabel drops a scaling it does not need: set it in the header itself
        raw = path.read_bytes()
        header = nib.Nifti1Header(raw[:348], endianness=">")
        header["scl_slope"], header["scl_inter"] = 2.0, -1024.0
        path.write_bytes(header.binaryblock + raw[348:])
    written = nib.load(path)
    assert type(written) is (nib.Nifti2Image if name.startswith("nifti2") else nib.Nifti1Image)
    if name == "big_endian_scaled_int16":  # the file is what its name says
        assert written.header.endianness == ">" and written.get_data_dtype() == np.dtype(">i2")
        assert written.dataobj.slope == 2.0 and written.dataobj.inter == -1024.0
        assert np.abs(written.get_fdata() - data).max() <= 1.0
    return path, written.affine


def expected_views(ijk_to_ras: np.ndarray, shape_kji: tuple[int, ...]) -> dict:
    """Each view's array axis: the [k, j, i] axis whose direction lies closest to the view's normal (S, A, R)."""
    directions = np.abs(ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0))
    views = {}
    for view, ras_axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        axis = 2 - int(np.argmax(directions[ras_axis]))
        views[view] = {"array_axis": axis, "slices": shape_kji[axis]}
    return views


def download(client, job_id: str, folder: Path) -> nib.Nifti1Image:
    """The result as nibabel reads a file: the NIfTI version from the header itself."""
    response = client.get(f"/api/v1/jobs/{job_id}/result")
    assert response.status_code == 200, response.text
    path = folder / "result.nii"
    path.write_bytes(gzip.decompress(response.content))
    return nib.load(path)


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.mark.parametrize("name", CASES)
def test_an_awkward_nifti_comes_back_on_its_own_grid_with_the_mask_on_the_object(service, name, tmp_path):
    phantom = make_phantom(40 + CASES.index(name), size=SIZE, modality="ct")
    path, affine = write_case(name, phantom.volume, tmp_path)
    source = nib.load(path)
    key = phantom.key_index
    x0, y0, x1, y1 = phantom.box()
    corners = affine @ np.array([[x0 - 1, y0 - 1, key, 1.0], [x1 + 1, y1 + 1, key, 1.0]]).T
    box_ras = [*corners[:3, 0], *corners[:3, 1]]
    with service.client() as client:
        job_id = create_job(client, path.read_bytes())
        geometry = client.get(f"/api/v1/jobs/{job_id}/status").json()["volume"]
        ijk_to_ras = right_handed(affine, SIZE[0])  # the documented convention: K reversed on a left-handed grid
        np.testing.assert_allclose(geometry["ijk_to_ras"], ijk_to_ras, atol=1e-5)
        assert geometry["shape_kji"] == list(SIZE)
        assert geometry["views"] == expected_views(ijk_to_ras, SIZE)

        # the service's slice numbers: the key slice's position mapped through the status's own geometry
        service_key = (np.linalg.inv(geometry["ijk_to_ras"]) @ affine @ [0.0, 0.0, key, 1.0])[2]
        service_key = int(round(service_key))
        assert service_key == (SIZE[0] - 1 - key if name.startswith("las") else key)
        found = client.post(f"/api/v1/jobs/{job_id}/segment-2d", json={"box_ras": box_ras, "window": "abdomen"})
        assert found.status_code == 200, found.text
        assert found.json()["slice"] == service_key
        started = client.post(f"/api/v1/jobs/{job_id}/propagate", json={
            "box_ras": box_ras, "window": "abdomen", "range": "custom",
            "start": service_key - REACH, "end": service_key + REACH})
        assert started.status_code == 202, started.text
        events = read_events(client, job_id, started.json()["events_after"])
        assert events[-1][0] == "done", events[-1]
        result = download(client, job_id, tmp_path)

    assert type(result) is type(source)  # NIfTI-1 stays NIfTI-1, NIfTI-2 stays NIfTI-2
    for field in ("qform_code", "sform_code", "xyzt_units"):
        assert result.header[field] == source.header[field], field
    np.testing.assert_allclose(result.header.get_sform(), source.header.get_sform(), atol=1e-5)
    np.testing.assert_allclose(result.header.get_qform(), source.header.get_qform(), atol=1e-4)
    np.testing.assert_allclose(result.affine, affine, atol=1e-5)
    labels = np.asarray(result.dataobj) > 0
    assert labels.shape == source.shape  # the file's own voxel order (i, j, k)
    assert np.flatnonzero(labels.any(axis=(0, 1))).tolist() == list(range(key - REACH, key + REACH + 1))
    truth = phantom.mask.transpose(2, 1, 0).copy()  # the object in the file's (i, j, k)
    truth[..., : key - REACH] = truth[..., key + REACH + 1:] = False
    assert np.linalg.norm(centroid(labels) - centroid(truth)) < 1.0
    key_labels, key_truth = labels[..., key], truth[..., key]
    assert np.linalg.norm(centroid(key_labels) - centroid(key_truth)) < 1.0
