"""Volumes are checked before a reader allocates them: truncated or corrupt data (finding 4), headers that claim
huge volumes (finding 5), DICOM folders with several series or a missing slice (finding 6)."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA
from mrml_fixtures import scene  # noqa: F401  (pytest fixture)
from test_cli import cli

from MedSAM2HITLLib.dicom_series import read_dicom
from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.mrml_scene import load_volume
from MedSAM2HITLLib.roi_box import volume_ijk_to_world
from MedSAM2HITLLib.volume_file import (
    DEFAULT_MAX_VOLUME_BYTES,
    MAX_VOLUME_BYTES_ENV,
    VolumeHeader,
    available_memory_bytes,
    check_volume_file,
    max_volume_bytes,
)

pytestmark = pytest.mark.slow

SHAPE_IJK = (128, 128, 64)  # large enough that ITK reads only the header part of a .gz
BOMB_SIZE_IJK = (2000, 2000, 2000)  # int16: 16 GB


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(MAX_VOLUME_BYTES_ENV, raising=False)


def noise_volume() -> np.ndarray:
    """int16 noise: it hardly compresses, so the header's part of a .gz file stays intact when data are damaged."""
    return np.random.default_rng(0).integers(-1000, 1000, SHAPE_IJK, dtype=np.int16)


def write_nifti(path: Path) -> Path:
    nib.save(nib.Nifti1Image(noise_volume(), np.eye(4)), path)
    return path


def write_sitk(path: Path, compress: bool) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(noise_volume().transpose(2, 1, 0)), str(path), useCompression=compress)
    return path


def cut(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def flip_byte(path: Path, fraction: float) -> Path:
    data = bytearray(path.read_bytes())
    data[int(len(data) * fraction)] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


# Finding 4: truncated or corrupt data


@pytest.mark.parametrize("suffix, compress", [(".nii.gz", True), (".nii", False), (".nrrd", True), (".nrrd", False),
                                              (".nhdr", True), (".mha", True), (".mha", False), (".mhd", True)])
def test_complete_files_pass_with_their_header(suffix, compress, tmp_path):
    path = tmp_path / f"ct{suffix}"
    if suffix.startswith(".nii"):
        write_nifti(path)
    else:
        write_sitk(path, compress)
    assert check_volume_file(path) == VolumeHeader(SHAPE_IJK, "int16", 1, int(np.prod(SHAPE_IJK)) * 2)


def test_a_plain_nifti_named_nii_gz_passes_as_slicer_reads_it(tmp_path):
    """gzip or not is told by the magic number, as ITK's reader does."""
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(write_nifti(tmp_path / "ct.nii").read_bytes())
    assert check_volume_file(path).shape_ijk == SHAPE_IJK


@pytest.mark.parametrize("case, message", [
    ("gz_cut", "is truncated: its compressed data end early"),
    ("gz_flipped", "has corrupt compressed data"),
    ("gz_short_but_whole", "is truncated: it holds"),  # a valid gzip stream of too few bytes
    ("nii_cut", "is truncated: it holds"),
])
def test_truncated_or_corrupt_nifti_is_refused_before_reading(case, message, scene, tmp_path):  # noqa: F811
    """ITK's NIfTI reader used to fill the missing slices with zeros without a word."""
    if case == "gz_short_but_whole":
        path = tmp_path / "short.nii.gz"
        whole = write_nifti(tmp_path / "ct.nii").read_bytes()
        path.write_bytes(gzip.compress(whole[: len(whole) * 3 // 5]))
    else:
        damage = flip_byte if case == "gz_flipped" else cut
        path = damage(write_nifti(tmp_path / ("ct.nii" if case == "nii_cut" else "ct.nii.gz")), 0.6)
    with pytest.raises(BadInputError, match=message):
        check_volume_file(path)
    with pytest.raises(BadInputError, match=message):
        load_volume(scene, path)
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0


@pytest.mark.parametrize("suffix, compress, damage", [
    (".nrrd", True, "cut"), (".nrrd", False, "cut"), (".nrrd", True, "flip"),
    (".mha", False, "cut"), (".mha", True, "cut"), (".mha", True, "flip"), (".mhd", True, "flip"),
])
def test_truncated_or_corrupt_nrrd_and_metaimage_are_refused(suffix, compress, damage, scene, tmp_path):  # noqa: F811
    """NRRD's reader and MetaImage's for raw data refuse damage themselves; a corrupt compressed MetaImage used to
    load as wrong voxels."""
    path = write_sitk(tmp_path / f"ct{suffix}", compress)
    data_file = path.with_suffix(".zraw") if suffix == ".mhd" else path
    (cut if damage == "cut" else flip_byte)(data_file, 0.6)
    with pytest.raises(BadInputError, match="truncated|corrupt"):
        load_volume(scene, path)
    if compress and suffix != ".nrrd":  # the data pass; the readers themselves refuse the other cases
        with pytest.raises(BadInputError, match="truncated|corrupt"):
            check_volume_file(path)


def test_cli_info_refuses_a_truncated_nii_gz(tmp_path):
    result = cli("info", str(cut(write_nifti(tmp_path / "ct.nii.gz"), 0.5)))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("medsam2hitl:")]
    assert len(lines) == 1 and "'ct.nii.gz' is truncated" in lines[0], result.stderr
    assert "size (IJK)" not in result.stdout


@pytest.mark.parametrize("name, content, message", [
    ("photo.nii.gz", "png", "not a valid image file"),  # ITK alone would read it as a 2D PNG
    ("slice.nii.gz", np.zeros((8, 8), np.int16), r"is 2D \(8 x 8\)"),
    ("series.nii.gz", np.zeros((8, 8, 8, 3), np.int16), r"is 4D \(8 x 8 x 8 x 3\)"),
    ("two.nrrd", "vector", "2 components per voxel"),
    ("ct.png", "png", "not a supported volume file"),
])
def test_files_that_are_not_a_scalar_3d_volume_are_refused(name, content, message, tmp_path):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        nib.save(nib.Nifti1Image(content, np.eye(4)), path)
    elif content == "png":
        sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(tmp_path / "real.png"))
        path.write_bytes((tmp_path / "real.png").read_bytes())
    else:
        sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 2), str(path))
    with pytest.raises(BadInputError, match=message):
        check_volume_file(path)


# Finding 5: headers that claim huge volumes


def write_header_bomb(folder: Path, suffix: str, size_ijk=BOMB_SIZE_IJK) -> Path:
    """A file of a few hundred bytes whose header claims an int16 volume of `size_ijk` voxels."""
    path = folder / f"bomb{suffix}"
    sizes = " ".join(map(str, size_ijk))
    if suffix == ".nii.gz":
        header = nib.Nifti1Header()
        header.set_data_shape(size_ijk)
        header.set_data_dtype(np.int16)
        path.write_bytes(gzip.compress(header.binaryblock + bytes(4)))
    elif suffix == ".nrrd":
        path.write_text(f"NRRD0004\ntype: int16\ndimension: 3\nsizes: {sizes}\nendian: little\nencoding: gzip\n\n")
    else:
        path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {sizes}\nElementType = MET_SHORT\n"
                        f"CompressedData = True\nElementDataFile = {'LOCAL' if suffix == '.mha' else 'bomb.zraw'}\n")
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_header_bombs_are_refused_before_anything_is_allocated(suffix, tmp_path):
    path = write_header_bomb(tmp_path, suffix)
    assert path.stat().st_size < 400
    started = time.monotonic()
    refusal = f"2000 x 2000 x 2000 int16, 16 GB: over the 4.29 GB limit; .*{MAX_VOLUME_BYTES_ENV}"
    with pytest.raises(BadInputError, match=refusal):
        check_volume_file(path)
    assert time.monotonic() - started < 2.0


def test_cli_info_refuses_a_header_bomb_at_once(tmp_path):
    """It used to allocate 16 GB for two minutes; the timeout fails the test if it still does."""
    result = cli("info", str(write_header_bomb(tmp_path, ".nii.gz")), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "16 GB" in result.stderr and MAX_VOLUME_BYTES_ENV in result.stderr and "Traceback" not in result.stderr


def test_the_limit_is_the_parameter_else_the_environment_else_the_default(monkeypatch, scene, tmp_path):  # noqa: F811
    path = write_nifti(tmp_path / "ct.nii.gz")
    nbytes = int(np.prod(SHAPE_IJK)) * 2
    assert max_volume_bytes() == DEFAULT_MAX_VOLUME_BYTES
    monkeypatch.setenv(MAX_VOLUME_BYTES_ENV, str(nbytes))
    assert check_volume_file(path).nbytes == nbytes
    monkeypatch.setenv(MAX_VOLUME_BYTES_ENV, str(nbytes - 1))
    with pytest.raises(BadInputError, match=f"over the .* limit; if the header is right, set {MAX_VOLUME_BYTES_ENV}"):
        check_volume_file(path)
    assert check_volume_file(path, max_bytes=nbytes).nbytes == nbytes  # the parameter wins
    monkeypatch.setenv(MAX_VOLUME_BYTES_ENV, str(10 * nbytes))
    with pytest.raises(BadInputError, match="the caller's max_bytes sets it"):
        load_volume(scene, path, max_bytes=nbytes - 1)
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0
    monkeypatch.setenv(MAX_VOLUME_BYTES_ENV, "4GB")
    with pytest.raises(BadInputError, match=f"{MAX_VOLUME_BYTES_ENV}='4GB' is not a positive whole number of bytes"):
        check_volume_file(path)


def test_a_volume_larger_than_free_memory_is_refused_even_under_the_limit(tmp_path):
    available = available_memory_bytes()
    assert available is not None and 0 < available
    path = write_header_bomb(tmp_path, ".nrrd", (60000, 60000, 60000))  # 432 TB
    with pytest.raises(BadInputError, match="432 TB: more than the .* of memory available now"):
        check_volume_file(path, max_bytes=2**62)


# Finding 6: DICOM folders


def write_dicom_series(folder: Path, series_uid: str, depths_mm, description: str = "", first_value: int = 0):
    """One 16 x 12 CT slice per file at each depth along z; slice n holds the value first_value + n."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for n, depth in enumerate(depths_mm):
        piece = sitk.Image([16, 12], sitk.sitkInt16) + (first_value + n)
        piece.SetSpacing((0.7, 0.8))
        tags = {"0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{n + 1}", "0008|0060": "CT",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid, "0020|0013": str(n + 1),
                "0020|0032": f"-10\\-20\\{depth}", "0020|0037": "1\\0\\0\\0\\1\\0"}
        if description:
            tags["0008|103e"] = description
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{n:03d}.dcm"))
        writer.Execute(piece)


SERIES_A, SERIES_B = "1.2.826.0.1.3680043.2.1125.7.1", "1.2.826.0.1.3680043.2.1125.7.2"


@pytest.fixture
def two_series(tmp_path) -> Path:
    folder = tmp_path / "study"
    write_dicom_series(folder, SERIES_A, [2.5 * k for k in range(10)], description="T1 axial")
    write_dicom_series(folder, SERIES_B, [3.0 * k for k in range(6)], first_value=100)
    return folder


def test_a_folder_with_two_series_lists_them_and_loads_the_chosen_one(two_series, scene):  # noqa: F811
    import slicer.util

    with pytest.raises(BadInputError) as refused:
        load_volume(scene, two_series)
    assert f"{SERIES_A} (T1 axial, 10 slices); {SERIES_B} (6 slices); choose one by its UID" in str(refused.value)
    for uid, slices, first_value, spacing in ((SERIES_A, 10, 0, 2.5), (SERIES_B, 6, 100, 3.0)):
        volume = load_volume(scene, two_series, series_uid=uid)
        array = slicer.util.arrayFromVolume(volume)
        assert array.shape == (slices, 12, 16)
        assert sorted(np.unique(array)) == list(range(first_value, first_value + slices))
        assert np.allclose(np.linalg.norm(volume_ijk_to_world(volume)[:3, :3], axis=0), (0.7, 0.8, spacing))
    with pytest.raises(BadInputError, match=f"has no DICOM series 1.2.3: {SERIES_A} .*; {SERIES_B}"):
        load_volume(scene, two_series, series_uid="1.2.3")
    with pytest.raises(BadInputError, match="applies only to DICOM folders"):
        load_volume(scene, write_nifti(two_series.parent / "ct.nii.gz"), series_uid=SERIES_A)


@pytest.mark.parametrize("depths, message", [
    ([2.5 * k for k in range(12) if k != 6], r"1 slice is missing between '\S+_005.dcm' and '\S+_006.dcm' \(5 mm "
                                             r"apart, the others 2.5 mm\)"),
    ([2.5 * k for k in range(6)] + [12.5], r"'\S+_005.dcm' and '\S+_006.dcm' have the same slice position \(12.5 mm"
                                           r" along the slice normal\): the folder holds a slice twice"),
    ([2.5 * k for k in range(6)] + [13.5], r"uneven slice spacing \(1 to 2.5 mm; between '\S+_005.dcm' and "
                                           r"'\S+_006.dcm' \(1 mm apart"),
])
def test_a_series_with_uneven_slice_spacing_is_refused(depths, message, scene, tmp_path):  # noqa: F811
    """ITK used to spread these slices at their mean spacing (2.566 mm instead of 2.5), warning only."""
    write_dicom_series(tmp_path / "gap", SERIES_A, depths)
    with pytest.raises(BadInputError, match=message):
        load_volume(scene, tmp_path / "gap")


def test_a_dicom_series_over_the_limit_is_refused(two_series):
    assert read_dicom(two_series, SERIES_B, max_bytes=16 * 12 * 6 * 2).voxels.shape == (6, 12, 16)
    with pytest.raises(BadInputError, match="DICOM series .* is 16 x 12 x 6 int16"):
        read_dicom(two_series, SERIES_B, max_bytes=16 * 12 * 6 * 2 - 1)


def test_cli_series_option_of_info_and_segment(two_series, tmp_path):
    result = cli("info", str(two_series), "--series", SERIES_B)
    assert result.returncode == 0, result.stderr
    assert "16 x 12 x 6" in result.stdout
    result = cli("segment", str(two_series), "--series", "1.2.3", "--box-ras", "0", "0", "0", "5", "5", "0",
                 "--checkpoint", str(DATA / "phantom_sam2.pt"), "-o", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 2, result.stderr
    assert f"has no DICOM series 1.2.3: {SERIES_A} (T1 axial, 10 slices); {SERIES_B} (6 slices)" in result.stderr
