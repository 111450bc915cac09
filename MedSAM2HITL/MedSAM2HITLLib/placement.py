"""Placing a markup with clicks in a slice view (a box ROI, or a click in an object's point list): the clicks
must land in this node, not in a new point list.

`vtkSlicerMarkupsLogic.StartPlaceMode` sets the selection node's place class to point lists, so after
`SetActiveList(roi)` the next click starts a new point list and the ROI stays empty. Slicer's place widget
instead names the ROI's class and the ROI itself in the selection node, then puts the interaction node in place
mode; this does the same on the MRML nodes alone, so it is tested without a GUI.
"""

from __future__ import annotations

SELECTION_NODE_ID = "vtkMRMLSelectionNodeSingleton"
INTERACTION_NODE_ID = "vtkMRMLInteractionNodeSingleton"


def start_placement(node) -> None:
    """Make `node` the one the next clicks in a view define (an ROI: two clicks, opposite corners; a point list:
    one click, one point)."""
    scene = node.GetScene()
    selection = scene.GetNodeByID(SELECTION_NODE_ID) if scene else None
    interaction = scene.GetNodeByID(INTERACTION_NODE_ID) if scene else None
    if selection is None or interaction is None:
        raise RuntimeError("the scene has no selection or interaction node: add the markup to Slicer's scene first")
    selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
    selection.SetReferenceActivePlaceNodeID(node.GetID())
    interaction.SetPlaceModePersistence(0)  # back to view mode once the ROI or the point is placed
    interaction.SetCurrentInteractionMode(interaction.Place)
