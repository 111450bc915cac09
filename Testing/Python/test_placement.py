"""Place ROI and clicks: after placement starts, Slicer's selection node names the node's class and the node itself
(an ROI, or the object's point list), in single place mode (headless MRML)."""

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture
def scene():
    from MedSAM2HITLLib.mrml_scene import create_scene

    return create_scene()


def roi_in(scene, name="R", kind="vtkMRMLMarkupsROINode"):
    roi = scene.AddNewNodeByClass(kind, name)
    roi.CreateDefaultDisplayNodes()
    return roi


@pytest.mark.parametrize("kind", ["vtkMRMLMarkupsROINode", "vtkMRMLMarkupsFiducialNode"])
def test_placement_targets_this_node_in_single_place_mode(scene, kind):
    from MedSAM2HITLLib.placement import INTERACTION_NODE_ID, SELECTION_NODE_ID, start_placement

    roi_in(scene, "earlier", kind)
    roi = roi_in(scene, kind=kind)
    start_placement(roi)
    selection, interaction = scene.GetNodeByID(SELECTION_NODE_ID), scene.GetNodeByID(INTERACTION_NODE_ID)
    assert selection.GetActivePlaceNodeClassName() == kind
    assert selection.GetActivePlaceNodeID() == roi.GetID()
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert interaction.GetPlaceModePersistence() == 0


def test_the_markups_logic_route_would_have_placed_a_point_list(scene):
    """Why the module does not call StartPlaceMode: it switches the place class to point lists."""
    import slicer

    from MedSAM2HITLLib.placement import SELECTION_NODE_ID

    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    roi = roi_in(scene)
    logic.SetActiveList(roi)
    logic.StartPlaceMode(False)
    assert scene.GetNodeByID(SELECTION_NODE_ID).GetActivePlaceNodeClassName() != "vtkMRMLMarkupsROINode"


def test_an_roi_outside_a_scene_gets_a_clear_message():
    import slicer

    from MedSAM2HITLLib.placement import start_placement

    with pytest.raises(RuntimeError, match="add the markup to Slicer's scene"):
        start_placement(slicer.vtkMRMLMarkupsROINode())
