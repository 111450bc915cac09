"""A DICOM series, or one multi-frame file (enhanced CT/MR, RT dose), as one 3D volume with checked geometry.

The geometry comes from the tags, never from file names or defaults: the slice normal is the cross product of
ImageOrientationPatient's row and column directions, each slice's ImagePositionPatient is projected on it, the
slices are sorted by that projection and must be evenly spaced. Positions that drift off the normal (gantry tilt,
or any shear) are resampled onto an orthogonal grid, as Slicer's DICOM reader regularizes them, or refused when the
caller switches that off. Enhanced files take their geometry from the per-frame and shared functional groups.
Headers are read with pydicom; pixels are decoded by GDCM (SimpleITK), which knows every transfer syntax, and by
pydicom where GDCM gives up.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .volume_file import check_size, volume_header

SPACING_TOLERANCE_MM = 0.01  # what Slicer's DICOM scalar volume plugin tolerates
ORIENTATION_TOLERANCE = 1e-3  # direction cosines of two slices of one stack
_REDO = "copy or export it again"
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomVolume:
    voxels: np.ndarray  # [k, j, i]: k along the slice normal, j down the rows, i along a row
    ijk_to_lps: np.ndarray  # 4x4, DICOM's patient coordinates (LPS mm)
    tilt_degrees: float  # how far the slice positions leaned off the normal before resampling (0: not resampled)

    def sitk_image(self):
        """The volume as a SimpleITK image (LPS), for writing it to a single file (the service's DICOM jobs)."""
        import SimpleITK as sitk

        axes = self.ijk_to_lps[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        image = sitk.GetImageFromArray(self.voxels)
        image.SetSpacing([float(s) for s in spacing])
        image.SetDirection([float(v) for v in (axes / spacing).ravel()])
        image.SetOrigin([float(v) for v in self.ijk_to_lps[:3, 3]])
        return image


@dataclass(frozen=True)
class _Plane:
    """One 2D image of the stack: a file, or a frame of a multi-frame file."""

    path: Path
    frame: int  # 0 for a single-frame file
    position: np.ndarray  # LPS mm of the first pixel's centre
    row: np.ndarray  # direction along a row (increasing column index)
    column: np.ndarray  # direction down a column (increasing row index)
    spacing: tuple[float, float]  # mm between columns, between rows

    def label(self, multiframe: bool) -> str:
        return f"frame {self.frame + 1} of '{self.path.name}'" if multiframe else f"'{self.path.name}'"


def is_dicom_path(path: Path) -> bool:
    """A folder (of DICOM files) or a single .dcm file."""
    return path.is_dir() or path.name.lower().endswith(".dcm")


def read_dicom(path: str | Path, series_uid: str | None = None, max_bytes: int | None = None,
               regularize: bool = True) -> DicomVolume:
    """The series `series_uid` (needed when there are several) of a folder or a .dcm file, checked and decoded.

    Refuses (BadInputError, naming the files) a folder without DICOM images, a truncated or corrupt file, images
    without patient geometry, two slices at one position, a missing slice, uneven spacing, slices of different
    orientations, and a volume over `max_bytes` or free memory (before decoding). Tilted slices are resampled
    (one log line names the tilt) unless `regularize` is False, which refuses them.
    """
    path = Path(path)
    series = _series_in(path)
    where = f"folder '{path}'" if path.is_dir() else f"'{path.name}'"
    if not series:
        raise BadInputError(f"{where} contains no DICOM series; point to a folder of the .dcm files of a CT, MR or "
                            "PET series")
    if series_uid is None and len(series) == 1:
        series_uid = next(iter(series))
    if series_uid not in series:
        problem = "holds several DICOM series" if series_uid is None else f"has no DICOM series {series_uid}"
        listing = "; ".join(_describe(uid, datasets) for uid, datasets in series.items())
        raise BadInputError(f"{where} {problem}: {listing}; choose one by its UID (--series UID)")
    what = f"DICOM series {series_uid}"
    datasets = series[series_uid]
    multiframe = len(datasets) == 1 and _frame_count(datasets[0][1]) > 1
    if not multiframe and any(_frame_count(ds) > 1 for _, ds in datasets):
        raise BadInputError(f"{what} mixes multi-frame files with other files; load each multi-frame file alone")
    planes = _frame_planes(*datasets[0]) if multiframe else [_file_plane(file, ds) for file, ds in datasets]
    order, slice_spacing, offsets = _stack(planes, multiframe, datasets[0][1])
    first = datasets[0][1]
    shape = (int(first.Columns), int(first.Rows), len(planes))
    check_size(volume_header(shape, _decoded_dtype(first), 1, what), max_bytes, what)
    voxels = _decode_planes([planes[n] for n in order], datasets, multiframe)
    first_plane = planes[order[0]]
    pixels = offsets[order] / np.array(first_plane.spacing)  # in-plane drift, in columns and rows
    tilt, origin = 0.0, first_plane.position
    if np.abs(offsets).max(initial=0.0) > SPACING_TOLERANCE_MM:
        tilt = _tilt_degrees(offsets[order], slice_spacing)
        if not regularize:
            raise BadInputError(f"{what} is tilted by {tilt:.1f} degrees (gantry tilt, or slice positions sheared off "
                                "the slice normal) and resampling is off (--no-regularize); leave that out to "
                                "resample it onto an orthogonal grid")
        voxels, low = _regularize(voxels, pixels)
        origin = origin + low[0] * first_plane.spacing[0] * first_plane.row \
            + low[1] * first_plane.spacing[1] * first_plane.column
        _LOG.warning("warning: the DICOM series is tilted by %.1f degrees (gantry tilt or sheared slice positions): "
                     "resampled onto an orthogonal grid that holds every slice, as Slicer's DICOM reader does "
                     "(--no-regularize refuses it instead)", tilt)
    normal = np.cross(first_plane.row, first_plane.column)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.column_stack([first_plane.row * first_plane.spacing[0],
                                          first_plane.column * first_plane.spacing[1], normal * slice_spacing])
    ijk_to_lps[:3, 3] = origin
    return DicomVolume(voxels, ijk_to_lps, tilt)


def _series_in(path: Path) -> dict[str, list[tuple[Path, object]]]:
    """{series UID: [(file, header)]} of the DICOM images in a folder (not its subfolders) or of one file.

    Files that are not DICOM, and DICOM objects without pixels (reports, DICOMDIR), are passed over; a DICOM file
    whose header cannot be read is refused.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
        else [path]
    series: dict[str, list[tuple[Path, object]]] = {}
    for file in files:
        try:
            dataset = pydicom.dcmread(file, stop_before_pixels=True)
        except InvalidDicomError:
            continue
        except Exception as error:  # pydicom raises many kinds on a broken header
            raise BadInputError(f"DICOM file '{file.name}' is truncated or corrupt ({_first_line(error)}); "
                                f"{_REDO}") from None
        if "Rows" in dataset and "Columns" in dataset:
            series.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append((file, dataset))
    return series


def _describe(uid: str, datasets) -> str:
    """'UID (description, N slices)' for the list of series to choose from."""
    description = str(datasets[0][1].get("SeriesDescription", "")).strip()
    slices = sum(_frame_count(ds) for _, ds in datasets)
    return f"{uid} ({description + ', ' if description else ''}{slices} slices)"


def _frame_count(dataset) -> int:
    return int(dataset.get("NumberOfFrames", 1) or 1)


def _no_geometry(file: Path) -> BadInputError:
    return BadInputError(f"DICOM file '{file.name}' has no patient geometry (ImagePositionPatient, "
                         "ImageOrientationPatient and PixelSpacing): it cannot be placed in 3D, nor a mask on it; "
                         "use a CT, MR or PET series")


def _plane(file: Path, frame: int, position, orientation, spacing) -> _Plane:
    if position is None or orientation is None or spacing is None or len(orientation) != 6 or len(spacing) != 2:
        raise _no_geometry(file)
    orientation = np.array(orientation, dtype=float)
    # PixelSpacing is (between rows, between columns): the column spacing is the step along a row
    return _Plane(file, frame, np.array(position, dtype=float), orientation[:3], orientation[3:],
                  (float(spacing[1]), float(spacing[0])))


def _file_plane(file: Path, dataset) -> _Plane:
    return _plane(file, 0, dataset.get("ImagePositionPatient"), dataset.get("ImageOrientationPatient"),
                  dataset.get("PixelSpacing"))


def _frame_planes(file: Path, dataset) -> list[_Plane]:
    """The frames of a multi-frame file: enhanced CT/MR from their functional groups, RT dose from the Grid Frame
    Offset Vector (offsets along the normal from ImagePositionPatient)."""
    frames = _frame_count(dataset)
    if "PerFrameFunctionalGroupsSequence" not in dataset and "GridFrameOffsetVector" in dataset:
        offsets = [float(v) for v in dataset.GridFrameOffsetVector][:frames]
        first = _file_plane(file, dataset)
        if len(offsets) != frames:
            raise BadInputError(f"DICOM file '{file.name}' has {frames} frames but {len(offsets)} frame offsets; "
                                f"{_REDO}")
        normal = np.cross(first.row, first.column)
        return [_Plane(file, n, first.position + (offset - offsets[0]) * normal, first.row, first.column,
                       first.spacing) for n, offset in enumerate(offsets)]
    planes = []
    for frame in range(frames):
        position = _functional_group(dataset, frame, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional_group(dataset, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional_group(dataset, frame, "PixelMeasuresSequence", "PixelSpacing")
        planes.append(_plane(file, frame, position, orientation, spacing))
    return planes


def _functional_group(dataset, frame: int, sequence: str, keyword: str):
    """`keyword` of a frame's functional group `sequence`: the per-frame item, else the shared one, else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = dataset.get(groups)
        if items is not None and index < len(items) and sequence in items[index] and items[index][sequence].value:
            value = items[index][sequence][0].get(keyword)
            if value is not None:
                return value
    return None


def _stack(planes: list[_Plane], multiframe: bool, dataset) -> tuple[np.ndarray, float, np.ndarray]:
    """Slice order along the normal, the spacing between slices, and each plane's in-plane drift from the first
    (LPS mm, projected onto the row and column directions), once the planes are one evenly spaced stack."""
    first = planes[0]
    for plane in planes[1:]:
        if not (np.allclose(plane.row, first.row, atol=ORIENTATION_TOLERANCE)
                and np.allclose(plane.column, first.column, atol=ORIENTATION_TOLERANCE)):
            raise BadInputError(f"{first.label(multiframe)} and {plane.label(multiframe)} have different "
                                "orientations: they are not one stack of slices; load one series")
    normal = np.cross(first.row, first.column)
    positions = np.array([plane.position for plane in planes])
    depths = positions @ normal
    order = np.argsort(depths, kind="stable")
    ordered = depths[order]
    gaps = np.diff(ordered)
    label = [planes[n].label(multiframe) for n in order]
    if gaps.size:
        same = int(np.argmin(gaps))
        if gaps[same] < SPACING_TOLERANCE_MM:
            cause = ("its frames are not one stack (several stacks, echoes or time points)" if multiframe
                     else "the folder holds a slice twice, or two scans")
            raise BadInputError(f"{label[same]} and {label[same + 1]} have the same slice position "
                                f"({ordered[same]:.4g} mm along the slice normal): {cause}; load one stack")
        spacing = float(np.median(gaps))
        odd = int(np.argmax(np.abs(gaps - spacing)))
        if abs(gaps[odd] - spacing) > SPACING_TOLERANCE_MM:
            between = (f"between {label[odd]} and {label[odd + 1]} ({gaps[odd]:.4g} mm apart, the others "
                       f"{spacing:.4g} mm)")
            missing = round(gaps[odd] / spacing) - 1
            if missing >= 1 and abs(gaps[odd] - (missing + 1) * spacing) <= SPACING_TOLERANCE_MM * (missing + 1):
                raise BadInputError(f"{missing} slice{'s are' if missing > 1 else ' is'} missing {between}: its "
                                    "geometry would be wrong; load the complete series")
            raise BadInputError(f"uneven slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm; {between}): the "
                                "series mixes scans or lost slices, so its geometry would be wrong; load a complete "
                                "series")
    else:
        spacing = float(dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1.0)
    drift = (positions - positions[order[0]]) - np.outer(depths - ordered[0], normal)
    offsets = np.column_stack([drift @ first.row, drift @ first.column])
    return order, spacing, offsets


def _tilt_degrees(offsets: np.ndarray, slice_spacing: float) -> float:
    """The angle between the slice normal and the line the slices' corners follow (least squares)."""
    depths = np.arange(len(offsets)) * slice_spacing
    if len(offsets) < 2:
        return 0.0
    shear = (depths @ offsets) / (depths @ depths)  # mm in-plane per mm along the normal
    return float(np.degrees(np.arctan(np.linalg.norm(shear))))


def _decoded_dtype(dataset) -> np.dtype:
    """What decoding will give, for the size check: rescaled values as float32, else the stored integers."""
    slope, intercept = float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0 or "DoseGridScaling" in dataset or "SharedFunctionalGroupsSequence" in dataset:
        return np.dtype(np.float32)
    bits = int(dataset.get("BitsAllocated", 16))
    return np.dtype(f"{'i' if int(dataset.get('PixelRepresentation', 0)) else 'u'}{max(bits // 8, 1)}")


def _decode_planes(planes: list[_Plane], datasets, multiframe: bool) -> np.ndarray:
    """The planes' pixels, [k, j, i], in the order given; modality values (rescale, dose scaling) applied."""
    headers = dict(datasets)
    if multiframe:
        frames = _decode(planes[0].path, headers[planes[0].path])
        voxels = frames[[plane.frame for plane in planes]]
    else:
        voxels = np.stack([_decode(plane.path, headers[plane.path])[0] for plane in planes])
    if voxels.dtype == np.float64:
        voxels = voxels.astype(np.float32)
    return np.ascontiguousarray(voxels)


def _decode(file: Path, dataset) -> np.ndarray:
    """A file's frames, [frame, row, column], in modality values; BadInputError naming the file if it is short or
    corrupt."""
    import SimpleITK as sitk

    expected = (_frame_count(dataset), int(dataset.Rows), int(dataset.Columns))
    try:
        pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(file), sitk.sitkUnknown, "GDCMImageIO"))
    except RuntimeError:
        pixels = None
    if pixels is None or pixels.reshape(-1, *pixels.shape[-2:]).shape != expected:
        pixels = _decode_with_pydicom(file)
    pixels = pixels.reshape(expected)
    scaling = dataset.get("DoseGridScaling")  # GDCM leaves RT dose unscaled
    return pixels * np.float32(scaling) if scaling is not None else pixels


def _decode_with_pydicom(file: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        dataset = pydicom.dcmread(file)
        return apply_modality_lut(dataset.pixel_array, dataset)
    except Exception as error:  # decoders raise many kinds on short or corrupt pixel data
        raise BadInputError(f"DICOM file '{file.name}' is truncated or corrupt: {_first_line(error)}; "
                            f"{_REDO}") from None


def _regularize(voxels: np.ndarray, drift_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shift each slice back onto the first slice's normal (bilinear, in-plane), on a grid wide enough for all.

    Returns the resampled voxels and where the new grid's first voxel lies, in (columns, rows) of the first slice.
    Voxels no slice covers take the volume's minimum (air, or the scanner's padding).
    """
    from scipy.ndimage import affine_transform

    low, high = drift_pixels.min(axis=0), drift_pixels.max(axis=0)
    columns = voxels.shape[2] + math.ceil(high[0] - low[0] - 1e-6)
    rows = voxels.shape[1] + math.ceil(high[1] - low[1] - 1e-6)
    fill = float(voxels.min())
    result = np.empty((voxels.shape[0], rows, columns), dtype=np.float32)
    for k, (column_shift, row_shift) in enumerate(drift_pixels):
        affine_transform(voxels[k].astype(np.float32), np.ones(2), offset=(low[1] - row_shift, low[0] - column_shift),
                         output_shape=(rows, columns), output=result[k], order=1, mode="constant", cval=fill)
    if voxels.dtype.kind in "iu":
        result = np.rint(result).astype(voxels.dtype)
    return result, low


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
