"""Precision modes: each fast path agrees with fp32 on the phantom fixture's held-out sets (accuracy, not speed:
timings live in benchmarks/bench_precision.py), `auto` picks only what was shown accurate, and the mode reaches
the model from the CLI, the worker and the service settings."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, REPO

sys.path.insert(0, str(REPO / "Testing" / "Training"))
from evaluate_phantom_model import dice, held_out_phantom, propagate_volume  # noqa: E402

pytestmark = pytest.mark.slow

CHECKPOINT = DATA / "phantom_sam2.pt"
FAST_MODES = ("bf16", "int8")
CASES_PER_SET = 2  # the first phantoms of each held-out set, not chosen


def slice_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


@pytest.fixture(scope="module")
def engines():
    from MedSAM2HITLLib.engine import Engine

    return {mode: Engine.load(CHECKPOINT, device="cpu", threads=2, precision=mode) for mode in ("fp32", *FAST_MODES)}


@pytest.fixture(scope="module")
def results(engines):
    """Per mode: (2D Dice, 3D Dice) per phantom and the 3D masks, on the same held-out phantoms."""
    out = {mode: {"dice": [], "masks": []} for mode in engines}
    for set_name in ("seeds", "unseen"):
        for i in range(CASES_PER_SET):
            phantom = held_out_phantom(set_name, i)
            key, box = phantom.key_index, phantom.box()
            for mode, engine in engines.items():
                engine.set_volume(phantom.volume, f"{set_name}-{i}")
                key_mask = engine.segment_slice(0, key, box, window=phantom.window)
                mask = propagate_volume(engine, 0, key, box, phantom.window)
                out[mode]["dice"].append((dice(key_mask, phantom.mask[key]), dice(mask, phantom.mask)))
                out[mode]["masks"].append(mask)
    return out


def test_fast_modes_really_run_reduced_precision(engines):
    """Otherwise the accuracy checks below would compare fp32 with itself."""
    import torch

    engine = engines["bf16"]
    linear = next(m for m in engine.model.predictor.image_encoder.modules() if isinstance(m, torch.nn.Linear))
    dtypes = []
    hook = linear.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    try:
        engine.set_volume(held_out_phantom("seeds", 0).volume, "dtype")
        engine.segment_slice(0, 3, (10, 10, 60, 60))
    finally:
        hook.remove()
    assert dtypes == [torch.bfloat16]
    from sam2.modeling.sam import transformer

    from MedSAM2HITLLib import cpu_attention

    assert transformer.F.scaled_dot_product_attention is cpu_attention.scaled_dot_product_attention
    encoder = engines["int8"].model.predictor.image_encoder
    assert any("quantized" in type(m).__module__ for m in encoder.modules()), "int8 left the linear layers in float"
    assert {mode: engine.info()["precision"] for mode, engine in engines.items()} == {mode: mode for mode in engines}


def test_cpu_bf16_attention_matches_torchs_and_leaves_other_calls_to_torch():
    import torch
    import torch.nn.functional as F

    from MedSAM2HITLLib.cpu_attention import scaled_dot_product_attention

    q, k, v = (torch.randn(1, 1, n, 64, generator=torch.Generator().manual_seed(n)) for n in (100, 300, 300))
    expected = F.scaled_dot_product_attention(q, k, v)
    ours = scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), dropout_p=0.0)
    assert ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), expected, atol=0.03)
    assert torch.equal(scaled_dot_product_attention(q, k, v), expected)
    mask = torch.zeros(100, 300, dtype=torch.bool)
    mask[:, :150] = True
    masked = scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask)
    assert torch.equal(masked, F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask))


@pytest.mark.parametrize("mode", FAST_MODES)
def test_fast_mode_keeps_dice_within_0_01_of_fp32(results, mode):
    reference = np.mean(results["fp32"]["dice"], axis=0)
    mean = np.mean(results[mode]["dice"], axis=0)
    assert np.all(np.abs(mean - reference) <= 0.01), f"{mode} 2D/3D Dice {mean} vs fp32 {reference}"


@pytest.mark.parametrize("mode", FAST_MODES)
def test_fast_mode_masks_agree_with_fp32_on_95_percent_of_slices(results, mode):
    ious = [slice_iou(a, b) for ref, ours in zip(results["fp32"]["masks"], results[mode]["masks"])
            for a, b in zip(ref, ours)]
    assert np.mean(np.asarray(ious) >= 0.95) >= 0.95


def test_auto_picks_bf16_only_where_it_was_shown_accurate():
    import torch

    from MedSAM2HITLLib.device import cpu_has_bf16, resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    assert resolve_precision("FP32", torch.device("cuda")) == "fp32"


def test_bad_precision_gets_a_clear_message():
    import torch

    from MedSAM2HITLLib.device import resolve_precision
    from MedSAM2HITLLib.errors import BadInputError

    with pytest.raises(BadInputError, match=r"^unknown precision 'fp16': use auto, fp32, bf16, int8$"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(BadInputError, match="int8 runs on the CPU only, not on cuda"):
        resolve_precision("int8", torch.device("cuda"))


def cli(*args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO / "MedSAM2HITL")}
    return subprocess.run([sys.executable, "-m", "MedSAM2HITLLib.cli", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_info_shows_the_precision_and_rejects_a_bad_one():
    from MedSAM2HITLLib.device import cpu_has_bf16

    volume = str(DATA / "ch2bet.nii.gz")
    auto = cli("info", volume, "--device", "cpu")
    assert auto.returncode == 0, auto.stderr
    assert f"compute:     cpu, precision {'bf16' if cpu_has_bf16() else 'fp32'} (auto)" in auto.stdout
    chosen = cli("info", volume, "--device", "cpu", "--precision", "int8")
    assert "compute:     cpu, precision int8\n" in chosen.stdout
    bad = cli("segment", volume, "--box-ras", *["0"] * 6, "-o", "x.seg.nrrd", "--precision", "fp16")
    assert bad.returncode == 2
    assert "argument --precision: invalid choice: 'fp16' (choose from 'auto', 'fp32', 'bf16', 'int8')" in bad.stderr


def test_worker_loads_the_model_in_the_precision_the_panel_asks_for():
    """The panel's Precision choice goes through SegmentationLogic.load_model to the worker's engine."""
    from MedSAM2HITLLib.logic import SegmentationLogic
    from MedSAM2HITLLib.worker_client import WorkerClient

    logic = SegmentationLogic(WorkerClient())
    try:
        assert logic.load_model(CHECKPOINT, device="cpu", threads=1, precision="int8").wait(120)["precision"] == "int8"
        with pytest.raises(Exception, match="unknown precision 'half'"):
            logic.load_model(CHECKPOINT, device="cpu", precision="half").wait(120)
    finally:
        logic.stop_worker()


def test_service_setting_reaches_the_workers_engine(monkeypatch, tmp_path):
    from medsam2hitl_server.session import WorkerSession
    from medsam2hitl_server.settings import Settings

    monkeypatch.setenv("MEDSAM2HITL_PRECISION", "int8")
    settings = Settings(checkpoint=str(CHECKPOINT), data_dir=tmp_path, device="cpu")
    assert WorkerSession(settings).load_model()["precision"] == "int8"
