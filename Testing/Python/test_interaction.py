"""Beyond one box: clicks, corrected slices that condition propagation, several objects, other axes.

Engine tests use the phantom-trained fixture (stages 2-5 of its recipe train exactly this) on phantoms it never
saw; the logic tests run the same through a worker on a headless MRML scene and check what the user keeps:
their slices exactly as drawn, which slices are theirs (saved with the segment, undone with it), one undo step.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import DATA, REPO, logic_with_model

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from evaluate_phantom_model import (  # noqa: E402
    axis_dice,
    click_dice,
    conditioning_dice,
    correction_slices,
    dice,
    held_out_phantom,
    inside_point,
    leak_removal,
    long_phantom,
    twisted_phantom,
)
from phantoms import make_phantom  # noqa: E402

from MedSAM2HITLLib.errors import BadInputError  # noqa: E402

pytestmark = pytest.mark.slow

CHECKPOINT = DATA / "phantom_sam2.pt"
CASES = 6  # of each held-out set; the first ones, not chosen


@pytest.fixture(scope="module")
def engine():
    from MedSAM2HITLLib.engine import Engine

    return Engine.load(CHECKPOINT, device="cpu", threads=2)


def test_a_positive_click_alone_gives_the_object(engine):
    """Measured: 11 of 12 at Dice ≥ 0.8 (one phantom 0.58), mean 0.919."""
    scores = np.array([click_dice(engine, held_out_phantom(s, i), f"click-{s}-{i}") for s in ("seeds", "unseen")
                       for i in range(CASES)])
    assert scores.mean() >= 0.9 and np.mean(scores >= 0.8) >= 0.9, np.round(scores, 3)


@pytest.mark.parametrize("object_click", [True, False], ids=["with the object's click", "alone"])
def test_a_negative_click_removes_a_leaked_neighbour(engine, object_click):
    """The mask covers the target and a whole neighbouring object; a negative click goes on the neighbour, with
    the object's positive click (as the panel sends every click of the object on the slice) or alone. Measured
    on these 8: with it, 88 % of the leak removed on average (6 cases all of it, the others 38 % and 69 %),
    target Dice ≥ 0.87; alone, 91 % (7 cases ≥ 80 %, the other 62 %), target Dice ≥ 0.71. Before stage 5 of
    the recipe: 48 % with the object's click, 8 % alone."""
    results = [r for r in (leak_removal(engine, held_out_phantom(s, i), f"leak-{s}-{i}", object_click)
                           for s in ("seeds", "unseen") for i in range(2 * CASES)) if r is not None]
    assert len(results) >= 6
    removed, kept = np.array(results).T
    assert removed.mean() >= 0.8 and np.mean(removed >= 0.8) >= 0.6, np.round(removed, 3)
    assert kept.min() >= (0.8 if object_click else 0.6), np.round(kept, 3)


def test_two_corrected_slices_beat_one_and_come_back_exactly(engine):
    """Thick-slice bars that turn and drift fast, so the shape changes much along the axis: the key's box, then
    slices corrected 70 % of the way to each end as further conditioning slices. Measured on these six: 3D Dice
    0.848 → 0.888 → 0.943 with 0, 1 and 2 corrected slices; with every user slice in each slice's memory, as
    sam2 runs it, 0.848 → 0.866 → 0.913 (with the stage-4 model on 8 of them 0.814 → 0.799 → 0.842: a
    correction on one side pulled the other side off)."""
    runs = {n: [conditioning_dice(engine, twisted_phantom(i), f"twisted-{i}", n) for i in range(CASES)]
            for n in (0, 1, 2)}
    means = {n: np.mean([d for d, _ in runs[n]]) for n in runs}
    assert all(exact for n in (1, 2) for _, exact in runs[n])
    assert means[1] >= means[0] and means[2] >= means[1] + 0.02, means


def test_several_objects_in_one_pass_equal_one_by_one(engine):
    phantom = make_phantom(2_000_002, size=(48, 112, 112), modality="ct", distractors=3)
    engine.set_volume(phantom.volume, "objects")
    prompts = []
    for obj in phantom.objects:
        key = int(np.argmax(obj.sum(axis=(1, 2))))
        prompts.append({key: phantom.box(key, obj)})
    together = np.zeros((len(prompts), *phantom.volume.shape), dtype=bool)
    for item in engine.propagate_objects(0, prompts, window=phantom.window):
        together[item.object, item.index] = item.mask
    for n, slices in enumerate(prompts):
        (key, box), = slices.items()
        alone = np.zeros(phantom.volume.shape, dtype=bool)
        for item in engine.propagate(0, key, box, window=phantom.window):
            alone[item.index] = item.mask
        assert dice(together[n], alone) >= 0.98
        assert dice(together[n], phantom.objects[n]) >= 0.75


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_elongated_tubular_and_thick_slice_objects_along_each_axis(engine, axis):
    """Bars (1:2 to 1:5), tubes through most slices and 3x-thick-slice volumes, propagated along `axis`.
    Measured on these six: mean 3D Dice 0.92, 0.78 and 0.77 along array axes 0, 1 and 2 (the weakest case 0.74,
    0.57 and 0.27: the bound holds on the mean only)."""
    scores = [axis_dice(engine, long_phantom(i), axis, f"long-{i}-{axis}") for i in range(CASES)]
    assert np.mean(scores) >= 0.75, np.round(scores, 3)


@pytest.mark.parametrize("points, message", [
    ([(500, 10, 1)], "outside the slice"),
    ([(10, 10, 2)], "label must be"),
    ([(10, 10, 0)], "at least one positive click"),
    ([(float("nan"), 10, 1)], "finite"),
    ([(10, 10)], "needs x, y and a label"),
])
def test_bad_clicks_are_refused_with_what_to_do(engine, points, message):
    engine.set_volume(np.zeros((4, 32, 32), np.int16), "clicks")
    with pytest.raises(BadInputError, match=message):
        engine.segment_slice(0, 1, None, "abdomen", points=points)


# ---- the logic on a scene, through a worker ----

SPACING = 1.5


@pytest.fixture(scope="module")
def logic():
    yield from logic_with_model(CHECKPOINT)


@pytest.fixture
def phantom_scene():
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array, create_scene

    phantom = held_out_phantom("unseen", 1)
    scene = create_scene()
    ijk_to_ras = np.diag([SPACING, SPACING, SPACING, 1.0])
    volume = add_volume_from_array(scene, phantom.volume, ijk_to_ras, "phantom")
    return scene, volume, phantom


def ras(k: float, j: float, i: float) -> list[float]:
    return [i * SPACING, j * SPACING, k * SPACING]


def add_roi(scene, phantom, key: int, obj: np.ndarray, name: str):
    x0, y0, x1, y1 = phantom.box(key, obj)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetCenter(*ras(key, (y0 + y1) / 2, (x0 + x1) / 2))
    roi.SetSize((x1 - x0 + 1) * SPACING, (y1 - y0 + 1) * SPACING, SPACING)
    return roi


def segment_array(segmentation, segment_id, volume) -> np.ndarray:
    from MedSAM2HITLLib.segment_writer import read_segment

    return read_segment(segmentation, segment_id, volume)


def test_clicks_segment_a_slice_and_correct_it(logic, phantom_scene):
    from MedSAM2HITLLib.point_prompts import add_point

    scene, volume, phantom = phantom_scene
    key = phantom.key_index
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Tumour")
    x, y = inside_point(phantom.mask[key])
    add_point(points, ras(key, y, x), positive=True)
    segmentation, segment_id = logic.segment_slice(volume, None, None, points_node=points, window="mr").wait(120)
    first = segment_array(segmentation, segment_id, volume)
    assert np.flatnonzero(first.any(axis=(1, 2))).tolist() == [key]
    assert dice(first[key], phantom.mask[key]) >= 0.8
    assert logic.slice_sources(segmentation, segment_id).user_slices(0) == [key]

    leaked = first[key] & ~phantom.mask[key]
    if leaked.sum() > 5:  # a negative click where the mask leaked
        x, y = inside_point(leaked)
    else:  # a negative click just outside the object: the mask must not grow there
        from scipy.ndimage import binary_dilation

        ring = binary_dilation(phantom.mask[key], iterations=4) & ~binary_dilation(phantom.mask[key], iterations=2)
        y, x = np.argwhere(ring)[0]
    add_point(points, ras(key, y, x), positive=False)
    logic.segment_slice(volume, None, segmentation, segment_id, points_node=points, window="mr").wait(120)
    second = segment_array(segmentation, segment_id, volume)
    assert not second[key, y, x] and (second[key] & leaked).sum() <= (first[key] & leaked).sum()
    assert dice(second[key], phantom.mask[key]) >= 0.8
    assert logic.undo(segmentation)  # one action each
    assert np.array_equal(segment_array(segmentation, segment_id, volume), first)
    assert logic.undo(segmentation)
    assert not segment_array(segmentation, segment_id, volume).any()


def test_a_correction_re_runs_only_between_the_neighbouring_user_slices(logic, phantom_scene):
    """Box at the key slice, propagate; correct slice c above it: only the slices between the key (the user's
    slice below c) and the end of the segment change; c comes back exactly as drawn; one undo restores."""
    scene, volume, phantom = phantom_scene
    key = phantom.key_index
    roi = add_roi(scene, phantom, key, phantom.mask, "Target")
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="mr").wait(120)
    logic.propagate(volume, segmentation, segment_id, roi_node=roi, window="mr").wait(300)
    sources = logic.slice_sources(segmentation, segment_id)
    assert sources.user_slices(0) == [key] and key not in sources.predicted_slices(0)
    before = segment_array(segmentation, segment_id, volume)

    corrected = correction_slices(phantom, 1)[0]
    from MedSAM2HITLLib.segment_writer import write_slice

    logic.history(segmentation).save_state()  # the user's paint stroke, as the Segment Editor saves it
    write_slice(segmentation, segment_id, volume, 0, corrected, phantom.mask[corrected])
    written = logic.propagate(volume, segmentation, segment_id, from_segment=True, key_index=corrected,
                              window="mr").wait(300)
    lower, upper = sorted((key, corrected))
    assert written and set(written) <= set(range(lower, phantom.volume.shape[0])) - {key, corrected}
    after = segment_array(segmentation, segment_id, volume)
    untouched = [i for i in range(phantom.volume.shape[0]) if i not in written and i != corrected]
    assert np.array_equal(after[untouched], before[untouched])
    assert np.array_equal(after[corrected], phantom.mask[corrected])
    assert logic.slice_sources(segmentation, segment_id).user_slices(0) == sorted({key, corrected})
    assert dice(after, phantom.mask) >= dice(before, phantom.mask) - 0.01

    assert logic.undo(segmentation)  # the re-propagation, its record of slices included
    assert logic.slice_sources(segmentation, segment_id).user_slices(0) == [key]


def test_which_slices_are_whose_is_saved_with_the_segmentation(logic, phantom_scene, tmp_path):
    from MedSAM2HITLLib import slice_sources
    from MedSAM2HITLLib.export import export_seg_nrrd

    scene, volume, phantom = phantom_scene
    key = phantom.key_index
    roi = add_roi(scene, phantom, key, phantom.mask, "Target")
    segmentation, segment_id = logic.segment_slice(volume, roi, None, window="mr").wait(120)
    logic.propagate(volume, segmentation, segment_id, roi_node=roi, start=key - 5, end=key + 5,
                    window="mr").wait(300)
    expected = logic.slice_sources(segmentation, segment_id)
    assert expected.describe(0) == f"yours: {key} · predicted: {key - 5}–{key - 1}, {key + 1}–{key + 5}"
    path = export_seg_nrrd(segmentation, tmp_path / "saved.seg.nrrd")

    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    loaded_id = loaded.GetSegmentation().GetNthSegmentID(0)
    assert slice_sources.read(loaded, loaded_id) == expected


def test_several_rois_fill_their_own_segments_in_one_pass_without_overlap(logic, phantom_scene):
    from MedSAM2HITLLib.segment_writer import create_segmentation

    scene, volume, phantom = phantom_scene
    segmentation = create_segmentation(scene, volume)
    rois = []
    for n, obj in enumerate(phantom.objects[:3]):
        rois.append((add_roi(scene, phantom, int(np.argmax(obj.sum(axis=(1, 2)))), obj, f"Object {n + 1}"), None))
    written = logic.propagate_objects(volume, segmentation, rois, window="mr").wait(600)
    assert len(written) == len(rois)
    masks = [segment_array(segmentation, segment_id, volume) for segment_id in written]
    assert (np.sum(masks, axis=0) <= 1).all()
    for mask, obj in zip(masks, phantom.objects):
        assert dice(mask, obj) >= 0.75
    assert logic.undo(segmentation)
    assert not any(segment_array(segmentation, segment_id, volume).any() for segment_id in written)


# ---- the CLI ----


def test_cli_clicks_alone_and_several_boxes_in_one_pass(tmp_path):
    """--point-ras: the click's slice, then propagated from it; two --box-ras: two labels from one pass."""
    import nibabel as nib

    from test_cli import AFFINE, cli, ras_of

    phantom = make_phantom(2_000_002, size=(40, 80, 96), modality="ct", distractors=3)
    path, labelmap = tmp_path / "phantom.nii.gz", tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(phantom.volume.transpose(2, 1, 0), AFFINE), path)  # [k, j, i] → file (i, j, k)
    truths = [o.transpose(2, 1, 0) for o in phantom.objects]
    common = ["--window", "abdomen", "--checkpoint", str(CHECKPOINT), "--device", "cpu", "--threads", "2",
              "-o", str(tmp_path / "out.seg.nrrd"), "--labelmap", str(labelmap)]
    key = phantom.key_index
    x, y = inside_point(phantom.mask[key])
    click = [f"{v:.3f}" for v in ras_of((x, y, key))]

    result = cli("segment", str(path), "--point-ras", *click, "+", *common)
    assert result.returncode == 0, result.stderr
    labels = np.asarray(nib.load(labelmap).dataobj)
    assert np.flatnonzero(labels.any(axis=(0, 1))).tolist() == [key]
    assert dice(labels[..., key] > 0, truths[0][..., key]) >= 0.8

    result = cli("segment", str(path), "--point-ras", *click, "+", "--propagate", *common)
    assert result.returncode == 0, result.stderr
    assert dice(np.asarray(nib.load(labelmap).dataobj) > 0, truths[0]) >= 0.75

    boxes = []
    for obj in phantom.objects[:2]:
        k = int(np.argmax(obj.sum(axis=(1, 2))))
        x0, y0, x1, y1 = phantom.box(k, obj)
        boxes += ["--box-ras", *(f"{v:.3f}" for v in (*ras_of((x0 - 1, y0 - 1, k)), *ras_of((x1 + 1, y1 + 1, k))))]
    result = cli("segment", str(path), *boxes, "--propagate", *common)
    assert result.returncode == 0, result.stderr
    labels = np.asarray(nib.load(labelmap).dataobj)
    for label, truth in zip((1, 2), truths):
        assert dice(labels == label, truth) >= 0.75

    result = cli("segment", str(path), "--point-ras", *click, "x", *common)
    assert result.returncode == 2 and "ends with + (inside the object) or -" in result.stderr
    result = cli("segment", str(path), *common)
    assert result.returncode == 2 and "give a box (--box-ras or --roi) or clicks (--point-ras)" in result.stderr
