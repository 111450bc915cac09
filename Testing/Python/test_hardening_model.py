"""Model configs are data: only sam2's own classes are built, in their usual fields; damaged checkpoints are named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import DATA
from MedSAM2HITLLib.errors import ModelError
from MedSAM2HITLLib.model import BACKBONE_STRIDES, DEFAULT_CONFIG, build_predictor, load_model, read_state_dict

pytestmark = pytest.mark.slow

PHANTOM = DATA / "phantom_sam2.pt"


class _CreatesFile:
    """Unpickling this opens (creates) a file: what a pickled .npy could do when numpy.load allows pickles."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _payload(kind: str, marker, folder) -> dict:
    if kind == "os.system":
        return {"_target_": "os.system", "command": f"touch '{marker}'"}
    if kind == "builtins.open":
        return {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    pickled = folder / "payload.npy"
    np.save(pickled, np.array([_CreatesFile(marker)], dtype=object), allow_pickle=True)
    return {"_target_": "numpy.load", "file": str(pickled), "allow_pickle": True}


def _checkpoint_with_config(folder, config: dict):
    """The phantom checkpoint with `config` as the YAML beside it, which load_model picks up on its own."""
    checkpoint = folder / "model.pt"
    shutil.copy(PHANTOM, checkpoint)
    checkpoint.with_suffix(".yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return checkpoint


def _phantom_config_with(field: str, value) -> dict:
    """The phantom model's config with `value` at `field` (dotted, below `model`)."""
    config = yaml.safe_load(PHANTOM.with_suffix(".yaml").read_text(encoding="utf-8"))
    *parents, name = field.split(".")
    node = config["model"]
    for parent in parents:
        node = node[parent]
    node[name] = value
    return config


@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "numpy.load"])
@pytest.mark.parametrize("field", ["memory_attention.layer.d_model", "image_encoder.trunk.embed_dim"])
def test_a_target_in_a_numeric_field_is_refused_and_never_called(kind, field, tmp_path):
    marker = tmp_path / "marker"
    config = _phantom_config_with(field, _payload(kind, marker, tmp_path))
    with pytest.raises(ModelError, match=rf"field model\.{field} must be a plain value, not _target_: {kind}"):
        load_model(_checkpoint_with_config(tmp_path, config), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image_encoder.trunk", {"_target_": "builtins.open", "file": "{marker}", "mode": "w"},
         r"field model\.image_encoder\.trunk must be _target_: sam2\.modeling\.backbones\.hieradet\.Hiera"),
        ("memory_encoder.fuser", {"_target_": "sam2.modeling.backbones.hieradet.Hiera"},
         r"field model\.memory_encoder\.fuser must be _target_: sam2\.modeling\.memory_encoder\.Fuser"),
        ("_target_", "builtins.exec", r"field model must be _target_: sam2\.sam2_video_predictor"),
        ("memory_encoder._args_", ["{marker}"], r"field model\.memory_encoder\._args_ is not allowed"),
    ],
)
def test_slots_build_only_their_own_sam2_class_and_hydra_keys_are_refused(field, value, message, tmp_path):
    marker = tmp_path / "marker"
    config = _phantom_config_with(field, yaml.safe_load(yaml.safe_dump(value).replace("{marker}", str(marker))))
    with pytest.raises(ModelError, match=message):
        load_model(_checkpoint_with_config(tmp_path, config), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [1, 2", "is not valid YAML"),
        ("model: !!python/object/apply:os.system ['true']", "is not valid YAML"),
        ("- 1\n- 2\n", "has no 'model' section"),
        ("model:\n  image_size: 128\n", "lacks model.memory_attention.layer"),
    ],
)
def test_a_malformed_config_is_a_model_error_naming_the_file(text, message, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ModelError, match=rf"broken\.yaml .*{message}"):
        build_predictor(config)


def test_a_config_value_sam2_rejects_is_a_model_error_naming_the_field(tmp_path):
    config = _phantom_config_with("memory_encoder.fuser.layer.no_such_option", 1)
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ModelError, match=r"field model\.memory_encoder\.fuser\.layer does not build a CXBlock"):
        build_predictor(path)


@pytest.mark.parametrize("config, image_size", [(DEFAULT_CONFIG, 512), (DATA / "phantom_sam2.yaml", 128)])
def test_the_real_configs_build_exactly_what_hydra_built(config, image_size):
    """Same modules and the same weights from the same seed as Hydra's instantiate (the loader before the
    allow-list), so the phantom model's training stays reproducible."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    reference = OmegaConf.load(config).model
    rope = [image_size // BACKBONE_STRIDES[-1]] * 2
    reference.memory_attention.layer.self_attention.feat_sizes = rope
    reference.memory_attention.layer.cross_attention.feat_sizes = rope
    reference._target_ = "sam2.sam2_video_predictor.SAM2VideoPredictor"
    torch.manual_seed(3)
    expected = instantiate(reference, _recursive_=True)
    torch.manual_seed(3)
    built = build_predictor(config)

    assert [type(m) for m in built.modules()] == [type(m) for m in expected.modules()]
    assert built.image_size == image_size
    built_state, expected_state = built.state_dict(), expected.state_dict()
    assert built_state.keys() == expected_state.keys()
    assert all(torch.equal(built_state[k], expected_state[k]) for k in expected_state)


def test_the_phantom_checkpoint_loads_strictly_with_its_config():
    model = load_model(PHANTOM, device="cpu")
    assert model.config == PHANTOM.with_suffix(".yaml") and model.image_size == 128


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(bad, tmp_path):
    state = read_state_dict(PHANTOM)
    name = "sam_mask_decoder.iou_prediction_head.layers.0.weight"
    state[name][0, 0] = bad
    damaged = tmp_path / "damaged.pt"
    torch.save({"model": state}, damaged)
    shutil.copy(PHANTOM.with_suffix(".yaml"), damaged.with_suffix(".yaml"))
    with pytest.raises(ModelError, match=rf"damaged\.pt has non-finite weights in {name}"):
        load_model(damaged, device="cpu")


def test_pickled_payload_really_creates_the_marker_when_loaded(tmp_path):
    """The numpy.load payload above is live: loading it with pickles allowed does create the file."""
    marker = tmp_path / "marker"
    payload = _payload("numpy.load", marker, tmp_path)
    np.load(payload["file"], allow_pickle=True)[0].close()
    assert marker.exists()
