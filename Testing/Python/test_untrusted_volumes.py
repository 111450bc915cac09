"""Volume files the library refuses on their own bytes: detached data files (in the service), NaN or infinite voxels
that ITK's NIfTI reader would turn into 0, and a .nii.gz with data beyond its header's extent (a gzip bomb)."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from test_cli import _env

from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.volume_file import check_volume_file

pytestmark = pytest.mark.slow

SHAPE = (6, 7, 8)


def ones(dtype=np.float32) -> np.ndarray:
    return np.ones(SHAPE, dtype)


def with_non_finite() -> np.ndarray:
    values = ones()
    values[1, 2, 3], values[2, 3, 4], values[3, 4, 5] = np.nan, np.inf, -np.inf
    return values


def detached_nrrd(folder, target: str):
    path = folder / "volume.nrrd"
    path.write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: {target}\n\n")
    return path


def detached_mha(folder, target: str):
    path = folder / "volume.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                    f"ElementDataFile = {target}\n")
    return path


def nifti_pair(folder):
    nib.save(nib.Nifti1Pair(ones(np.int16), np.eye(4)), folder / "pair.img")
    path = folder / "volume.nii"
    path.write_bytes((folder / "pair.hdr").read_bytes())
    return path


@pytest.mark.parametrize("make, words", [
    (lambda folder: detached_nrrd(folder, "/etc/passwd"), "data file: /etc/passwd"),
    (lambda folder: detached_nrrd(folder, "LIST"), "data file: LIST"),
    (lambda folder: detached_mha(folder, "../../etc/passwd"), "ElementDataFile = ../../etc/passwd"),
    (nifti_pair, "separate .img file"),
])
def test_a_service_refuses_headers_that_name_a_data_file(tmp_path, make, words):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(8)))
    path = make(tmp_path)
    with pytest.raises(BadInputError, match="names a detached data file") as refused:
        check_volume_file(path, self_contained=True)
    assert words in str(refused.value) and "self-contained" in str(refused.value)


def test_the_cli_path_still_reads_a_detached_header_of_the_users_own_files(tmp_path):
    (tmp_path / "voxels.raw").write_bytes(bytes(range(8)))
    path = detached_nrrd(tmp_path, "voxels.raw")
    assert check_volume_file(path).shape_ijk == (2, 2, 2)
    with pytest.raises(BadInputError, match="detached"):
        check_volume_file(path, self_contained=True)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ">.nii", ".nrrd", ".mha"])
def test_nan_and_infinite_voxels_are_refused_in_every_format(tmp_path, suffix):
    values = with_non_finite()
    path = tmp_path / f"volume{suffix.lstrip('>')}"
    if suffix.endswith(".nii") or suffix.endswith(".nii.gz"):
        image = nib.Nifti1Image(values.astype(">f4" if suffix.startswith(">") else "<f4"), np.eye(4))
        nib.save(image, path)
        read = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        assert np.isfinite(read).all()  # why the check reads the bytes itself: ITK's NIfTI reader hides them
    else:
        sitk.WriteImage(sitk.GetImageFromArray(values), str(path), True)
    with pytest.raises(BadInputError, match=r"has 3 float32 voxel\(s\) that are NaN or infinite"):
        check_volume_file(path)
    clean = tmp_path / f"clean{suffix.lstrip('>')}"
    if suffix.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(ones(), np.eye(4)), clean)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(ones()), str(clean), True)
    assert check_volume_file(clean).dtype == "float32"


def test_a_gzipped_nifti_with_trailing_data_is_refused_without_inflating_it_all(tmp_path):
    raw = nib.Nifti1Image(ones(np.int16), np.eye(4)).to_bytes()
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(raw + b"\0" * (64 << 20)))  # 64 MB of zeros after the volume, 64 kB on disk
    with pytest.raises(BadInputError, match=f"beyond the {len(raw):,} bytes its header describes"):
        check_volume_file(path)
    path.write_bytes(gzip.compress(raw))
    assert check_volume_file(path).shape_ijk == SHAPE


def test_info_says_in_one_line_why_a_volume_with_nan_is_refused(tmp_path):
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(with_non_finite(), np.eye(4)), path)
    run = subprocess.run([sys.executable, "-m", "MedSAM2HITLLib.cli", "info", str(path)], capture_output=True,
                         text=True, env=_env(), timeout=120)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "3 float32 voxel(s) that are NaN or infinite" in lines[0], run.stderr
