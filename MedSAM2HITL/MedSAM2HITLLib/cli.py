"""`medsam2hitl`: the Slicer module's logic and worker from the command line, on a headless MRML scene.

Exit codes: 0 done; 2 bad input (files, box, preset, unknown or missing checkpoint or a bad config beside it, an
output that is an input, an output that could not be written, e.g. a full disk); 3 inference failed (out of
memory, worker stopped); 130 interrupted by Ctrl+C (nothing written unless --keep-partial); 143/129 stopped by SIGTERM/SIGHUP (its worker too); 1 unexpected error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError, MedSAM2Error, ModelError, PropagationCancelled

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
VIEWS = ("axial", "coronal", "sagittal")
REQUEST_TIMEOUT_SECONDS = 3600.0


class _Parser(argparse.ArgumentParser):
    """Reads '-1e1', '-inf' and '-nan' as numbers (argparse alone knows only '-1' and '-1.5' and calls the others
    unknown options, e.g. in --box-ras); its subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^-(inf|infinity|nan)$", re.I)


def build_parser() -> argparse.ArgumentParser:
    from .checkpoints import DEFAULT_MODEL
    from .preprocessing import window_names

    parser = _Parser(prog="medsam2hitl", description="MedSAM2 box-prompted 3D segmentation.",
                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and the worker's log")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment an object from a box, optionally through the volume")
    segment.add_argument("volume", nargs="?", help="NIfTI, NRRD, MHA/MHD file or a DICOM series folder")
    segment.add_argument("--series", metavar="UID", help="the DICOM series to read when the folder holds several")
    _regularize_argument(segment)
    _dicomweb_arguments(segment)
    prompt = segment.add_mutually_exclusive_group()
    prompt.add_argument("--box-ras", nargs=6, type=float, action="append", metavar=("X1", "Y1", "Z1", "X2", "Y2", "Z2"),
                        help="two opposite corners of the box in RAS millimetres (as Slicer shows them); repeat it\n"
                             "for several objects, propagated in one pass, one segment each")
    prompt.add_argument("--roi", help="Slicer markups ROI file (.mrk.json)")
    segment.add_argument("--point-ras", nargs=4, action="append", metavar=("X", "Y", "Z", "+|-"),
                         help="a click in RAS millimetres, + inside the object or - on what to leave out; repeat\n"
                              "it; alone (the slice of the last point) or with one box")
    segment.add_argument("--axis", choices=VIEWS, default="axial", help="slice orientation of the box (default axial)")
    segment.add_argument("--propagate", action="store_true", help="propagate from the key slice through the range")
    segment.add_argument("--start", type=int, help="first slice of the range: 0-based, counted as Slicer and `info` count them")
    segment.add_argument("--end", type=int, help="last slice of the range (inclusive)")
    segment.add_argument("--window", default="mr", help=f"{', '.join(window_names())} or W,L (default mr)")
    segment.add_argument("--largest-component", action="store_true", help="keep the largest 3D connected part")
    segment.add_argument("--no-early-stop", action="store_true",
                         help="track through the whole range even after the object has ended (a range given with\n"
                              "--start/--end is always followed exactly)")
    segment.add_argument("--checkpoint", default=DEFAULT_MODEL, help=f"registry name or file (default {DEFAULT_MODEL})")
    segment.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    segment.add_argument("--threads", type=int, help="CPU threads for inference")
    _precision_argument(segment)
    segment.add_argument("-o", "--output", required=True,
                         help="segmentation to write: .seg.nrrd, or .dcm for a DICOM SEG (DICOM input only)")
    segment.add_argument("--dicom-seg", metavar="FILE", help="also write a DICOM SEG (.dcm) linked to the DICOM series")
    segment.add_argument("--name", action="append", metavar="NAME",
                         help="the object's segment name (repeat it, one per box); a name such as Lesion or Liver\n"
                              "also gives the DICOM SEG its SNOMED-CT code")
    segment.add_argument("--labelmap", help="also write a NIfTI labelmap with the volume's affine (.nii.gz)")
    segment.add_argument("--keep-partial", action="store_true", help="on Ctrl+C, write the slices done so far")
    _server_arguments(segment)

    models = commands.add_parser("models", help="list, download or locate checkpoints")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    _server_arguments(models_commands.add_parser(
        "list", help="known checkpoints and whether they are downloaded (with --server: the service's models)"))
    download = models_commands.add_parser("download", help="download a checkpoint into the cache (resumes)")
    download.add_argument("name")
    download.add_argument("--url", help="download from this address instead (a mirror)")
    path = models_commands.add_parser("path", help="the cache folder, or where a checkpoint is/goes")
    path.add_argument("name", nargs="?")

    info = commands.add_parser("info", help="size, spacing, orientation and intensity range of a volume")
    info.add_argument("volume")
    info.add_argument("--series", metavar="UID", help="the DICOM series to read when the folder holds several")
    _regularize_argument(info)
    info.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                      help="the device whose precision to show (default auto)")
    _precision_argument(info)
    return parser


def _regularize_argument(parser) -> None:
    parser.add_argument("--no-regularize", action="store_true",
                        help="refuse a tilted DICOM series (gantry tilt, sheared positions) instead of resampling it")


def _precision_argument(parser) -> None:
    from .device import PRECISIONS

    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="arithmetic of the model: auto (bf16 where it was shown accurate and faster: CUDA, "
                             "CPUs with AVX512-BF16/AMX; fp32 elsewhere), fp32, bf16, int8 (CPU)")


def _dicomweb_arguments(parser) -> None:
    parser.add_argument("--dicomweb", metavar="URL",
                        help="read the series (--series UID) from this DICOMweb server instead of a folder; log in\n"
                             "with $MEDSAM2HITL_DICOMWEB_USER/_PASSWORD or $MEDSAM2HITL_DICOMWEB_TOKEN")
    parser.add_argument("--study", metavar="UID", help="with --dicomweb: the study that holds the series (optional)")
    parser.add_argument("--store", action="store_true",
                        help="with --dicomweb: store the DICOM SEG back on the server (STOW-RS)")


def _dicomweb_server(url: str):
    """The --dicomweb server, with credentials from the environment only (never the command line, which others see)."""
    from .dicomweb import DicomWebServer

    env = os.environ.get
    return DicomWebServer(url, env("MEDSAM2HITL_DICOMWEB_USER"), env("MEDSAM2HITL_DICOMWEB_PASSWORD"),
                          env("MEDSAM2HITL_DICOMWEB_TOKEN"))


def _dicom_input(args, stack) -> None:
    """Check --dicomweb/--store against the other options; with --dicomweb, fetch the series into a temporary
    folder (removed by `stack`) that then stands in for the volume argument."""
    if args.dicomweb is None:
        if args.volume is None:
            raise BadInputError("give a volume (file or DICOM folder) or --dicomweb URL --series UID")
        if args.store or args.study:
            raise BadInputError("--store and --study go with --dicomweb URL")
        return
    if args.volume is not None:
        raise BadInputError(f"give either a volume ('{args.volume}') or --dicomweb, not both")
    if not args.series:
        raise BadInputError("--dicomweb needs the series to read: --series UID")
    if _outputs(args).dicom_seg is None and args.store:  # output names are checked before anything is fetched
        raise BadInputError("--store sends the DICOM SEG: write one with -o result.dcm or --dicom-seg result.dcm")
    import tempfile

    from .dicomweb import retrieve_series

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medsam2hitl-dicomweb-")))
    server = _dicomweb_server(args.dicomweb)
    _say(f"retrieving series {args.series} from {server.shown()} ...")
    args.volume = str(retrieve_series(server, args.series, folder / "series", args.study))


def _server_arguments(parser) -> None:
    parser.add_argument("--server", metavar="URL", help="use the inference service at URL instead of this computer")
    parser.add_argument("--token", help="the service's bearer token (default: $MEDSAM2HITL_TOKEN)")


def _service_client(args):
    """A WorkerClient on the service named by --server, or None to run on this computer."""
    if not args.server:
        return None
    from .compute_backend import service_client

    return service_client(args.server, _token(args))


def _token(args) -> str | None:
    return args.token or os.environ.get("MEDSAM2HITL_TOKEN")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not args.verbose:
        _quiet_vtk()
    import signal

    from .process_tree import descendants, kill_tree

    def terminated(signum, frame):
        """SIGTERM/SIGHUP: kill the worker first (a stopped one would never notice that we are gone), then exit."""
        for child in descendants(os.getpid()):
            kill_tree(child)
        raise SystemExit(128 + signum)

    for name in ("SIGTERM", "SIGHUP"):  # Windows has no SIGHUP, and no SIGTERM from outside the process
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), terminated)
    try:
        return {"segment": run_segment, "models": run_models, "info": run_info}[args.command](args)
    except KeyboardInterrupt:
        print("medsam2hitl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MedSAM2Error as error:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"medsam2hitl: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if error.kind in (BadInputError.kind, ModelError.kind) else EXIT_FAILED
    except Exception as error:  # a bug: say so, with the traceback on request
        if args.verbose:
            raise
        print(f"medsam2hitl: unexpected error: {error.__class__.__name__}: {error} (run with --verbose)", file=sys.stderr)
        return EXIT_BUG


def run_segment(args) -> int:
    from contextlib import ExitStack

    with ExitStack() as stack:
        _dicom_input(args, stack)
        return _run_segment(args)


def _run_segment(args) -> int:
    from .checkpoints import resolve_checkpoint
    from .export import check_distinct
    from .logic import SegmentationLogic
    from .mrml_scene import create_scene, load_roi, load_volume
    from .preprocessing import parse_window
    from .roi_box import roi_from_corners
    from .segment_writer import create_segmentation

    outputs = _outputs(args)
    if outputs.dicom_seg is not None:
        from .dicom_seg import refuse_non_dicom

        refuse_non_dicom(args.volume)
    inputs = {"the input volume": Path(args.volume), **({"the ROI file": Path(args.roi)} if args.roi else {})}
    check_distinct(outputs.named(), inputs)  # would replace an input
    parse_window(args.window, _no_volume()) if args.window != "mr" else None  # a bad preset fails before any work
    checkpoint = Path(args.checkpoint) if args.server else resolve_checkpoint(args.checkpoint)  # the service has its own
    scene = create_scene()
    volume = load_volume(scene, args.volume, series_uid=args.series, regularize=not args.no_regularize)
    rois = [load_roi(scene, args.roi)] if args.roi else [roi_from_corners(scene, volume, box) for box in args.box_ras or []]
    points = _points_node(scene, args.point_ras) if args.point_ras else None
    if not rois and points is None:
        raise BadInputError("give a box (--box-ras or --roi) or clicks (--point-ras)")
    if len(rois) > 1 and points is not None:
        raise BadInputError("clicks (--point-ras) go with one box; with several boxes, leave them out")
    if args.name and len(args.name) != len(rois or [None]):
        raise BadInputError(f"--name was given {len(args.name)} times for {len(rois or [None])} object(s); "
                            "give one name per box")
    if len(rois) > 1 or args.name:  # one segment per object, named after its box (or its clicks)
        for number, prompt in enumerate(rois or [points], 1):
            prompt.SetName(args.name[number - 1] if args.name else f"Object {number}")
    if args.propagate:  # a wrong --start/--end fails before the model loads
        axis = SegmentationLogic.array_axis(volume, args.axis)
        for roi in rois:
            SegmentationLogic.check_range(volume, axis, SegmentationLogic.key_slice(volume, roi, axis), args.start,
                                          args.end)
    logic = SegmentationLogic(_service_client(args))
    try:
        started = time.monotonic()
        _say(f"loading {checkpoint.name} ..." if not args.server else f"connecting to {args.server} ...")
        loading = logic.client.load_model(checkpoint, device=args.device, threads=args.threads,
                                          precision=args.precision)
        segmentation = create_segmentation(scene, volume)
        segmenting = [logic.segment_slice(volume, roi, segmentation, axis=args.axis, window=args.window,
                                          points_node=points)  # each checks its prompt now, as the model loads
                      for roi in rois or [None]]
        info = loading.wait(REQUEST_TIMEOUT_SECONDS)
        _say(f"model ready on {info.get('device')}, precision {info.get('precision')} "
             f"({time.monotonic() - started:.1f} s)")
        started = time.monotonic()
        objects = [request.wait(REQUEST_TIMEOUT_SECONDS) for request in segmenting]
        _say(f"key slice segmented ({time.monotonic() - started:.2f} s)")
        if args.propagate:
            if not _propagate(logic, volume, segmentation, [(roi, segment_id) for roi, (_, segment_id)
                                                               in zip(rois or [None], objects)], args):
                return EXIT_INTERRUPTED
        _write_outputs(segmentation, volume, outputs, args, checkpoint.stem)
        return EXIT_OK
    finally:
        logic.stop_worker()


def _points_node(scene, points: list[list[str]]):
    """The --point-ras clicks as a markups point list (labels + / -), as the Slicer panel makes them."""
    from .point_prompts import add_point

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Clicks")
    for *ras, sign in points:
        if sign not in ("+", "-"):
            raise BadInputError(f"--point-ras ends with + (inside the object) or - (leave out), got {sign!r}")
        try:
            position = [float(v) for v in ras]
        except ValueError:
            raise BadInputError(f"--point-ras takes three numbers and a sign, got {' '.join(ras)} {sign}") from None
        add_point(node, position, sign == "+")
    return node


def _propagate(logic, volume, segmentation, objects, args) -> bool:
    """Run the propagation with a progress bar; False when Ctrl+C stopped it (outputs written only if asked).

    One object propagates from its ROI's box, or from its clicked slice when it has no ROI; several ROIs go
    through one pass.
    """
    from .engine import describe_early_end

    started = time.monotonic()
    progress = _ProgressBar("propagating")
    roi, segment_id = objects[0]
    if len(objects) > 1:
        request = logic.propagate_objects(volume, segmentation, objects, axis=args.axis, start=args.start,
                                          end=args.end, window=args.window, early_stop=not args.no_early_stop,
                                          on_progress=progress.update)
    else:
        sources = logic.slice_sources(segmentation, segment_id)
        key = sources.user_slices(logic.array_axis(volume, args.axis))[0] if roi is None else None
        request = logic.propagate(volume, segmentation, segment_id, axis=args.axis, roi_node=roi,
                                  from_segment=roi is None, key_index=key, start=args.start, end=args.end,
                                  window=args.window, largest_component=args.largest_component,
                                  early_stop=not args.no_early_stop, on_progress=progress.update)
    try:
        written = request.wait(REQUEST_TIMEOUT_SECONDS)
    except KeyboardInterrupt:
        progress.close()
        _say("cancelling ...")
        logic.cancel()
        try:
            request.wait(30.0)
        except (PropagationCancelled, MedSAM2Error, TimeoutError):
            pass
        if args.keep_partial:
            _write_outputs(segmentation, volume, _outputs(args), args, Path(args.checkpoint).stem)
            _say("kept the slices completed before the interruption (--keep-partial)")
        else:
            _say("interrupted: nothing written (use --keep-partial to keep completed slices)")
        return False
    progress.close()
    count = len(written) if isinstance(written, list) else sum(len(w) for w in written.values())
    _say(f"propagated {count} slices ({time.monotonic() - started:.1f} s)")
    ended = describe_early_end(request.reply.get("ended_early") or {}, len(objects))
    if ended:
        _say(ended)
    return True


@dataclass(frozen=True)
class _Outputs:
    """The files `segment` writes: -o (.seg.nrrd or a DICOM SEG .dcm), --labelmap and --dicom-seg."""

    seg_nrrd: Path | None
    labelmap: Path | None
    dicom_seg: Path | None

    def named(self) -> dict[str, Path]:
        return {label: path for label, path in (("-o", self.seg_nrrd), ("--labelmap", self.labelmap),
                                                ("--dicom-seg", self.dicom_seg)) if path is not None}


def _outputs(args) -> _Outputs:
    output = _output_path(args.output, ".seg.nrrd", ".dcm")
    is_dicom = output.name.lower().endswith(".dcm")
    if is_dicom and args.dicom_seg:
        raise BadInputError("-o already writes a DICOM SEG (.dcm); leave out --dicom-seg or give -o a .seg.nrrd")
    return _Outputs(None if is_dicom else output,
                    _output_path(args.labelmap, ".nii.gz", ".nii") if args.labelmap else None,
                    output if is_dicom else (_output_path(args.dicom_seg, ".dcm") if args.dicom_seg else None))


def _write_outputs(segmentation, volume, outputs: _Outputs, args, checkpoint_name: str) -> None:
    """Each file replaces an older one only once it reads back whole (export.replace_verified)."""
    from .export import export_labelmap_nifti, export_seg_nrrd, labelmap_array, volume_ijk_to_ras

    if outputs.seg_nrrd is not None:
        export_seg_nrrd(segmentation, outputs.seg_nrrd)
        _say(f"wrote {outputs.seg_nrrd}")
    if outputs.labelmap is not None:
        export_labelmap_nifti(segmentation, volume, outputs.labelmap)
        _say(f"wrote {outputs.labelmap}")
    if outputs.dicom_seg is not None:
        from .dicom_seg import write_dicom_seg

        labels, names = labelmap_array(segmentation, volume)
        write_dicom_seg(labels, volume_ijk_to_ras(volume), names, args.volume, args.series, outputs.dicom_seg,
                        checkpoint_name)
        _say(f"wrote {outputs.dicom_seg}")
        if args.store:
            from .dicomweb import store_instance

            server = _dicomweb_server(args.dicomweb)
            uid = store_instance(server, outputs.dicom_seg)
            _say(f"stored DICOM SEG {uid} on {server.shown()}")


def run_models(args) -> int:
    from .checkpoints import cache_dir, cached_path, download, list_models, lookup

    if args.models_command == "list" and args.server:
        _print_service(args)
    elif args.models_command == "list":
        rows = list_models()
        print(f"{'name':<26} {'size':>8}  {'cached':<6}  licence")
        for row in rows:
            mark = "*" if row["default"] else " "
            print(f"{row['name'] + mark:<26} {row['size']:>8}  {'yes' if row['cached'] else 'no':<6}  {row['licence']}")
        print(f"(* default)  cache: {cache_dir()}")
    elif args.models_command == "download":
        progress = _ProgressBar(f"downloading {args.name}", unit="MB", scale=1e-6)
        path = download(args.name, progress.update, url=args.url)
        progress.close()
        print(path)
    else:
        print(cached_path(lookup(args.name)) if args.name else cache_dir())
    return EXIT_OK


def _print_service(args) -> None:
    """The service's version, models and workers with their load (what Slicer's 'Test connection' shows)."""
    from .compute_backend import describe_service

    lines = describe_service(args.server, _token(args))
    print(lines[0])
    for line in lines[1:]:
        print(f"  {line}")


def run_info(args) -> int:
    import numpy as np
    import slicer.util

    from .mrml_scene import DICOM_TILT_ATTRIBUTE, create_scene, load_volume
    from .nifti_volume import load_nifti_geometry
    from .roi_box import array_axis_for_view, volume_ijk_to_world

    compute = _compute_choice(args.device, args.precision)  # a bad --precision fails before the volume loads
    volume = load_volume(create_scene(), args.volume, series_uid=args.series, regularize=not args.no_regularize)
    array = slicer.util.arrayFromVolume(volume)
    ijk_to_ras = volume_ijk_to_world(volume)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    print(f"file:        {args.volume}")
    print(f"size (IJK):  {' x '.join(str(n) for n in array.shape[::-1])}  ({array.dtype})")
    print(f"spacing mm:  {' x '.join(f'{s:g}' for s in spacing)}")
    print(f"origin RAS:  {' '.join(f'{v:g}' for v in ijk_to_ras[:3, 3])}")
    print(f"orientation: {_orientation(ijk_to_ras)} (I, J, K point towards)")
    nifti = load_nifti_geometry(args.volume)
    if nifti is not None:
        origin = " ".join(f"{v:g}" for v in nifti.affine[:3, 3])
        print(f"file grid:   {_orientation(nifti.affine)}, origin RAS {origin} (the NIfTI {nifti.source}; sform when "
              "its code > 0, else qform, else pixdim)")
        slices = array.shape[0]
        print("index order: " + (f"the file's grid is left-handed: turned right-handed as Slicer does, by reversing K; "
                                 f"slice n here and in --start/--end is the file's k = {slices - 1} - n"
                                 if nifti.left_handed else "the file's own i, j, k"))
    tilt = volume.GetAttribute(DICOM_TILT_ATTRIBUTE)
    if tilt is not None:
        print("index order: i along a row, j down the rows, k along the slice normal (row x column of "
              "ImageOrientationPatient): slice n here and in --start/--end is the n-th image by its "
              "ImagePositionPatient on that normal, not by file name or InstanceNumber")
        print("tilt:        " + (f"{float(tilt):.1f} degrees (gantry tilt or sheared slice positions): resampled onto "
                                 "an orthogonal grid that holds every slice (--no-regularize refuses it)"
                                 if float(tilt) > 0 else "none (the slice positions lie on the slice normal)"))
    print(f"intensity:   {array.min():g} .. {array.max():g}")
    for view in VIEWS:
        axis = array_axis_for_view(volume, view)
        print(f"{view + ':':<12} {array.shape[axis]} slices (0..{array.shape[axis] - 1})")
    print(f"compute:     {compute}")
    return EXIT_OK


def _orientation(affine) -> str:
    """'LAS': where the grid's I, J and K axes point."""
    import numpy as np

    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return "".join(_axis_code(d) for d in directions.T)


def _compute_choice(device: str, precision: str) -> str:
    """What `segment` with these --device/--precision runs on this computer, e.g. 'cpu, precision bf16 (auto)'."""
    from .device import resolve_device, resolve_precision

    torch_device = resolve_device(device)
    chosen = resolve_precision(precision, torch_device)
    return f"{torch_device.type}, precision {chosen}" + (" (auto)" if precision == "auto" else "")


def _quiet_vtk() -> None:
    """Slicer's readers log every failure at length; the CLI reports it once, in one line."""
    import vtk

    vtk.vtkObject.GlobalWarningDisplayOff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)


def _axis_code(direction) -> str:
    import numpy as np

    axis = int(np.argmax(np.abs(direction)))
    return ("LR", "PA", "IS")[axis][int(direction[axis] > 0)]


def _output_path(value: str, *suffixes: str) -> Path:
    from .export import check_output

    path = check_output(value, *suffixes)
    if not path.parent.resolve().is_dir():
        raise BadInputError(f"output folder '{path.parent}' does not exist; create it first")
    return path


def _no_volume():
    import numpy as np

    return np.zeros((1, 1, 1))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _ProgressBar:
    """A one-line text progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, unit: str = "slices", scale: float = 1.0):
        self.label, self.unit, self.scale = label, unit, scale
        self.tty = sys.stderr.isatty()
        self.shown = False

    def update(self, done, total) -> None:
        done, total = done * self.scale, (total * self.scale if total else None)
        if total:
            filled = int(30 * done / total)
            text = f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done:.0f}/{total:.0f} {self.unit}"
        else:
            text = f"{self.label} {done:.0f} {self.unit}"
        if self.tty:
            print("\r" + text, end="", file=sys.stderr, flush=True)
            self.shown = True
        elif not total or done == total or int(done) % 10 == 0:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)
            self.shown = False


if __name__ == "__main__":
    sys.exit(main())
