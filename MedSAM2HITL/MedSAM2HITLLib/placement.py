"""Placing a box ROI with clicks in a slice view: the clicks must land in this ROI, not in a new point list.

`vtkSlicerMarkupsLogic.StartPlaceMode` sets the selection node's place class to point lists, so after
`SetActiveList(roi)` the next click starts a new point list and the ROI stays empty. Slicer's place widget
instead names the ROI's class and the ROI itself in the selection node, then puts the interaction node in place
mode; this does the same on the MRML nodes alone, so it is tested without a GUI.
"""

from __future__ import annotations

SELECTION_NODE_ID = "vtkMRMLSelectionNodeSingleton"
INTERACTION_NODE_ID = "vtkMRMLInteractionNodeSingleton"


def start_roi_placement(roi) -> None:
    """Make `roi` the node that the next clicks in a view define (two clicks: opposite corners)."""
    scene = roi.GetScene()
    selection = scene.GetNodeByID(SELECTION_NODE_ID) if scene else None
    interaction = scene.GetNodeByID(INTERACTION_NODE_ID) if scene else None
    if selection is None or interaction is None:
        raise RuntimeError("the scene has no selection or interaction node: add the ROI to Slicer's scene first")
    selection.SetReferenceActivePlaceNodeClassName(roi.GetClassName())
    selection.SetReferenceActivePlaceNodeID(roi.GetID())
    interaction.SetPlaceModePersistence(0)  # back to view mode once the ROI is defined
    interaction.SetCurrentInteractionMode(interaction.Place)
