"""Place ROI: after placement starts, Slicer's selection node names the ROI class and this ROI (headless MRML)."""

import pytest


@pytest.fixture
def scene():
    from MedSAM2HITLLib.mrml_scene import create_scene

    return create_scene()


def roi_in(scene, name="R"):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.CreateDefaultDisplayNodes()
    return roi


def test_placement_targets_this_roi_in_single_place_mode(scene):
    from MedSAM2HITLLib.roi_placement import INTERACTION_NODE_ID, SELECTION_NODE_ID, start_roi_placement

    roi_in(scene, "earlier")
    roi = roi_in(scene)
    start_roi_placement(roi)
    selection, interaction = scene.GetNodeByID(SELECTION_NODE_ID), scene.GetNodeByID(INTERACTION_NODE_ID)
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsROINode"
    assert selection.GetActivePlaceNodeID() == roi.GetID()
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert interaction.GetPlaceModePersistence() == 0


def test_the_markups_logic_route_would_have_placed_a_point_list(scene):
    """Why the module does not call StartPlaceMode: it switches the place class to point lists."""
    import slicer

    from MedSAM2HITLLib.roi_placement import SELECTION_NODE_ID

    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    roi = roi_in(scene)
    logic.SetActiveList(roi)
    logic.StartPlaceMode(False)
    assert scene.GetNodeByID(SELECTION_NODE_ID).GetActivePlaceNodeClassName() != "vtkMRMLMarkupsROINode"


def test_an_roi_outside_a_scene_gets_a_clear_message():
    import slicer

    from MedSAM2HITLLib.roi_placement import start_roi_placement

    with pytest.raises(RuntimeError, match="add the ROI to Slicer's scene"):
        start_roi_placement(slicer.vtkMRMLMarkupsROINode())
