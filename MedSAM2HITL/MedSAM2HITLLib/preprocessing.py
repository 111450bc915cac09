"""Intensity windows and model input frames, as MedSAM2 prepares them.

A window is computed once per volume (MR percentiles need the whole volume); each slice is then mapped to
0..255, made 3-channel, resized to the model's image_size and normalised with ImageNet mean/std when the
model asks for it. Nothing here writes into the caller's array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BadInputError

CT_PRESETS: dict[str, tuple[float, float]] = {  # name: (width, level) in HU
    "abdomen": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "brain": (80.0, 40.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
}
MR_PERCENTILES = (0.5, 99.5)
PERCENTILE_SAMPLE = 1 << 24  # voxels sampled for MR percentiles; larger volumes are strided
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class IntensityWindow:
    """Values in [low, high] map linearly to 0..255; `keep_zero` keeps background zeros at 0 (MR)."""

    low: float
    high: float
    keep_zero: bool = False

    def to_uint8(self, image: np.ndarray) -> np.ndarray:
        scale = 255.0 / max(self.high - self.low, 1e-6)
        scaled = (np.clip(image.astype(np.float32), self.low, self.high) - self.low) * scale
        out = np.rint(scaled).astype(np.uint8)
        if self.keep_zero:
            out[image == 0] = 0
        return out


def ct_window(width: float, level: float) -> IntensityWindow:
    """Width and level in HU; NaN or infinite ones would map every voxel to one grey value."""
    if not (np.isfinite(width) and np.isfinite(level)):
        raise BadInputError(f"window width and level must be finite numbers, got {width},{level}")
    if not width > 0:
        raise BadInputError(f"window width must be positive, got {width}")
    return IntensityWindow(level - width / 2.0, level + width / 2.0)


def mr_window(volume: np.ndarray) -> IntensityWindow:
    """0.5–99.5 percentiles of the non-zero voxels (a strided sample of very large volumes)."""
    flat = volume.reshape(-1)
    if flat.size > PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // PERCENTILE_SAMPLE)]
    nonzero = flat[flat != 0]
    if nonzero.size == 0:
        return IntensityWindow(0.0, 1.0, keep_zero=True)
    low, high = np.percentile(nonzero, MR_PERCENTILES)
    if high <= low:
        high = low + 1.0
    return IntensityWindow(float(low), float(high), keep_zero=True)


def window_names() -> list[str]:
    return [*CT_PRESETS, "mr"]


def parse_window(spec, volume: np.ndarray) -> IntensityWindow:
    """A preset name, 'mr', 'W,L' or a (width, level) pair → the window for this volume."""
    if isinstance(spec, IntensityWindow):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return ct_window(float(spec[0]), float(spec[1]))
    text = str(spec).strip().lower()
    if text in CT_PRESETS:
        return ct_window(*CT_PRESETS[text])
    if text == "mr":
        return mr_window(volume)
    parts = text.split(",")
    if len(parts) == 2:
        try:
            width, level = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            return ct_window(width, level)
    raise BadInputError(
        f"unknown intensity window '{spec}': use one of {', '.join(window_names())} or 'W,L' (e.g. 400,40)"
    )


def frame_tensor(slice_u8: np.ndarray, image_size: int, device=None):
    """uint8 HxW slice → float tensor 3 x S x S, scaled to [0, 1] and ImageNet-normalised."""
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(np.ascontiguousarray(slice_u8)).to(device=device, dtype=torch.float32)
    image = image.div_(255.0)[None, None]
    image = F.interpolate(image, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    return ((image.expand(-1, 3, -1, -1) - mean) / std)[0]


def mask_prompt_logits(mask2d: np.ndarray, image_size: int, device=None):
    """A slice's mask as SAM2's mask-prompt input (1 x S/4 x S/4 logits), made as sam2's video predictor makes a
    mask into logits (resized to the model input, then ±10): the current mask of a slice that clicks refine."""
    import torch
    import torch.nn.functional as F

    mask = torch.from_numpy(np.ascontiguousarray(mask2d, dtype=np.float32)).to(device)[None, None]
    mask = (F.interpolate(mask, size=(image_size, image_size), mode="bilinear", align_corners=False) >= 0.5).float()
    low_res = (image_size // 4,) * 2
    return F.interpolate(mask * 20.0 - 10.0, size=low_res, mode="bilinear", align_corners=False, antialias=True)[0]
