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
            "parameters": sum(p.numel() for p in self.predictor.parameters()),
        }


def config_for(checkpoint: Path) -> Path:
    """A `<name>.yaml` beside the checkpoint wins; otherwise the MedSAM2 config."""
    sibling = checkpoint.with_suffix(".yaml")
    return sibling if sibling.is_file() else DEFAULT_CONFIG


def read_state_dict(checkpoint: Path) -> dict:
    """The `{"model": state_dict}` of a checkpoint, or a ModelError naming the file and the problem."""
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
    return content["model"]


def build_predictor(config: Path, image_size: int | None = None):
    """Instantiate the (untrained) SAM2VideoPredictor described by a config file."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    model_cfg = cfg.model
    if image_size is not None:
        model_cfg.image_size = int(image_size)
    size = int(model_cfg.image_size)
    if size % 32:
        raise BadInputError(f"image_size must be a multiple of 32, got {size}")
    rope = [size // BACKBONE_STRIDES[-1]] * 2
    layer = model_cfg.memory_attention.layer
    layer.self_attention.feat_sizes = rope
    layer.cross_attention.feat_sizes = rope
    model_cfg._target_ = "sam2.sam2_video_predictor.SAM2VideoPredictor"
    return instantiate(model_cfg, _recursive_=True)


def load_model(
    checkpoint: str | Path,
    config: str | Path | None = None,
    device: str = "auto",
    image_size: int | None = None,
) -> LoadedModel:
    """Build the model, load the checkpoint strictly and move it to the device in eval mode."""
    from .device import resolve_device

    checkpoint = Path(checkpoint)
    config = Path(config) if config else config_for(checkpoint)
    torch_device = resolve_device(device)
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
    return LoadedModel(predictor, torch_device, int(predictor.image_size), checkpoint, config)


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
