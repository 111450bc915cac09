"""`medsam2hitl` end to end in a subprocess: outputs aligned with the input, bad input, Ctrl+C, downloads."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA, REPO

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from evaluate_phantom_model import dice  # noqa: E402
from phantoms import make_phantom  # noqa: E402

pytestmark = pytest.mark.slow

AFFINE = np.array([[-1.5, 0, 0, 60.0], [0, 1.2, 0, -40.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])  # flipped x
SHAPE_IJK = (64, 56, 30)


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "MedSAM2HITLLib.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=_env(env),
    )


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "MedSAM2HITL"), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory) -> Path:
    """A CT-like NIfTI with a bright block, on a grid with a flipped x axis."""
    data = np.random.default_rng(0).normal(0, 30, SHAPE_IJK).astype(np.int16)
    data[20:44, 16:40, 5:25] += 300
    path = tmp_path_factory.mktemp("cli") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def ras_of(ijk) -> np.ndarray:
    return (AFFINE @ np.array([*ijk, 1.0]))[:3]


def box_on_slice(k: int) -> list[str]:
    """RAS corners of a box around the block, flat on slice k."""
    return [f"{v:.3f}" for v in (*ras_of((18, 14, k)), *ras_of((46, 42, k)))]


def test_segment_writes_a_segmentation_and_a_labelmap_on_the_input_grid(volume_file, random_checkpoint, tmp_path):
    out, labelmap = tmp_path / "out.seg.nrrd", tmp_path / "out.nii.gz"
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), "--window", "abdomen",
                 "--checkpoint", str(random_checkpoint), "--device", "cpu", "--threads", "2",
                 "-o", str(out), "--labelmap", str(labelmap))
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    written = nib.load(labelmap)
    assert np.allclose(written.affine, AFFINE)
    assert written.shape == SHAPE_IJK
    slices_with_labels = np.flatnonzero(np.asarray(written.dataobj).any(axis=(0, 1)))
    assert slices_with_labels.tolist() == [12]  # the box's slice, and only it
    assert not list(tmp_path.glob(".*partial*"))


def test_phantom_through_the_cli_lands_on_its_true_object(tmp_path):
    """The trained fixture, a box given in RAS on this flipped, left-handed grid (Slicer reverses its k):
    the 2D mask on exactly the box's slice, and the propagated labelmap on the object in the file's voxels."""
    phantom = make_phantom(31, size=(40, 80, 96), modality="ct")
    path, labelmap = tmp_path / "phantom.nii.gz", tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(phantom.volume.transpose(2, 1, 0), AFFINE), path)  # [k, j, i] → file (i, j, k)
    truth = phantom.mask.transpose(2, 1, 0)
    x0, y0, x1, y1 = phantom.box()  # x = i, y = j
    k = phantom.key_index
    box = [f"{v:.3f}" for v in (*ras_of((x0 - 1, y0 - 1, k)), *ras_of((x1 + 1, y1 + 1, k)))]
    common = ["--window", "abdomen", "--checkpoint", str(DATA / "phantom_sam2.pt"), "--device", "cpu",
              "--threads", "2", "-o", str(tmp_path / "out.seg.nrrd"), "--labelmap", str(labelmap)]

    result = cli("segment", str(path), "--box-ras", *box, *common)
    assert result.returncode == 0, result.stderr
    labels = np.asarray(nib.load(labelmap).dataobj) > 0
    assert np.flatnonzero(labels.any(axis=(0, 1))).tolist() == [k]
    assert dice(labels[..., k], truth[..., k]) >= 0.8  # 0.90 measured; a flip or shift gives ~0

    result = cli("segment", str(path), "--box-ras", *box, "--propagate", *common)
    assert result.returncode == 0, result.stderr
    assert dice(np.asarray(nib.load(labelmap).dataobj) > 0, truth) >= 0.85  # 0.96 measured


def test_propagation_fills_the_requested_range_only(volume_file, random_checkpoint, tmp_path):
    """--start/--end count slices as Slicer does; this left-handed NIfTI is read with k reversed (29 - k)."""
    labelmap = tmp_path / "out.nii.gz"
    result = cli("segment", str(volume_file), "--box-ras", *box_on_slice(12), "--window", "abdomen",
                 "--propagate", "--start", str(29 - 16), "--end", str(29 - 9),
                 "--checkpoint", str(random_checkpoint), "--device", "cpu", "--threads", "2",
                 "-o", str(tmp_path / "out.seg.nrrd"), "--labelmap", str(labelmap))
    assert result.returncode == 0, result.stderr
    assert "propagated 8 slices" in result.stderr
    labels = np.asarray(nib.load(labelmap).dataobj)
    assert set(np.flatnonzero(labels.any(axis=(0, 1)))) <= set(range(9, 17))
    assert labels[..., 12].any()


def _bad_volume_files(folder: Path) -> dict[str, Path]:
    files = {"text": folder / "notes.nii.gz", "4d": folder / "series.nii.gz", "rgb": folder / "photo.nii.gz"}
    files["text"].write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), files["4d"])
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), files["rgb"])
    return files


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("text", "could not read volume"),
        ("4d", "volume"),
        ("rgb", "scalar"),
        ("outside", "move the ROI onto the volume"),
        ("line", "line or a point"),
        ("preset", "unknown intensity window"),
        ("checkpoint", "unknown checkpoint"),
        ("offline", "not downloaded"),
        ("output", "must end with .seg.nrrd"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(case, message, volume_file, random_checkpoint, tmp_path):
    volume, box, extra = str(volume_file), box_on_slice(12), []
    checkpoint, output = str(random_checkpoint), str(tmp_path / "out.seg.nrrd")
    if case == "missing":
        volume = str(tmp_path / "absent.nii.gz")
    elif case in ("text", "4d", "rgb"):
        volume = str(_bad_volume_files(tmp_path)[case])
    elif case == "outside":
        box = [f"{v:.3f}" for v in (*ras_of((200, 200, 12)), *ras_of((220, 230, 12)))]
    elif case == "line":
        box = [f"{v:.3f}" for v in (*ras_of((18, 14, 12)), *ras_of((46, 14, 12)))]
    elif case == "preset":
        extra = ["--window", "liver"]
    elif case == "checkpoint":
        checkpoint = "MedSAM3_huge"
    elif case == "offline":
        checkpoint = "MedSAM2_latest"
    elif case == "output":
        output = str(tmp_path / "out.nrrd")
    result = cli("segment", volume, "--box-ras", *box, "--checkpoint", checkpoint, "--device", "cpu", "-o", output,
                 *extra, env={"MEDSAM2HITL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("medsam2hitl:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(output).exists()


def test_verbose_shows_the_traceback(volume_file, tmp_path):
    result = cli("--verbose", "segment", str(tmp_path / "absent.nii.gz"), "--box-ras", *box_on_slice(3), "-o",
                 str(tmp_path / "o.seg.nrrd"))
    assert result.returncode == 2 and "Traceback" in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX; Windows uses CTRL_C_EVENT")
@pytest.mark.parametrize("keep_partial", [False, True])
def test_ctrl_c_during_propagation_writes_nothing_unless_asked(volume_file, random_checkpoint, tmp_path, keep_partial):
    out, labelmap = tmp_path / "out.seg.nrrd", tmp_path / "out.nii.gz"
    args = [sys.executable, "-m", "MedSAM2HITLLib.cli", "segment", str(volume_file), "--box-ras", *box_on_slice(3),
            "--propagate", "--checkpoint", str(random_checkpoint), "--device", "cpu", "--threads", "1",
            "-o", str(out), "--labelmap", str(labelmap)] + (["--keep-partial"] if keep_partial else [])
    # A shell's background job (nohup ... &) starts with SIGINT ignored, and children inherit that: give the CLI
    # the default disposition a terminal's Ctrl+C meets.
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=_env(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("key slice segmented" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.4)  # into the propagation (the key slice comes first), well before its end (30 slices ≥ 1.2 s)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    reader.join(5)
    assert "cancelling" in "".join(lines)
    if keep_partial:
        labels = np.asarray(nib.load(labelmap).dataobj)
        done = np.flatnonzero(labels.any(axis=(0, 1)))
        assert out.is_file() and 3 in done and len(done) < SHAPE_IJK[2]
    else:
        assert not out.exists() and not labelmap.exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_models_download_list_and_path_against_a_loopback_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    payload = os.urandom(3_000_000)
    (served / "MedSAM2_latest.pt").write_bytes(payload)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"MEDSAM2HITL_CACHE": str(tmp_path / "cache")}
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/MedSAM2_latest.pt"
        result = cli("models", "download", "MedSAM2_latest", "--url", url, env=env)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.read_bytes() == payload and path.parent == tmp_path / "cache"
    assert cli("models", "path", "MedSAM2_latest", env=env).stdout.strip() == str(path)
    listing = cli("models", "list", env=env).stdout
    assert any(line.startswith("MedSAM2_latest") and " yes " in line for line in listing.splitlines())


def test_models_download_offline_says_where_to_put_the_file(tmp_path):
    result = cli("models", "download", "MedSAM2_latest", "--url", "http://127.0.0.1:9/MedSAM2_latest.pt",
                 env={"MEDSAM2HITL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert str(tmp_path / "cache") in result.stderr and "Traceback" not in result.stderr


def test_info_reports_size_spacing_and_orientation(volume_file):
    result = cli("info", str(volume_file))
    assert result.returncode == 0, result.stderr
    assert "64 x 56 x 30" in result.stdout
    assert "1.5 x 1.2 x 2" in result.stdout
    assert "orientation: LAI" in result.stdout  # Slicer reads this left-handed (LAS) file with K reversed
    assert "axial:       30 slices (0..29)" in result.stdout
