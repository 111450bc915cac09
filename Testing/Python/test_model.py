"""Checkpoint loading: strict, and every failure names the file and what is wrong with it."""

from __future__ import annotations

import shutil

import pytest
import torch

from MedSAM2HITLLib.errors import BadInputError, ModelError
from MedSAM2HITLLib.model import DEFAULT_CONFIG, load_model, read_state_dict

pytestmark = pytest.mark.slow


def test_a_saved_checkpoint_loads_back_strictly_with_its_config(random_checkpoint):
    model = load_model(random_checkpoint, device="cpu")
    assert model.config == random_checkpoint.with_suffix(".yaml")
    assert model.image_size == 256
    assert model.feature_sizes == [(64, 64), (32, 32), (16, 16)]
    saved = read_state_dict(random_checkpoint)
    loaded = model.predictor.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_other_image_sizes_set_the_rope_and_feature_sizes(random_checkpoint, tmp_path):
    """SAM2.1 tiny at 1024 and MedSAM2 at 512 share weights' shapes; sizes must follow image_size."""
    plain = tmp_path / "sam21_tiny.pt"
    shutil.copy(random_checkpoint, plain)  # no yaml beside it: the MedSAM2 config is used
    model = load_model(plain, device="cpu", image_size=512)
    assert model.config == DEFAULT_CONFIG
    attention = model.predictor.memory_attention.layers[0]
    assert model.feature_sizes == [(128, 128), (64, 64), (32, 32)]
    assert attention.self_attn.freqs_cis.shape[0] == 32 * 32
    assert attention.cross_attn_image.freqs_cis.shape[0] == 32 * 32


def test_a_truncated_checkpoint_is_named_and_called_truncated(random_checkpoint, tmp_path):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(random_checkpoint.read_bytes()[: 5_000_000])
    with pytest.raises(ModelError, match=r"cut\.pt is truncated or corrupt"):
        load_model(truncated, device="cpu")


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n" * 100)
    with pytest.raises(ModelError, match=r"notes\.pt is not a PyTorch checkpoint"):
        load_model(text, device="cpu")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"checkpoint not found: .*absent\.pt"):
        load_model(tmp_path / "absent.pt", device="cpu")


def test_a_checkpoint_without_a_model_entry_is_explained(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"weights": {}}, bare)
    with pytest.raises(ModelError, match=r"bare\.pt has no 'model' state dict"):
        load_model(bare, device="cpu")


def test_missing_and_unexpected_keys_are_listed(random_checkpoint, tmp_path):
    state = read_state_dict(random_checkpoint)
    removed = "no_mem_embed"
    del state[removed]
    state["extra.head.weight"] = torch.zeros(1)
    damaged = tmp_path / "damaged.pt"
    torch.save({"model": state}, damaged)
    shutil.copy(random_checkpoint.with_suffix(".yaml"), damaged.with_suffix(".yaml"))
    with pytest.raises(ModelError) as error:
        load_model(damaged, device="cpu")
    message = str(error.value)
    assert "damaged.pt" in message
    assert f"1 missing key(s), e.g. {removed}" in message
    assert "1 unexpected key(s), e.g. extra.head.weight" in message


def test_weights_of_another_shape_are_reported(random_checkpoint, tmp_path):
    state = read_state_dict(random_checkpoint)
    state["no_mem_embed"] = torch.zeros(1, 1, 7)
    wrong = tmp_path / "wrong_shape.pt"
    torch.save({"model": state}, wrong)
    with pytest.raises(ModelError, match=r"wrong_shape\.pt does not fit the model"):
        load_model(wrong, device="cpu")


def test_devices_auto_resolves_and_unavailable_ones_are_refused(random_checkpoint):
    from MedSAM2HITLLib.device import resolve_device

    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(BadInputError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="device 'cuda' is not available"):
            load_model(random_checkpoint, device="cuda")
