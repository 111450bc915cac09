"""`medsam2hitl segment` refuses what would destroy data or mislead, before any work, with exit code 2.

Configs that name code, outputs that are the input, writes that fail (a real file-size limit and, as root, a
really full tmpfs), non-finite numbers, and API misuse; every check runs the real CLI in a subprocess or the
real library.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cli import _env, box_on_slice, cli, volume_file  # noqa: F401  (volume_file is a fixture)
from test_hardening_model import PHANTOM, _checkpoint_with_config, _phantom_config_with
from MedSAM2HITLLib.errors import BadInputError

pytestmark = pytest.mark.slow

MODEL = ["--checkpoint", str(PHANTOM), "--device", "cpu", "--threads", "1"]


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one `medsam2hitl:` line of a failed run (asserting there is exactly one, and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("medsam2hitl:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _refused_before_work(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert message in _error_line(result), result.stderr
    assert "loading" not in result.stderr  # the model was never started


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob(".*partial*"))


# ---- 1. a model config beside the checkpoint is data, not code ----

def test_a_config_that_names_a_command_exits_2_and_runs_nothing(volume_file, tmp_path):  # noqa: F811
    marker = tmp_path / "marker"
    command = {"_target_": "subprocess.call", "args": f"touch '{marker}'", "shell": True}  # 0: a valid dropout
    checkpoint = _checkpoint_with_config(tmp_path, _phantom_config_with("memory_attention.layer.dropout", command))
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), "--checkpoint", str(checkpoint),
                 "--device", "cpu", "-o", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 2, result.stderr
    assert "field model.memory_attention.layer.dropout must be a plain value" in _error_line(result)
    assert not marker.exists() and not (tmp_path / "out.seg.nrrd").exists()


def test_a_malformed_config_exits_2_with_one_line(volume_file, tmp_path):  # noqa: F811
    checkpoint = tmp_path / "model.pt"
    shutil.copy(PHANTOM, checkpoint)
    checkpoint.with_suffix(".yaml").write_text("model: {image_size: [128\n", encoding="utf-8")
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), "--checkpoint", str(checkpoint),
                 "--device", "cpu", "-o", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 2, result.stderr
    assert "model.yaml is not valid YAML" in _error_line(result)


# ---- 2. an output never replaces the input ----

def _nrrd_volume(path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8, 8), np.int16)), str(path))
    return path


@pytest.mark.parametrize("case", ["labelmap is the volume", "labelmap links to the volume",
                                  "labelmap is a hard link", "volume links to the labelmap",
                                  "-o is the volume", "-o and labelmap are one file"])
def test_an_output_that_is_the_input_is_refused_before_any_work(case, volume_file, tmp_path):  # noqa: F811
    volume = tmp_path / "ct.nii.gz"
    shutil.copy(volume_file, volume)
    output, labelmap = tmp_path / "out.seg.nrrd", tmp_path / "labels.nii.gz"
    if case == "labelmap is the volume":
        labelmap = volume
    elif case == "labelmap links to the volume":
        labelmap.symlink_to(volume)
    elif case == "labelmap is a hard link":
        os.link(volume, labelmap)
    elif case == "volume links to the labelmap":
        shutil.move(volume, labelmap)
        volume.symlink_to(labelmap)
    elif case == "-o is the volume":
        volume = output = _nrrd_volume(tmp_path / "ct.seg.nrrd")  # a plain NRRD volume may end with .seg.nrrd
    else:
        output.write_bytes(b"an older result")
        labelmap.symlink_to(output)
    before = {path: path.read_bytes() for path in (volume, output, labelmap) if path.exists()}

    result = cli("segment", str(volume), "--box-ras", *box_on_slice(12), *MODEL, "-o", str(output),
                 "--labelmap", str(labelmap))
    _refused_before_work(result, "is the same file as")
    assert {path: path.read_bytes() for path in before} == before


def test_an_output_that_is_a_folder_is_refused_before_any_work(volume_file, tmp_path):  # noqa: F811
    folder = tmp_path / "out.seg.nrrd"
    folder.mkdir()
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), *MODEL, "-o", str(folder))
    _refused_before_work(result, "is a folder")
    assert not _partials(tmp_path) and not any(folder.iterdir())


# ---- 3. a write that fails keeps the previous result ----

@pytest.fixture(scope="module")
def previous_result(volume_file, tmp_path_factory) -> dict[str, bytes]:  # noqa: F811
    """A valid .seg.nrrd and labelmap from slice 12, the older result that a failed write must keep."""
    folder = tmp_path_factory.mktemp("previous")
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), "--window", "abdomen", *MODEL,
                 "-o", str(folder / "out.seg.nrrd"), "--labelmap", str(folder / "out.nii.gz"))
    assert result.returncode == 0, result.stderr
    return {name: (folder / name).read_bytes() for name in ("out.seg.nrrd", "out.nii.gz")}


def _limit_file_size(limit: int):
    """For a child: files cannot grow past `limit` bytes, and writes past it fail with EFBIG (SIGXFSZ ignored)."""

    import resource  # POSIX only

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """The same limit on this process, for in-process writes; lifted afterwards."""
    import resource  # POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs whose free space is used up (a real ENOSPC); only where this user may mount one."""
    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        if os.environ.get("CI") == "true":  # CI runs as root: there the real full disk must be tested
            pytest.fail("could not mount a 1 MiB tmpfs for the full-disk case")
        pytest.skip("mounting a small tmpfs needs root; the file-size-limit case covers the rest")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    assert shutil.disk_usage(folder).free < 4096


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE and tmpfs are POSIX")
@pytest.mark.parametrize("failure", ["file size limit", "full disk"])
def test_a_failed_write_keeps_the_previous_result_and_leaves_no_partial_file(
    failure, volume_file, previous_result, tmp_path, request  # noqa: F811
):
    folder = request.getfixturevalue("full_disk") if failure == "full disk" else tmp_path
    for name, content in previous_result.items():
        (folder / name).write_bytes(content)
    limit = None
    if failure == "full disk":
        _fill(folder)
    else:
        limit = _limit_file_size(1024)  # below any .seg.nrrd: its header alone is longer
    result = subprocess.run(
        [sys.executable, "-m", "MedSAM2HITLLib.cli", "segment", str(volume_file), "--box-ras", *box_on_slice(20),
         "--window", "abdomen", *MODEL, "-o", str(folder / "out.seg.nrrd"), "--labelmap", str(folder / "out.nii.gz")],
        capture_output=True, text=True, timeout=300, env=_env({"PYTHONDONTWRITEBYTECODE": "1"}), preexec_fn=limit,
    )
    assert result.returncode == 2, result.stderr
    line = _error_line(result)
    assert "could not write" in line and "out.seg.nrrd" in line and "left as it was" in line
    assert ("the disk is full" in line) == (failure == "full disk"), line
    assert "wrote" not in result.stderr
    assert {name: (folder / name).read_bytes() for name in previous_result} == previous_result
    assert not _partials(folder)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE and tmpfs are POSIX")
@pytest.mark.parametrize("failure", ["file size limit", "full disk"])
def test_a_failed_labelmap_write_keeps_the_older_file(failure, tmp_path, request):
    """nibabel raises the OS error itself (EFBIG or ENOSPC): the same rule, and the disk named when it is full."""
    from MedSAM2HITLLib import segment_writer
    from MedSAM2HITLLib.export import export_labelmap_nifti
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array, create_scene

    scene = create_scene()
    volume = add_volume_from_array(scene, np.zeros((20, 64, 64), np.int16), np.eye(4))
    segmentation = segment_writer.create_segmentation(scene, volume)
    segment_id = segment_writer.get_or_create_segment(segmentation, "noise")
    noise = np.random.default_rng(0).random((20, 64, 64)) < 0.5  # compresses badly: far above the limit
    segment_writer.write_slices(segmentation, segment_id, volume, 0, dict(enumerate(noise)))
    folder = request.getfixturevalue("full_disk") if failure == "full disk" else tmp_path
    target = folder / "labels.nii.gz"
    target.write_bytes(b"older labelmap")

    limit = contextlib.nullcontext() if failure == "full disk" else _file_size_limit(4096)
    if failure == "full disk":
        _fill(folder)
    with limit, pytest.raises(BadInputError) as raised:
        export_labelmap_nifti(segmentation, volume, target)
    message = str(raised.value)
    assert ("the disk is full" if failure == "full disk" else "(File too large)") in message, message
    assert target.read_bytes() == b"older labelmap"
    assert not _partials(folder)


# ---- 8. smaller ones ----

@pytest.mark.parametrize("window", ["400,nan", "inf,40", "nan,nan", "400,-inf"])
def test_non_finite_windows_are_refused_before_any_work(window, volume_file, tmp_path):  # noqa: F811
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), *MODEL, "--window", window,
                 "-o", str(tmp_path / "out.seg.nrrd"))
    _refused_before_work(result, "must be finite numbers")


@pytest.mark.parametrize("spec", [(400, float("nan")), (float("inf"), 40), "400,inf"])
def test_parse_window_refuses_non_finite_pairs_too(spec):
    from MedSAM2HITLLib.preprocessing import parse_window

    with pytest.raises(BadInputError, match="must be finite numbers"):
        parse_window(spec, np.zeros((1, 1, 1)))


def _roi_file(path: Path, centre) -> Path:
    markup = {"type": "ROI", "coordinateSystem": "LPS", "roiType": "Box", "center": list(centre),
              "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], "size": [20.0, 20.0, 2.0]}
    path.write_text(json.dumps({"markups": [markup]}), encoding="utf-8")  # json writes NaN as Slicer reads it
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_roi_with_a_non_finite_centre_exits_2(value, volume_file, tmp_path):  # noqa: F811
    roi = _roi_file(tmp_path / "lesion.mrk.json", (value, 0.0, 0.0))
    result = cli("segment", str(volume_file), "--roi", str(roi), *MODEL, "-o", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 2, result.stderr
    assert "ROI 'lesion' has no finite centre" in _error_line(result)


def test_threads_below_one_exit_2(volume_file, tmp_path):  # noqa: F811
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), "--checkpoint", str(PHANTOM),
                 "--device", "cpu", "--threads", "-3", "-o", str(tmp_path / "out.seg.nrrd"))
    assert result.returncode == 2, result.stderr
    assert "threads must be a whole number of at least 1, got -3" in _error_line(result)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_set_cpu_threads_refuses_what_torch_cannot_use(threads):
    from MedSAM2HITLLib.device import set_cpu_threads

    with pytest.raises(BadInputError, match="threads must be a whole number of at least 1"):
        set_cpu_threads(threads)


def test_negative_numbers_in_exponent_form_and_infinities_are_values():
    from MedSAM2HITLLib.cli import build_parser

    args = build_parser().parse_args(["segment", "ct.nii", "--box-ras", "-1e1", "-2.5E+1", "-.5", "-3", "-inf",
                                      "-nan", "-o", "x.seg.nrrd"])
    box, = args.box_ras  # --box-ras may be repeated (one box per object)
    assert box[:5] == [-10.0, -25.0, -0.5, -3.0, float("-inf")] and np.isnan(box[5])


def test_an_infinite_box_corner_exits_2_saying_so(volume_file, tmp_path):  # noqa: F811
    box = box_on_slice(12)
    box[0] = "-inf"
    result = cli("segment", str(volume_file), "--box-ras", *box, *MODEL, "-o", str(tmp_path / "out.seg.nrrd"))
    _refused_before_work(result, "finite")


@pytest.mark.parametrize("start, end", [("0", "40"), ("-2", "10"), ("20", "25")])  # 30 slices; key slice is 29-12
def test_a_range_outside_the_volume_is_refused_before_the_model_loads(start, end, volume_file, tmp_path):  # noqa: F811
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), "--propagate", "--start", start,
                 "--end", end, *MODEL, "-o", str(tmp_path / "out.seg.nrrd"))
    _refused_before_work(result, f"slice range {start}..{end} must lie within slices 0..29")


@pytest.fixture
def scene_volume_roi():
    from MedSAM2HITLLib.mrml_scene import add_volume_from_array, create_scene

    scene = create_scene()
    volume = add_volume_from_array(scene, np.zeros((8, 20, 20), np.int16), np.eye(4), "ct")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.SetCenter(10, 10, 4)
    roi.SetSize(8, 8, 1)
    return scene, volume, roi


def _logic():
    from MedSAM2HITLLib.logic import SegmentationLogic

    return SegmentationLogic()  # no worker starts: every case fails before a request is sent


def test_the_api_refuses_a_volume_removed_from_the_scene(scene_volume_roi):
    scene, volume, roi = scene_volume_roi
    scene.RemoveNode(volume)
    logic = _logic()
    with pytest.raises(BadInputError, match="volume 'ct' is no longer in the scene"):
        logic.segment_slice(volume, roi)
    with pytest.raises(BadInputError, match="volume 'ct' is no longer in the scene"):
        logic.propagate(volume, None, "S", roi_node=roi)


@pytest.mark.parametrize("dtype", [np.bool_, np.float16])
def test_the_api_refuses_arrays_with_a_clear_message(dtype, scene_volume_roi):
    _, _, roi = scene_volume_roi
    with pytest.raises(BadInputError, match=f"expected a volume node, got a numpy array \\({np.dtype(dtype)}\\)"):
        _logic().segment_slice(np.zeros((8, 20, 20), dtype), roi)


def test_the_api_refuses_an_roi_with_a_nan_centre(scene_volume_roi):
    _, volume, roi = scene_volume_roi
    roi.SetCenter(float("nan"), 10, 4)
    with pytest.raises(BadInputError, match="ROI 'R' has no finite centre"):
        _logic().segment_slice(volume, roi)
