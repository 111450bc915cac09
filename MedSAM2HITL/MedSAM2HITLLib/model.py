"""Build a SAM2-family model from a config file and load its checkpoint strictly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError, ModelError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "medsam2_hiera_t512.yaml"
BACKBONE_STRIDES = (4, 8, 16)  # Hiera feature maps used by the SAM heads, relative to image_size


@dataclass
class LoadedModel:
    """A SAM2 video predictor (which is also the image model) and what was used to build it."""

    predictor: object  # sam2.sam2_video_predictor.SAM2VideoPredictor
    device: object  # torch.device
    image_size: int
    checkpoint: Path
    config: Path
    precision: str  # fp32, bf16 or int8: see device.resolve_precision

    @property
    def feature_sizes(self) -> list[tuple[int, int]]:
        """Backbone feature sizes at this image size (sam2 1.1.0 hard-codes the 1024 ones)."""
        return [(self.image_size // s, self.image_size // s) for s in BACKBONE_STRIDES]

    def describe(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "config": str(self.config),
            "device": str(self.device),
            "image_size": self.image_size,
            "precision": self.precision,
            "parameters": sum(p.numel() for p in self.predictor.parameters()),
        }


def config_for(checkpoint: Path) -> Path:
    """A `<name>.yaml` beside the checkpoint wins; otherwise the MedSAM2 config."""
    sibling = checkpoint.with_suffix(".yaml")
    return sibling if sibling.is_file() else DEFAULT_CONFIG


def read_state_dict(checkpoint: Path) -> dict:
    """The finite `{"model": state_dict}` of a checkpoint, or a ModelError naming the file and the problem."""
    import torch

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelError(f"checkpoint not found: {checkpoint}")
    with open(checkpoint, "rb") as f:
        magic = f.read(4)
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... depending on damage
        if magic[:2] == b"PK":
            raise ModelError(
                f"checkpoint {checkpoint} is truncated or corrupt ({exc.__class__.__name__}); "
                "delete it and download it again"
            ) from exc
        raise ModelError(f"{checkpoint} is not a PyTorch checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise ModelError(
            f"checkpoint {checkpoint} has no 'model' state dict; "
            "MedSAM2/SAM2 checkpoints are saved as {'model': state_dict}"
        )
    for name, tensor in content["model"].items():  # NaN weights give empty masks without an error
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(
                f"checkpoint {checkpoint} has non-finite weights in {name}; it is damaged: download or train it again"
            )
    return content["model"]


# The only classes a config may build, by field. A config beside a checkpoint is picked up silently, so it is
# treated as data: Hydra's instantiate would import and call whatever a `_target_` anywhere in it names.
MODEL_CLASS = "sam2.sam2_video_predictor.SAM2VideoPredictor"
SAM2_BASE_CLASS = "sam2.modeling.sam2_base.SAM2Base"  # what sam2's own configs name; built as the video predictor
SLOT_CLASSES = {
    "model": MODEL_CLASS,
    "model.image_encoder": "sam2.modeling.backbones.image_encoder.ImageEncoder",
    "model.image_encoder.trunk": "sam2.modeling.backbones.hieradet.Hiera",
    "model.image_encoder.neck": "sam2.modeling.backbones.image_encoder.FpnNeck",
    "model.image_encoder.neck.position_encoding": "sam2.modeling.position_encoding.PositionEmbeddingSine",
    "model.memory_attention": "sam2.modeling.memory_attention.MemoryAttention",
    "model.memory_attention.layer": "sam2.modeling.memory_attention.MemoryAttentionLayer",
    "model.memory_attention.layer.self_attention": "sam2.modeling.sam.transformer.RoPEAttention",
    "model.memory_attention.layer.cross_attention": "sam2.modeling.sam.transformer.RoPEAttention",
    "model.memory_encoder": "sam2.modeling.memory_encoder.MemoryEncoder",
    "model.memory_encoder.position_encoding": "sam2.modeling.position_encoding.PositionEmbeddingSine",
    "model.memory_encoder.mask_downsampler": "sam2.modeling.memory_encoder.MaskDownSampler",
    "model.memory_encoder.fuser": "sam2.modeling.memory_encoder.Fuser",
    "model.memory_encoder.fuser.layer": "sam2.modeling.memory_encoder.CXBlock",
}


def read_config(config: Path) -> dict:
    """The config file as plain data (interpolations left unresolved), or a ModelError saying why not."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        content = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        problem = " ".join(str(exc).split())
        raise ModelError(f"model config {config} is not valid YAML ({problem}); fix or delete it") from exc
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise ModelError(f"model config {config} has no 'model' section; fix or delete it")
    return content


def build_predictor(config: Path, image_size: int | None = None):
    """Build the (untrained) SAM2VideoPredictor a config describes, from SLOT_CLASSES and plain values only."""
    model_cfg = read_config(config)["model"]
    if model_cfg.get("_target_", SAM2_BASE_CLASS) == SAM2_BASE_CLASS:
        model_cfg["_target_"] = MODEL_CLASS
    if image_size is not None:
        model_cfg["image_size"] = int(image_size)
    size = model_cfg.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
        raise BadInputError(f"image_size must be a positive multiple of 32, got {size!r}")
    rope = size // BACKBONE_STRIDES[-1]
    try:
        layer = model_cfg["memory_attention"]["layer"]
        for attention in ("self_attention", "cross_attention"):
            layer[attention]["feat_sizes"] = [rope, rope]
    except (KeyError, TypeError) as exc:
        raise ModelError(
            f"model config {config} lacks model.memory_attention.layer.self_attention/cross_attention; "
            "it does not describe a SAM2 model"
        ) from exc
    return _build(model_cfg, "model", config)


def _build(node, path: str, config: Path):
    """Config field `path` as a value: an object of its SLOT_CLASSES class, or plain data elsewhere."""
    import importlib

    if isinstance(node, dict):
        for key in node:
            if isinstance(key, str) and key.startswith("_") and key != "_target_":
                raise ModelError(f"model config {config}: field {path}.{key} is not allowed; remove it")
    if path not in SLOT_CLASSES and not (isinstance(node, dict) and "_target_" in node):
        if isinstance(node, dict):
            return {key: _build(value, f"{path}.{key}", config) for key, value in node.items()}
        if isinstance(node, list):
            return [_build(value, f"{path}[{i}]", config) for i, value in enumerate(node)]
        return node
    target = node.get("_target_") if isinstance(node, dict) else None
    if target != SLOT_CLASSES.get(path):
        wanted = f"_target_: {SLOT_CLASSES[path]}" if path in SLOT_CLASSES else "a plain value"
        found = f"_target_: {target}" if target else repr(node)
        raise ModelError(f"model config {config}: field {path} must be {wanted}, not {found}; fix or delete the config")
    kwargs = {key: _build(value, f"{path}.{key}", config) for key, value in node.items() if key != "_target_"}
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)(**kwargs)
    except Exception as exc:  # whatever sam2 rejects (a missing field, a wrong size) is the config's fault
        raise ModelError(f"model config {config}: field {path} does not build a {name}: {exc}") from exc


def load_model(
    checkpoint: str | Path,
    config: str | Path | None = None,
    device: str = "auto",
    image_size: int | None = None,
    precision: str = "auto",
) -> LoadedModel:
    """Build the model, load the checkpoint strictly and move it to the device in eval mode, in a precision."""
    from .device import resolve_device, resolve_precision

    checkpoint = Path(checkpoint)
    config = Path(config) if config else config_for(checkpoint)
    torch_device = resolve_device(device)
    chosen = resolve_precision(precision, torch_device)
    state_dict = read_state_dict(checkpoint)
    predictor = build_predictor(config, image_size)
    try:
        missing, unexpected = predictor.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {checkpoint} does not fit the model of {config.name}: {exc}") from exc
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        raise ModelError(
            f"checkpoint {checkpoint} does not match the model of {config.name}: " + "; ".join(problems)
        )
    predictor.to(torch_device).eval()
    if chosen == "int8":
        quantize_image_encoder(predictor)
    if chosen == "bf16":
        from .cpu_attention import use_in_sam2

        use_in_sam2()
    return LoadedModel(predictor, torch_device, int(predictor.image_size), checkpoint, config, chosen)


def quantize_image_encoder(predictor) -> None:
    """int8 dynamic quantisation of the image encoder's linear layers (the bulk of its work), in place."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    predictor.image_encoder = quantize_dynamic(predictor.image_encoder, {torch.nn.Linear}, dtype=torch.qint8)


def save_checkpoint(predictor, path: str | Path) -> Path:
    """Write `{"model": state_dict}` atomically, the format load_model reads."""
    import torch

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": predictor.state_dict()}, partial)
    partial.replace(path)
    return path


def save_random_checkpoint(path: str | Path, image_size: int, seed: int = 0) -> Path:
    """MedSAM2's architecture at random init, with a config beside it fixing image_size.

    For tests, benchmarks and the module self-test: real weights cannot be downloaded everywhere.
    """
    import torch
    from omegaconf import OmegaConf

    path = Path(path)
    config = OmegaConf.load(DEFAULT_CONFIG)
    config.model.image_size = int(image_size)
    OmegaConf.save(config, path.with_suffix(".yaml"))
    torch.manual_seed(seed)
    return save_checkpoint(build_predictor(path.with_suffix(".yaml")), path)
