"""MRML scene access that works both inside 3D Slicer and headless on the PyPI `slicer-core` wheel.

Inside Slicer the application already owns `slicer.mrmlScene` and the module logics; headless (CLI, tests)
`create_scene` builds the same setup: an application logic with colour nodes and the Volumes, Segmentations,
Markups, SubjectHierarchy and Data logics registered, and publishes it as `slicer.mrmlScene` /
`slicer.modules.<name>.logic()` so `slicer.util` array helpers work. The Data logic matters: without it every
temporary labelmap that `slicer.util` creates leaks its display node.

The loaders only need a scene, so they run on either.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError
from .volume_file import VOLUME_SUFFIXES, check_volume_file

ROI_SUFFIX = ".mrk.json"
DICOM_TILT_ATTRIBUTE = "MedSAM2HITL.DicomTiltDegrees"  # how far a DICOM series leaned off its normal before resampling

_HEADLESS: dict[str, Any] = {}


def _slicer():
    """Import Slicer's Python package lazily: importing this module must stay cheap."""
    import slicer

    return slicer


def running_in_slicer() -> bool:
    """True inside the Slicer application (it has a Qt `slicer.app`), False on the headless wheel."""
    return hasattr(_slicer(), "app")


def create_scene():
    """Return a scene ready for volumes, segmentations and markups.

    Inside Slicer this is `slicer.mrmlScene`. Headless it is a new `vtkMRMLScene` with the module logics
    registered; it replaces any previous headless scene as `slicer.mrmlScene`.
    """
    slicer = _slicer()
    if running_in_slicer():
        return slicer.mrmlScene
    import vtk

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)

    # The colour logic looks for colour files of an installed Slicer and logs an error when there are none;
    # the built-in colour tables it adds are all that volumes and segmentations need.
    colors = slicer.vtkSlicerColorLogic()
    warnings_were_on = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        colors.SetMRMLApplicationLogic(app_logic)
        colors.SetMRMLScene(scene)
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(warnings_were_on)
    app_logic.SetColorLogic(colors)
    app_logic.SetModuleLogic("Colors", colors)

    logics: dict[str, Any] = {"colors": colors}
    for module, key, factory in (
        ("volumes", "Volumes", slicer.vtkSlicerVolumesLogic),
        ("segmentations", "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("markups", "Markups", slicer.vtkSlicerMarkupsLogic),
        ("subjecthierarchy", "SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("data", "Data", slicer.vtkSlicerDataModuleLogic),
    ):
        logic = factory()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(key, logic)
        logics[module] = logic

    _HEADLESS.clear()
    _HEADLESS.update(application=app_logic, **logics)  # keeps the logics alive while the scene is current
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{name: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()}
    )
    return scene


def add_volume_from_array(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "Volume"):
    """Add a scalar volume node holding a copy of `array` ([k, j, i] order) with the given 4x4 IJK→RAS."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise BadInputError(f"volume '{name}' has {array.ndim} dimensions; a single 3D scalar volume is needed")
    if array.dtype.kind not in "iuf" or array.dtype == np.float16:  # VTK has no bool, float16 or complex scalars
        raise BadInputError(f"volume '{name}' holds {array.dtype} values, which VTK cannot store; convert it "
                            "first (e.g. array.astype(numpy.uint8) for masks, numpy.float32 for float16)")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras))
    _add_default_display(scene, node)
    return node


def load_volume(scene, path: str | Path, name: str | None = None, max_bytes: int | None = None,
                series_uid: str | None = None, regularize: bool = True):
    """Read a NIfTI/NRRD/MetaImage file, a DICOM series folder or a DICOM file into a new scalar volume node.

    Every reader follows one geometry rule: NIfTI (1 and 2) through nibabel with the sform, else the qform, else
    pixdim (`nifti_volume`); DICOM from its tags, checked and sorted along the slice normal, tilted series resampled
    unless `regularize` is False (`dicom_series`); NRRD and MetaImage through Slicer's own reader. All are checked
    first: a header that claims more than `max_bytes` (default `max_volume_bytes()`) or than free memory, truncated
    data or a broken series are refused before anything is allocated. A file's node keeps a storage node naming the
    file, so `export` can write results back on the file's own grid; a DICOM node keeps its series' tilt (degrees,
    0 when none) in the attribute DICOM_TILT_ATTRIBUTE, for `info`.
    """
    from .dicom_series import is_dicom_path, read_dicom
    from .nifti_volume import is_nifti, read_nifti

    path = Path(path)
    if not path.exists():
        raise BadInputError(f"volume '{path}' does not exist; check the path")
    if is_dicom_path(path):
        dicom = read_dicom(path, series_uid, max_bytes, regularize)
        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        node = add_volume_from_array(scene, dicom.voxels, lps_to_ras @ dicom.ijk_to_lps, name or _stem(path))
        node.SetAttribute(DICOM_TILT_ATTRIBUTE, repr(dicom.tilt_degrees))
        return node
    if series_uid is not None:
        raise BadInputError(f"'{path.name}' is a file, not a DICOM folder: a series UID (--series) applies only to "
                            "DICOM folders; leave it out")
    check_volume_file(path, max_bytes)
    if is_nifti(path):
        nifti = read_nifti(path)
        node = add_volume_from_array(scene, nifti.voxels, nifti.ijk_to_ras, name or _stem(path))
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        node.SetAndObserveStorageNodeID(storage.GetID())
        return node
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or _stem(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise BadInputError(
            f"could not read volume '{path.name}': its header is valid but Slicer's reader failed on its data "
            "(truncated or corrupt, or the data file of a .mhd/.nhdr is missing); copy or export the file again"
        )
    _add_default_display(scene, node)
    return node


def load_roi(scene, path: str | Path):
    """Read a Slicer markups ROI file (.mrk.json, as saved by Slicer) into a new ROI node."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ROI file '{path}' does not exist; check the path")
    try:
        markups = json.loads(path.read_text(encoding="utf-8")).get("markups", [])
    except (ValueError, UnicodeDecodeError, AttributeError) as error:
        raise BadInputError(f"ROI file '{path.name}' is not a markups JSON file ({error})") from error
    types_in_file = [m.get("type") for m in markups if isinstance(m, dict)]
    if types_in_file != ["ROI"]:
        raise BadInputError(
            f"ROI file '{path.name}' must hold exactly one ROI markup, found {types_in_file or 'none'}; "
            "save a single ROI from Slicer's Markups module (File > Save, .mrk.json)"
        )
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", _stem(path))
    storage = scene.AddNewNodeByClass("vtkMRMLMarkupsROIJsonStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise BadInputError(f"could not read ROI file '{path.name}'; re-save it from Slicer's Markups module")
    return node


def _add_default_display(scene, volume_node) -> None:
    """Give a volume node a grey display node, as Slicer's loaders do, so it can be shown and saved."""
    if volume_node.GetDisplayNode() is not None:
        return
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOn()
    volume_node.SetAndObserveDisplayNodeID(display.GetID())


def _vtk_matrix(matrix: np.ndarray):
    import vtk

    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise BadInputError(f"expected a 4x4 matrix, got shape {matrix.shape}")
    result = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            result.SetElement(row, column, matrix[row, column])
    return result


def _stem(path: Path) -> str:
    """File name without its (possibly double) extension: 'ct.nii.gz' → 'ct', 'box.mrk.json' → 'box'."""
    name = path.name
    for suffix in (*VOLUME_SUFFIXES, ROI_SUFFIX, ".json", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
