"""Volume → slice → box → mask → segment, end to end with the project's trained phantom model.

Phantoms with distractor objects are written as NIfTI on several grids (identity, left-handed/flipped, oblique,
and a parent transform on volume and ROI), with the object's slice direction on each array axis in turn. An ROI is placed in RAS around
the object on its key slice; the worker segments and propagates; the exported labelmap is compared with the
true mask in the file's own voxel order (nibabel), so any flip, transpose or off-by-one shows up as low Dice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA, REPO

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from evaluate_phantom_model import dice  # noqa: E402
from phantoms import make_phantom  # noqa: E402

pytestmark = pytest.mark.slow

PHANTOM_CHECKPOINT = DATA / "phantom_sam2.pt"
SIZE = (44, 80, 96)  # slices along the phantom's axis 0; ≥ 40 slices propagated


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    return (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))


def affine(linear: np.ndarray, origin) -> np.ndarray:
    result = np.eye(4)
    result[:3, :3], result[:3, 3] = linear, origin
    return result


GRIDS = {
    "identity": affine(np.eye(3), [0, 0, 0]),
    "flipped": affine(np.diag([-0.9, 1.1, -1.3]), [40, -30, 25]),
    "left_handed": affine(np.diag([-1.0, 1.0, 1.5]), [12, 5, -8]),
    "oblique": affine(rotation(0.3, -0.2, 0.5) @ np.diag([1.0, 1.2, 1.4]), [-20, 10, 5]),
}
PARENT = affine(rotation(0.0, 0.0, np.pi / 2), [5, -7, 3])  # a 90° turn: the views change axes


@pytest.fixture(scope="module", params=["local", "service"])
def logic(request, tmp_path_factory):
    """The same logic on the local worker and on the inference service (real Redis, Celery worker and API)."""
    from MedSAM2HITLLib.logic import SegmentationLogic
    from MedSAM2HITLLib.service_transport import service_transport_factory
    from MedSAM2HITLLib.worker_client import WorkerClient

    service = None
    if request.param == "service":
        from service_fixtures import Service

        service = Service(tmp_path_factory.mktemp("service_logic")).start()
        logic = SegmentationLogic(WorkerClient(service_transport_factory(service.url)))
    else:
        logic = SegmentationLogic()
    info = logic.load_model(PHANTOM_CHECKPOINT, device="cpu", threads=2).wait(120)
    assert ("(service)" in info["device"]) == (service is not None)
    yield logic
    logic.stop_worker()
    if service is not None:
        service.stop()


class Case:
    """One phantom on one grid with its slice direction on array axis `axis`, loaded into a fresh scene."""

    def __init__(self, folder: Path, seed: int, grid: str, axis: int, transformed: bool = False):
        from MedSAM2HITLLib.mrml_scene import create_scene, load_volume

        self.phantom = make_phantom(seed, size=SIZE, modality="ct")
        self.affine = GRIDS[grid]
        self.file_axis = 2 - axis  # Slicer's [k, j, i] array axis a is the file's axis 2 - a
        # file (i, j, k) arrays with the phantom's slices along file_axis
        self.truth = np.moveaxis(self.phantom.mask, 0, axis).transpose(2, 1, 0)
        path = folder / f"phantom_{grid}_{axis}.nii.gz"
        nib.save(nib.Nifti1Image(np.moveaxis(self.phantom.volume, 0, axis).transpose(2, 1, 0), self.affine), path)
        self.scene = create_scene()
        self.volume = load_volume(self.scene, path)
        self.parent = None
        if transformed:
            import slicer

            self.parent = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
            self.parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(PARENT))
            self.volume.SetAndObserveTransformNodeID(self.parent.GetID())
        self.key = self.phantom.key_index

    def roi(self, box_voxels: tuple[np.ndarray, np.ndarray] | None = None, name: str = "Object"):
        """An ROI oriented with the file's voxel axes around a box of file voxels on the key slice."""
        import slicer

        if box_voxels is None:
            on_key = np.take(self.truth, self.key, axis=self.file_axis)
            rows, cols = np.nonzero(on_key)
            plane = [a for a in range(3) if a != self.file_axis]
            low, high = np.zeros(3), np.zeros(3)
            low[plane], high[plane] = (rows.min(), cols.min()), (rows.max(), cols.max())
            low[self.file_axis] = high[self.file_axis] = self.key
            low, high = low - 1, high + 1  # a user's box has some margin
            low[self.file_axis] = high[self.file_axis] = self.key
        else:
            low, high = box_voxels
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        size_voxels = high - low + 1
        object_to_node = affine(self.affine[:3, :3] / spacing, (self.affine @ [*(low + high) / 2, 1])[:3])
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        roi.SetSize(*(size_voxels * spacing))
        roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
        if self.parent is not None:
            roi.SetAndObserveTransformNodeID(self.parent.GetID())
        return roi

    def view(self) -> str:
        from MedSAM2HITLLib.roi_box import view_for_array_axis

        return view_for_array_axis(self.volume, 2 - self.file_axis)

    def exported(self, segmentation, folder: Path) -> np.ndarray:
        """The labelmap as written by the exporter and read back with nibabel, in the file's voxel order."""
        from MedSAM2HITLLib.export import export_labelmap_nifti

        path = folder / "labels.nii.gz"
        export_labelmap_nifti(segmentation, self.volume, path)
        image = nib.load(path)
        assert np.allclose(image.affine, self.affine)
        return np.asarray(image.dataobj) > 0


CASES = [(grid, axis, False) for grid in GRIDS for axis in (0, 1, 2)] + [("identity", 0, True), ("oblique", 2, True)]


@pytest.mark.parametrize("grid, axis, transformed", CASES, ids=[f"{g}-axis{a}{'-parent' if t else ''}" for g, a, t in CASES])
def test_box_in_ras_segments_and_propagates_onto_the_true_object(logic, tmp_path, grid, axis, transformed):
    case = Case(tmp_path, seed=100 + axis, grid=grid, axis=axis, transformed=transformed)
    roi = case.roi()
    view = case.view()

    segmentation, segment_id = logic.segment_slice(case.volume, roi, None, axis=view, window="abdomen").wait(120)
    labels = case.exported(segmentation, tmp_path)
    slices = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != case.file_axis)))
    assert slices.tolist() == [case.key], "the 2D mask must land on the ROI's slice"
    key_dice = dice(np.take(labels, case.key, case.file_axis), np.take(case.truth, case.key, case.file_axis))
    assert key_dice >= 0.8

    logic.propagate(case.volume, segmentation, segment_id, axis=view, roi_node=roi, window="abdomen").wait(300)
    labels = case.exported(segmentation, tmp_path)
    assert dice(labels, case.truth) >= 0.7


def test_propagation_from_a_corrected_slice_beats_a_bad_box(logic, tmp_path):
    from MedSAM2HITLLib.segment_writer import create_segmentation, get_or_create_segment, write_slice

    case = Case(tmp_path, seed=8, grid="oblique", axis=0)
    on_key = [o[case.key] for o in case.phantom.objects]  # phantom slices are [j, i]
    neighbour = next(o for o in on_key[1:] if o.any())
    # a hurried box that takes in the neighbouring object too
    j, i = np.nonzero(on_key[0] | neighbour)
    low = np.array([i.min(), j.min(), case.key], float)  # file voxels (i, j, k)
    high = np.array([i.max(), j.max(), case.key], float)
    roi = case.roi((low, high), name="Bad")
    segmentation, segment_id = logic.segment_slice(case.volume, roi, None, axis=case.view(), window="abdomen").wait(120)
    logic.propagate(case.volume, segmentation, segment_id, axis=case.view(), roi_node=roi, window="abdomen").wait(300)
    bad = dice(case.exported(segmentation, tmp_path), case.truth)

    corrected = create_segmentation(case.scene, case.volume)
    fixed = get_or_create_segment(corrected, "Corrected")
    # the user corrects the key slice; on this right-handed grid Slicer's array is the phantom's own [k, j, i]
    write_slice(corrected, fixed, case.volume, 0, case.key, case.phantom.mask[case.key])
    logic.propagate(case.volume, corrected, fixed, axis=case.view(), from_segment=True, key_index=case.key,
                    window="abdomen").wait(300)
    good = dice(case.exported(corrected, tmp_path), case.truth)
    assert good >= 0.9 and good >= bad + 0.2, (bad, good)  # measured: 0.01 → 0.97 through the Engine


def test_cancel_keeps_the_completed_slices_of_a_real_propagation(logic, tmp_path):
    from MedSAM2HITLLib.errors import PropagationCancelled

    case = Case(tmp_path, seed=3, grid="identity", axis=0)
    roi = case.roi()
    segmentation, segment_id = logic.segment_slice(case.volume, roi, None, axis="axial", window="abdomen").wait(120)
    seen = []

    def on_progress(done, total):
        seen.append(done)
        if done == 6:
            logic.cancel()

    request = logic.propagate(case.volume, segmentation, segment_id, axis="axial", roi_node=roi, window="abdomen",
                              on_progress=on_progress)
    with pytest.raises(PropagationCancelled) as cancelled:
        request.wait(120)
    completed = set(cancelled.value.completed)
    labels = case.exported(segmentation, tmp_path)
    present = set(np.flatnonzero(labels.any(axis=(0, 1))).tolist())
    assert present <= completed | {case.key}
    truth_on_completed = [k for k in completed if case.truth[..., k].any()]
    assert truth_on_completed and all(dice(labels[..., k], case.truth[..., k]) > 0.5 for k in truth_on_completed)
