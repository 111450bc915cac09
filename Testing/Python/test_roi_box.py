"""ROI → Engine box, key slice, slice range and view ↔ array axis, on volumes read from NIfTI by Slicer.

Each result is cross-checked voxel by voxel against a reference computed from nibabel's affine in plain
numpy (see mrml_fixtures), on flipped, left-handed and oblique grids, with rotated ROIs and parent transforms.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from mrml_fixtures import (
    AFFINES,
    DATA,
    SHAPE_IJK,
    add_roi,
    add_transform,
    affine_from,
    bounding_box_2d,
    inside_roi,
    rotation,
    scene,  # noqa: F401  (pytest fixture)
    to_slicer_order,
    write_id_volume,
)

from MedSAM2HITLLib import roi_box
from MedSAM2HITLLib.errors import BadInputError
from MedSAM2HITLLib.mrml_scene import load_roi, load_volume

pytestmark = pytest.mark.unit

ROI_SIZE = (14.0, 11.0, 9.0)
CENTRE_IJK = np.array(SHAPE_IJK) / 2 + np.array([0.3, 0.2, -0.4])  # not on a rounding tie


def _setup(scene, tmp_path, grid: str, variant: str):
    """Volume from NIfTI, ROI around its centre; returns nodes, Slicer→file voxel IDs and the reference."""
    import slicer

    volume = load_volume(scene, write_id_volume(tmp_path, AFFINES[grid]))
    ids = slicer.util.arrayFromVolume(volume).copy()
    volume_to_world = np.eye(4)
    roi_parent_to_world = np.eye(4)
    roi_rotation = np.eye(3) if variant == "plain" else rotation(15, -25, 30)
    roi_parent = None
    if variant == "transforms":
        volume_to_world = affine_from(rotation(10, 5, -20), [4.0, -6.0, 3.0])
        volume.SetAndObserveTransformNodeID(add_transform(scene, volume_to_world).GetID())
        outer = affine_from(rotation(0, 0, 12), [1.0, 2.0, -3.0])
        inner = affine_from(rotation(-8, 20, 0), [-5.0, 0.5, 2.0])
        roi_parent = add_transform(scene, inner, parent=add_transform(scene, outer))
        roi_parent_to_world = outer @ inner
    ijk_to_world = volume_to_world @ AFFINES[grid]
    centre_world = ijk_to_world @ np.append(CENTRE_IJK, 1.0)
    object_to_node = affine_from(roi_rotation, (np.linalg.inv(roi_parent_to_world) @ centre_world)[:3])
    roi = add_roi(scene, object_to_node, ROI_SIZE, parent=roi_parent)
    inside_file = inside_roi(ijk_to_world, roi_parent_to_world @ object_to_node, ROI_SIZE)
    return volume, roi, ids, to_slicer_order(inside_file, ids)


@pytest.mark.parametrize("variant", ["plain", "rotated_roi", "transforms"])
@pytest.mark.parametrize("grid", sorted(AFFINES))
def test_box_matches_reference_on_every_axis(scene, tmp_path, grid, variant):  # noqa: F811
    volume, roi, ids, inside = _setup(scene, tmp_path, grid, variant)
    centre_voxel_id = np.ravel_multi_index(tuple(np.round(CENTRE_IJK).astype(int)), SHAPE_IJK)
    centre_in_slicer = np.argwhere(ids == centre_voxel_id)[0]
    for axis in range(3):
        key = roi_box.key_slice_index(volume, roi, axis)
        assert key == centre_in_slicer[axis]
        for index in (key, key + 1):
            expected = np.take(inside, index, axis)
            assert expected.sum() > 4
            np.testing.assert_array_equal(roi_box.roi_slice_mask(volume, roi, axis, index), expected)
            assert roi_box.roi_box(volume, roi, axis, index) == bounding_box_2d(expected)
        assert roi_box.roi_box(volume, roi, axis) == bounding_box_2d(np.take(inside, key, axis))

        first, last = roi_box.roi_slice_range(volume, roi, axis)
        occupied = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        assert first <= occupied[0] and occupied[-1] <= last  # every slice the ROI covers is in the range
        assert occupied[0] - first <= 1 and last - occupied[-1] <= 1  # and the range is not wider than that


def test_agrees_with_slicer_point_in_roi(scene, tmp_path):  # noqa: F811
    """Slicer's own IsPointInROIWorld gives the same voxels (a second, MRML-side reference)."""
    volume, roi, _, _ = _setup(scene, tmp_path, "oblique_left_handed", "transforms")
    ijk_to_world = roi_box.volume_ijk_to_world(volume)
    axis = 1
    index = roi_box.key_slice_index(volume, roi, axis)
    mask = roi_box.roi_slice_mask(volume, roi, axis, index)
    row_axis, column_axis = (a for a in range(3) if a != axis)
    for row in range(mask.shape[0]):
        for column in range(mask.shape[1]):
            kji = [0, 0, 0]
            kji[axis], kji[row_axis], kji[column_axis] = index, row, column
            world = (ijk_to_world @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]
            assert bool(roi.IsPointInROIWorld(world)) == mask[row, column]


def test_view_maps_to_closest_array_axis(scene):  # noqa: F811
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array

    # A sagittal acquisition: i runs posterior, j inferior, k right (tilted 20° about S).
    linear = rotation(0, 0, 20) @ np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    volume = add_volume_from_array(scene, np.zeros((8, 9, 10), np.int16), affine_from(linear, [0, 0, 0]))
    assert roi_box.array_axis_for_view(volume, "axial") == 1  # j ~ S
    assert roi_box.array_axis_for_view(volume, "coronal") == 2  # i ~ A
    assert roi_box.array_axis_for_view(volume, "sagittal") == 0  # k ~ R
    assert [roi_box.view_for_array_axis(volume, axis) for axis in range(3)] == ["sagittal", "axial", "coronal"]
    # A parent transform turning the volume by 90° about R swaps axial and coronal.
    volume.SetAndObserveTransformNodeID(add_transform(scene, affine_from(rotation(90, 0, 0), [0, 0, 0])).GetID())
    assert roi_box.array_axis_for_view(volume, "axial") == 2
    assert roi_box.array_axis_for_view(volume, "coronal") == 1
    with pytest.raises(BadInputError, match="unknown slice view"):
        roi_box.array_axis_for_view(volume, "oblique")


def test_roi_around_aal_region_gives_its_bounding_box_on_each_axis(scene, tmp_path):  # noqa: F811
    """Real MR (Colin27, brain-extracted) and the AAL atlas on the same grid; ROI saved and re-read as .mrk.json."""
    import slicer

    volume = load_volume(scene, DATA / "ch2bet.nii.gz")
    source = nib.load(DATA / "ch2bet.nii.gz")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), np.asarray(source.dataobj).transpose(2, 1, 0))
    atlas = nib.load(DATA / "aal.nii.gz")
    np.testing.assert_allclose(atlas.affine, source.affine)
    labels = np.asarray(atlas.dataobj).transpose(2, 1, 0)  # Slicer's [k, j, i] order, checked just above
    for label in (37, 71):  # Hippocampus_L, Caudate_L
        region = labels == label
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            along = np.flatnonzero(region.any(axis=others))
            key = int((along[0] + along[-1]) // 2)
            expected = bounding_box_2d(np.take(region, key, axis))
            # ROI in voxel units of the [k, j, i] array: the region's box on the key slice ± half a voxel,
            # 5 slices thick, converted to world with nibabel's affine (axis-aligned for this atlas).
            low, high = np.zeros(3), np.zeros(3)
            low[axis], high[axis] = key - 2.4, key + 2.4
            low[others[0]], high[others[0]] = expected[1] - 0.5, expected[3] + 0.5
            low[others[1]], high[others[1]] = expected[0] - 0.5, expected[2] + 0.5
            centre_kji, size_kji = (low + high) / 2, high - low
            centre = (atlas.affine @ np.append(centre_kji[::-1], 1.0))[:3]
            size = np.abs(np.diag(atlas.affine)[:3]) * size_kji[::-1]
            path = tmp_path / f"roi_{label}_{axis}.mrk.json"
            _save_roi(scene, affine_from(np.eye(3), centre), size, path)

            roi = load_roi(scene, path)
            assert roi_box.key_slice_index(volume, roi, axis) == key
            assert roi_box.roi_box(volume, roi, axis) == expected
            first, last = roi_box.roi_slice_range(volume, roi, axis)
            assert (first, last) == (key - 2, key + 2)


def _save_roi(scene, object_to_node, size, path) -> None:
    roi = add_roi(scene, object_to_node, size, name="saved")
    storage = roi.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(roi)
    scene.RemoveNode(roi)


def test_bad_rois_give_clear_errors(scene, tmp_path):  # noqa: F811
    volume, roi, _, _ = _setup(scene, tmp_path, "oblique", "plain")
    far = add_roi(scene, affine_from(np.eye(3), [500.0, 500.0, 500.0]), ROI_SIZE, name="far")
    with pytest.raises(BadInputError, match="outside volume"):
        roi_box.key_slice_index(volume, far, 0)
    with pytest.raises(BadInputError, match="does not overlap"):
        roi_box.roi_slice_range(volume, far, 0)
    key = roi_box.key_slice_index(volume, roi, 0)
    with pytest.raises(BadInputError, match="contains no voxel centre of slice"):
        roi_box.roi_box(volume, roi, 0, index=0 if key > 10 else SHAPE_IJK[2] - 1)
    flat = add_roi(scene, affine_from(np.eye(3), roi.GetCenterWorld()), (0.0, 0.0, 5.0), name="flat")
    with pytest.raises(BadInputError, match="degenerate"):
        roi_box.roi_box(volume, flat, 0)
    with pytest.raises(BadInputError, match="no ROI selected"):
        roi_box.roi_box(volume, None, 0)
    with pytest.raises(BadInputError, match="array axis"):
        roi_box.roi_box(volume, roi, 3)

    import vtk

    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point in ((0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)):
        source.InsertNextPoint(point)
        target.InsertNextPoint(point[0] + 1, point[1], point[2] * 1.1)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(spline)
    roi.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(BadInputError, match="non-linear transform"):
        roi_box.roi_box(volume, roi, 0)


def test_load_roi_refuses_other_markups(scene, tmp_path):  # noqa: F811
    path = tmp_path / "points.mrk.json"
    path.write_text('{"markups": [{"type": "Fiducial", "controlPoints": []}]}', encoding="utf-8")
    with pytest.raises(BadInputError, match="exactly one ROI"):
        load_roi(scene, path)
    with pytest.raises(BadInputError, match="does not exist"):
        load_roi(scene, tmp_path / "missing.mrk.json")


def test_flat_roi_drawn_on_a_slice_selects_that_slice(scene):  # noqa: F811
    """An ROI of zero thickness lying on a slice's voxel centres (as drawn in a slice view) still works."""
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array

    ijk_to_ras = affine_from(np.diag([0.5, 0.5, 2.0]), [-10.0, -12.0, -8.0])
    volume = add_volume_from_array(scene, np.zeros((20, 40, 50), np.int16), ijk_to_ras)
    centre = (ijk_to_ras @ [20.0, 15.0, 7.0, 1.0])[:3]  # i = 20, j = 15 on slice k = 7
    roi = add_roi(scene, affine_from(np.eye(3), centre), (6.0, 4.0, 0.0))
    assert roi_box.key_slice_index(volume, roi, 0) == 7
    assert roi_box.roi_slice_range(volume, roi, 0) == (7, 7)
    assert roi_box.roi_box(volume, roi, 0) == (14, 11, 26, 19)  # ±3 mm and ±2 mm at 0.5 mm spacing
    with pytest.raises(BadInputError, match="contains no voxel centre of slice 8"):
        roi_box.roi_box(volume, roi, 0, index=8)
