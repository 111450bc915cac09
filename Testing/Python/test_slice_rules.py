"""The one module of slice, key-slice and range rules: each rule refuses what it must with its one message, and the
logic, engine and service say that same message."""

import numpy as np
import pytest

from MedSAM2HITLLib import slice_rules
from MedSAM2HITLLib.errors import BadInputError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("axis, axes, shape", [(0, (1, 2), (4, 5)), (1, (0, 2), (3, 5)), (2, (0, 1), (3, 4))])
def test_a_slice_has_the_other_two_axes_in_order(axis, axes, shape):
    assert slice_rules.slice_axes(axis) == axes
    assert slice_rules.slice_shape((3, 4, 5), axis) == shape
    assert np.take(np.zeros((3, 4, 5)), 0, axis=axis).shape == shape  # what numpy's slice of the volume has


def test_a_slice_outside_the_volume_is_refused_with_where_it_was_looked_for():
    slice_rules.check_slice(0, 5, "array axis 0")
    slice_rules.check_slice(4, 5, "array axis 0")
    with pytest.raises(BadInputError, match=r"^slice 5 is outside the volume: the axial view has slices 0\.\.4$"):
        slice_rules.check_slice(5, 5, "the axial view")
    with pytest.raises(BadInputError, match=r"^conditioning slice -1 is outside the volume: this view has slices"):
        slice_rules.check_slice(-1, 5, "this view", "conditioning slice")


def test_a_mask_of_another_shape_is_refused_naming_both_shapes():
    slice_rules.check_mask_shape((4, 5), [4, 5])
    with pytest.raises(BadInputError, match=r"^the mask prompt has shape \[5, 4\], the slice has \[4, 5\]$"):
        slice_rules.check_mask_shape((5, 4), (4, 5), "the mask prompt")


def test_a_missing_end_is_the_volumes_end_on_that_side():
    assert slice_rules.slice_range(None, None, 10) == (0, 9)
    assert slice_rules.slice_range(3, None, 10) == (3, 9)
    assert slice_rules.slice_range(None, 4, 10) == (0, 4)


@pytest.mark.parametrize("start, end, prompted, message", [
    (2, 7, [8], r"slice range 2\.\.7 must lie within slices 0\.\.9 and contain the key slice 8$"),
    (None, 10, [5], r"slice range 0\.\.10 must lie within slices 0\.\.9 and contain the key slice 5$"),
    (-1, 5, [], r"slice range -1\.\.5 must lie within slices 0\.\.9$"),
    (6, 4, [], r"slice range 6\.\.4 must lie within"),
    (3, 6, [7, 4, 4], r"and contain the prompted slices 4, 7$"),
])
def test_a_range_outside_the_volume_or_without_a_prompted_slice_is_refused(start, end, prompted, message):
    with pytest.raises(BadInputError, match=message):
        slice_rules.check_range(start, end, 10, prompted)


def test_a_range_in_the_volume_with_every_prompted_slice_is_resolved():
    assert slice_rules.check_range(None, None, 10, [0, 9]) == (0, 9)
    assert slice_rules.check_range(4, 4, 10, (i for i in [4])) == (4, 4)


def test_a_named_range_is_the_volume_the_rois_extent_or_the_given_ends():
    assert slice_rules.resolve_range("whole", 10) == (0, 9)
    assert slice_rules.resolve_range("box", 10, extent=(2, 6), start=0, end=9) == (2, 6)
    assert slice_rules.resolve_range("custom", 10, extent=(2, 6), start=1, end=3) == (1, 3)
    with pytest.raises(BadInputError, match="range 'box' needs a box as an ROI"):
        slice_rules.resolve_range("box", 10)
    with pytest.raises(BadInputError, match="range 'custom' needs 'start' and 'end'"):
        slice_rules.resolve_range("custom", 10, start=2)
    with pytest.raises(BadInputError, match="range must be one of whole, box, custom, got 'all'"):
        slice_rules.resolve_range("all", 10)


def test_slices_prompted_with_a_mask_are_the_users_and_boxes_are_not():
    mask = np.ones((4, 5), bool)
    assert slice_rules.user_slices({3: (0, 0, 2, 2), 5: mask, 8: np.zeros((4, 5), bool)}) == {5, 8}
    assert slice_rules.user_slices({3: [0, 0, 2, 2]}) == set()


def test_a_completed_slice_is_listed_once_in_arrival_order():
    completed: list[int] = []
    for index in (5, 6, 4, 6, 5, 3):
        slice_rules.note_completed(completed, index)
    assert completed == [5, 6, 4, 3]


def test_the_service_apis_early_check_says_the_one_range_message():
    """The API refuses a custom range with the message the logic and the engine give (before the worker sees it)."""
    from medsam2hitl_server.schemas import Propagate, check_against_volume

    geometry = {"shape_kji": [10, 4, 5], "views": {"axial": {"array_axis": 0, "slices": 10}}}
    body = Propagate.model_validate({"view": "axial", "slice": 8, "box": [0, 0, 2, 2], "range": "custom",
                                     "start": 2, "end": 7})
    with pytest.raises(BadInputError) as refused:
        check_against_volume(body, geometry)
    assert str(refused.value) == "slice range 2..7 must lie within slices 0..9 and contain the key slice 8"
    wrong_mask = Propagate.model_validate({"view": "axial", "slice": 3, "mask": {"shape": [5, 4], "counts": [20]}})
    with pytest.raises(BadInputError, match=r"^the mask has shape \[5, 4\], the slice has \[4, 5\]$"):
        check_against_volume(wrong_mask, geometry)
