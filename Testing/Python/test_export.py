"""Export round trips (NIfTI labelmap reloaded with nibabel, .seg.nrrd re-read by Slicer) and volume loading."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
from mrml_fixtures import AFFINES, SHAPE_IJK, affine_from, scene, write_id_volume  # noqa: F401

from MedSAM2HITLLib import segment_writer as sw
from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.export import export_labelmap_nifti, export_seg_nrrd, volume_ijk_to_ras
from MedSAM2HITLLib.mrml_scene import add_volume_from_array, load_volume

pytestmark = pytest.mark.unit

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _segment(scene, volume, rng, names=("liver", "lesion", "spleen")):  # noqa: F811
    """Segmentation with random, partly overlapping segments; returns it and {id: mask} in Slicer order."""
    segmentation = sw.create_segmentation(scene, volume)
    shape = tuple(reversed(volume.GetImageData().GetDimensions()))
    masks = {}
    for name in names:
        segment_id = sw.get_or_create_segment(segmentation, name)
        mask = rng.random(shape) < 0.25
        sw.write_slices(segmentation, segment_id, volume, 1, {j: mask[:, j] for j in range(shape[1])})
        masks[segment_id] = mask
    return segmentation, masks


def _labels(masks: dict[str, np.ndarray], order) -> np.ndarray:
    labels = np.zeros(next(iter(masks.values())).shape, np.uint8)
    for value, segment_id in enumerate(order, start=1):
        labels[masks[segment_id]] = value
    return labels


@pytest.mark.parametrize("grid", sorted(AFFINES))
def test_nifti_labelmap_has_the_source_affine_and_voxel_order(scene, tmp_path, grid):  # noqa: F811
    import slicer

    source = write_id_volume(tmp_path, AFFINES[grid])
    volume = load_volume(scene, source)
    ids = slicer.util.arrayFromVolume(volume).astype(np.int64)  # file voxel index of every Slicer voxel
    segmentation, masks = _segment(scene, volume, np.random.default_rng(3))
    order = list(masks)

    names = export_labelmap_nifti(segmentation, volume, tmp_path / "out" / "labels.nii.gz")
    assert names == {1: "liver", 2: "lesion", 3: "spleen"}
    exported = nib.load(tmp_path / "out" / "labels.nii.gz")
    reference = nib.load(source)
    np.testing.assert_allclose(exported.affine, reference.affine, atol=1e-5)
    assert exported.shape == SHAPE_IJK
    assert int(exported.header["sform_code"]) == int(reference.header["sform_code"])
    expected = np.zeros(np.prod(SHAPE_IJK), np.uint8)
    expected[ids.ravel()] = _labels(masks, order).ravel()  # later segments win where they overlap
    np.testing.assert_array_equal(np.asarray(exported.dataobj), expected.reshape(SHAPE_IJK))


def test_nifti_export_without_source_file_uses_ijk_to_ras_and_segment_choice(scene, tmp_path):  # noqa: F811
    shape = (10, 12, 14)
    ijk_to_ras = AFFINES["oblique_left_handed"]
    volume = add_volume_from_array(scene, np.zeros(shape, np.int16), ijk_to_ras, "from memory")
    segmentation, masks = _segment(scene, volume, np.random.default_rng(4))
    chosen = list(masks)[::-1][:2]  # spleen then lesion
    names = export_labelmap_nifti(segmentation, volume, tmp_path / "two.nii", segment_ids=chosen)
    assert names == {1: "spleen", 2: "lesion"}
    exported = nib.load(tmp_path / "two.nii")
    np.testing.assert_allclose(exported.affine, ijk_to_ras, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(exported.dataobj), _labels(masks, chosen).transpose(2, 1, 0))


def test_seg_nrrd_round_trip(scene, tmp_path):  # noqa: F811
    import slicer

    volume = load_volume(scene, write_id_volume(tmp_path, AFFINES["oblique"]))
    segmentation, masks = _segment(scene, volume, np.random.default_rng(5))
    path = export_seg_nrrd(segmentation, tmp_path / "result.seg.nrrd")

    header = path.read_bytes().split(b"\n\n", 1)[0].decode("latin-1")
    directions_line = header.split("space directions:")[1].splitlines()[0]
    directions = np.array([[float(v) for v in d.split(",")] for d in re.findall(r"\(([^)]*)\)", directions_line)]).T
    origin = np.array([float(v) for v in re.search(r"space origin: \(([^)]*)\)", header).group(1).split(",")])
    ijk_to_lps = LPS_FROM_RAS @ volume_ijk_to_ras(volume)
    np.testing.assert_allclose(directions, ijk_to_lps[:3, :3], atol=1e-6)
    np.testing.assert_allclose(origin, ijk_to_lps[:3, 3], atol=1e-6)

    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(reread)
    original = segmentation.GetSegmentation()
    for segment_id, mask in masks.items():
        name = original.GetSegment(segment_id).GetName()
        reread_id = reread.GetSegmentation().GetSegmentIdBySegmentName(name)
        np.testing.assert_array_equal(sw.read_segment(reread, reread_id, volume), mask, err_msg=name)


def test_export_errors_are_clear(scene, tmp_path):  # noqa: F811
    volume = add_volume_from_array(scene, np.zeros((4, 5, 6), np.int16), np.eye(4))
    segmentation = sw.create_segmentation(scene, volume)
    with pytest.raises(BadInputError, match="no segments"):
        export_labelmap_nifti(segmentation, volume, tmp_path / "x.nii.gz")
    with pytest.raises(BadInputError, match="must end with .nii"):
        export_labelmap_nifti(segmentation, volume, tmp_path / "x.nrrd")
    with pytest.raises(BadInputError, match="must end with .seg.nrrd"):
        export_seg_nrrd(segmentation, tmp_path / "x.nrrd")


def test_load_volume_formats_and_errors(scene, tmp_path):  # noqa: F811
    import SimpleITK as sitk
    import slicer

    array = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 500).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))  # coronal slices
    ijk_to_lps = affine_from(np.array(image.GetDirection()).reshape(3, 3) * image.GetSpacing(), image.GetOrigin())
    expected_ijk_to_ras = LPS_FROM_RAS @ ijk_to_lps

    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(image, str(tmp_path / f"volume{suffix}"))
        volume = load_volume(scene, tmp_path / f"volume{suffix}")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), array)
        np.testing.assert_allclose(volume_ijk_to_ras(volume), expected_ijk_to_ras, atol=1e-6)

    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_dicom_series(image, folder)
    volume = load_volume(scene, folder)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), array)
    np.testing.assert_allclose(volume_ijk_to_ras(volume), expected_ijk_to_ras, atol=1e-5)

    with pytest.raises(BadInputError, match="does not exist"):
        load_volume(scene, tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BadInputError, match="not a supported volume file"):
        load_volume(scene, tmp_path / "notes.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(BadInputError, match="could not read volume .* not a valid image file"):
        load_volume(scene, tmp_path / "broken.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no DICOM series"):
        load_volume(scene, tmp_path / "empty")
    sitk.WriteImage(sitk.Compose(image, image), str(tmp_path / "two_channels.nrrd"))
    with pytest.raises(BadInputError, match="2 components"):
        load_volume(scene, tmp_path / "two_channels.nrrd")


def _write_dicom_series(image, folder) -> None:
    """One MR slice per file with the position/orientation tags a DICOM reader needs."""
    import SimpleITK as sitk

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(str(v) for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in (
            ("0008|0016", "1.2.840.10008.5.1.4.1.1.4"),
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{k + 1}"),
            ("0008|0060", "MR"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"),
            ("0020|0013", str(k + 1)),
            ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
            ("0020|0037", orientation),
        ):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


@pytest.mark.parametrize("dtype", [bool, np.float16, np.complex64])
def test_arrays_vtk_cannot_hold_are_refused_with_advice(dtype):
    from MedSAM2HITLLib.errors import BadInputError
    from MedSAM2HITLLib.mrml_scene import create_scene

    with pytest.raises(BadInputError, match="convert it first"):
        add_volume_from_array(create_scene(), np.zeros((3, 4, 5), dtype), np.eye(4), "odd")
