"""Train the small SAM2.1-family test model on procedural phantoms, deterministically, on two CPU threads.

The fixture exists so that tests can check that masks land on the prompted object and follow it through the
slices (no real MedSAM2 weights can be downloaded on test machines). It uses sam2's own model classes with
reduced sizes, built from a config in the same format as MedSAM2's, so it loads through the project's normal
loader. Two phases, with a step-based schedule so that a rerun gives the same weights:

1. Key slice only, many cheap samples: box (sometimes a click) on a random object of a random phantom, or a
   box on empty background → empty mask. Uses the prompt encoder and mask decoder exactly as the image
   predictor does, so the model learns to follow the prompt instead of segmenting "the salient blob".
2. Tracking: the key slice prompted by a box, a click or the true mask is the conditioning frame, then the
   next three slices in one direction (forward or backward) go through SAM2's track step with the memory
   bank; slices past the object's end teach the object-score head to stop. Half the steps also rehearse
   phase 1. What made tracking work: many short clips rather than fewer long ones, a higher learning rate
   for the memory path, no dropout, and one mask per tracked slice (before: memory ignored, 3D Dice ~0.4).

Losses as in SAM2: focal (x20) + dice (the best of the multimask outputs for clicks), L1 on the predicted
IoU, BCE on the object score. Run from the repository root:

    .venv/bin/python Testing/Training/train_phantom_model.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Sleep instead of spinning at OpenMP barriers: on a CPU shared with other jobs, spinning threads slowed
# training >10x. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedSAM2HITL"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms import LONG_SHAPES, TRAIN_SHAPES, Phantom, bounding_box, make_phantom, thick_slices  # noqa: E402

DATA = REPO / "Testing" / "Data"
IMAGE_SIZE = 128
SEED = 20241124
THREADS = 2
# Modules only tracking trains (phase 2); optimizer parameters without gradients are left alone in phase 1.
MEMORY_PATH = ("memory_attention", "memory_encoder", "obj_ptr", "maskmem_tpos_enc", "mask_downsample", "no_obj")
HEADER = """\
# Small SAM2.1-family model trained by MedSAM2HITL on procedural phantoms (a test fixture, not for clinical use).
# Written by Testing/Training/train_phantom_model.py from MedSAM2HITLLib/configs/medsam2_hiera_t512.yaml with
# reduced sizes; the loader sets the memory-attention RoPE feat_sizes to image_size/16.
"""


@dataclass(frozen=True)
class Schedule:
    key_steps: int = 1300  # phase 1
    key_batch: int = 16
    track_steps: int = 1500  # phase 2
    track_batch: int = 8
    track_frames: int = 4  # key slice + following slices; short clips, many of them (8 frames: 3D Dice 0.4)
    memory_lr_scale: float = 4.0  # the memory path starts untrained in phase 2 while the rest is trained
    key_rehearsal: float = 0.5  # share of phase-2 steps that also train on a phase-1 batch
    ending_fraction: float = 0.35  # tracking samples in which the object ends, so the object score learns to stop
    key_lr: float = 1e-3
    track_lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.05
    pool: int = 160  # phantoms kept in memory; one is replaced every other step
    negative_fraction: float = 0.12  # phase-1 boxes on empty background
    feature_rms: float = 1.0  # bound on the RMS of the stride-16 image features (see feature_penalty)
    empty_weight: float = 5.0  # extra loss on any foreground for phase-1 boxes on empty background
    interaction_steps: int = 1300  # stage 2 (phase 3), fine-tuning stage 1's weights
    interaction_lr: float = 2e-4
    interaction_frames: int = 6
    second_condition: float = 0.6  # phase-3 tracking samples with a second conditioning slice at the clip's far end
    correction_steps: int = 800  # stage 3 (phase 3 again), fine-tuning stage 2's weights
    far_leaks: bool = False  # leaks into any object on the slice, of any size (stage 3; stage 2: neighbours only)
    repair_steps: int = 400  # stage 4: slice-only, whole-object leaks and boxes (incl. empty ones), from stage 3
    crowded_leaks: bool = False  # leak samples on slices where another object is (stage 4: whole-object leaks)
    choice_steps: int = 700  # stage 5: a mask holding two objects, clicks saying which stays (mirrored pairs)


def small_config():
    """MedSAM2's config with the sizes reduced (see platform notes: widths must match across modules)."""
    from omegaconf import OmegaConf

    from MedSAM2HITLLib.model import DEFAULT_CONFIG

    cfg = OmegaConf.load(DEFAULT_CONFIG)
    m = cfg.model
    m.image_size = IMAGE_SIZE
    trunk = m.image_encoder.trunk
    trunk.embed_dim, trunk.num_heads, trunk.stages = 32, 1, [1, 1, 2, 1]
    trunk.global_att_blocks = [3]  # second block of stage 3; a pooling block here would divide by zero
    trunk.window_spec = [8, 4, 8, 4]
    trunk.window_pos_embed_bkg_spatial_size = [8, 8]
    neck = m.image_encoder.neck
    neck.d_model, neck.backbone_channel_list = 64, [256, 128, 64, 32]
    neck.position_encoding.num_pos_feats = 64
    attention = m.memory_attention
    attention.d_model, attention.num_layers = 64, 2
    layer = attention.layer
    layer.d_model, layer.dim_feedforward = 64, 256
    for name in ("self_attention", "cross_attention"):
        layer[name].embedding_dim = 64
        layer[name].feat_sizes = [IMAGE_SIZE // 16] * 2
    layer.cross_attention.kv_in_dim = 32
    encoder = m.memory_encoder
    encoder.out_dim, encoder.in_dim = 32, 64
    encoder.position_encoding.num_pos_feats = 32
    encoder.mask_downsampler.embed_dim = 64
    encoder.fuser.layer.dim = 64
    # One mask per tracked slice, the one trained: with SAM2's three, best-of-three training left the IoU head
    # unable to pick the tracked mask (held-out 3D Dice 0.4; the right mask was among the three).
    m.multimask_output_for_tracking = False
    m.sam_mask_decoder_extra_args.dynamic_multimask_via_stability = False
    layer.dropout = layer.self_attention.dropout = layer.cross_attention.dropout = 0.0
    return cfg


def write_config(path: Path) -> Path:
    from omegaconf import OmegaConf

    path.write_text(HEADER + OmegaConf.to_yaml(small_config()), encoding="utf-8")
    return path


class PhantomPool:
    """Phantoms of random size, modality and in-plane orientation, windowed to uint8 once; refreshed steadily.

    `varied` (stage 2) adds elongated and tubular objects, and thick-slice phantoms sliced along their other
    axes (short, wide slices), to the round objects seen axially that stage 1 learns from.
    """

    def __init__(self, size: int, rng: np.random.Generator, varied: bool = False):
        self.rng = rng
        self.varied = varied
        self.next_seed = 0
        self.items = [self._make() for _ in range(size)]

    def _phantom(self) -> tuple[Phantom, int]:
        """A phantom and the array axis to slice it along."""
        rng = self.rng
        seed = self.next_seed
        self.next_seed += 1
        variant = rng.random() if self.varied else 0.0
        if variant < 0.25:
            size = (int(rng.integers(40, 65)), int(rng.integers(64, 161)), int(rng.integers(64, 161)))
            return make_phantom(seed, size=size, modality=str(rng.choice(["ct", "mr"]))), 0
        modality = str(rng.choice(["ct", "mr"]))
        if variant < 0.6:  # long objects, sliced along any axis
            size = (int(rng.integers(48, 97)), int(rng.integers(64, 141)), int(rng.integers(64, 141)))
            return make_phantom(seed, size=size, modality=modality, shapes=LONG_SHAPES), int(rng.integers(0, 3))
        factor = int(rng.integers(2, 5))
        size = (int(rng.integers(18, 33)) * factor, int(rng.integers(64, 129)), int(rng.integers(64, 129)))
        phantom = make_phantom(seed, size=size, modality=modality, shapes=TRAIN_SHAPES + LONG_SHAPES)
        return thick_slices(phantom, factor), int(rng.choice([0, 1, 1, 2, 2]))

    def _make(self) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        from MedSAM2HITLLib.preprocessing import ct_window, parse_window

        rng = self.rng
        phantom, axis = self._phantom()
        if phantom.modality == "ct":  # the abdomen preset, jittered a little
            window = ct_window(400 * rng.uniform(0.8, 1.2), 40 + rng.uniform(-20, 20))
        else:
            window = parse_window("mr", phantom.volume)
        volume = np.moveaxis(window.to_uint8(phantom.volume), axis, 0)
        objects = tuple(np.moveaxis(o, axis, 0) for o in phantom.objects)
        for axis in (1, 2):
            if rng.random() < 0.5:
                volume = np.flip(volume, axis)
                objects = tuple(np.flip(o, axis) for o in objects)
        if rng.random() < 0.5:
            volume = volume.transpose(0, 2, 1)
            objects = tuple(o.transpose(0, 2, 1) for o in objects)
        return np.ascontiguousarray(volume), tuple(np.ascontiguousarray(o) for o in objects)

    def refresh(self) -> None:
        self.items[int(self.rng.integers(len(self.items)))] = self._make()

    def pick(self) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
        """A volume, all its objects and one of them (any object can be the prompt's target)."""
        volume, objects = self.items[int(self.rng.integers(len(self.items)))]
        return volume, objects, objects[int(self.rng.integers(len(objects)))]


def frames(volume_u8: np.ndarray, indices) -> "torch.Tensor":
    """Model input frames of some slices, made exactly as the engine makes them."""
    import torch

    from MedSAM2HITLLib.preprocessing import frame_tensor

    return torch.stack([frame_tensor(volume_u8[i], IMAGE_SIZE) for i in indices])


def resized_mask(mask2d: np.ndarray) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask2d.astype(np.float32))[None, None]
    return (F.interpolate(m, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False) > 0.5).float()[0]


def jittered_box(mask2d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The object's box with SAM-style noise (std 10 % of the side, at most 20 px), in model coordinates."""
    x0, y0, x1, y1 = bounding_box(mask2d)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    noise = rng.normal(0, 0.1, 4) * np.array([w, h, w, h])
    box = np.array([x0, y0, x1, y1], dtype=np.float64) + np.clip(noise, -20, 20)
    return _to_model(box, mask2d.shape)


def background_box(objects_here: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A box somewhere on this slice that touches no object (there may be none)."""
    rows, cols = objects_here.shape
    for _ in range(20):
        w, h = rng.integers(8, max(9, cols // 3)), rng.integers(8, max(9, rows // 3))
        x0, y0 = rng.integers(0, cols - w), rng.integers(0, rows - h)
        if not objects_here[y0:y0 + h, x0:x0 + w].any():
            return _to_model(np.array([x0, y0, x0 + w - 1, y0 + h - 1], dtype=np.float64), (rows, cols))
    return None


def click(mask2d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A positive click at a random pixel of the object, in model coordinates."""
    ys, xs = np.nonzero(mask2d)
    i = int(rng.integers(len(ys)))
    return _to_model(np.array([xs[i], ys[i]], dtype=np.float64), mask2d.shape)


def _to_model(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Slice pixels → model pixels, as sam2's predictors scale prompts (x / width * image_size)."""
    rows, cols = shape
    scale = np.array([IMAGE_SIZE / cols, IMAGE_SIZE / rows] * (len(xy) // 2))
    return (xy * scale).astype(np.float32)


def prompt_points(kind: str, coords: list[np.ndarray]) -> dict:
    import torch

    if kind == "box":
        points = torch.from_numpy(np.stack(coords)).view(-1, 2, 2)
        labels = torch.tensor([[2, 3]], dtype=torch.int32).repeat(len(coords), 1)
    else:
        points = torch.from_numpy(np.stack(coords)).view(-1, 1, 2)
        labels = torch.ones(len(coords), 1, dtype=torch.int32)
    return {"point_coords": points, "point_labels": labels}


def mask_losses(logits, target, ious, object_logits):
    """SAM2's loss for one frame: best-of-multimask focal x20 + dice, IoU L1, object-score BCE.

    logits: B x M x S x S, target: B x 1 x S x S, ious: B x M, object_logits: B x 1. Mask terms count only
    where the object is present.
    """
    import torch
    import torch.nn.functional as F

    prob = logits.sigmoid()
    target_m = target.expand_as(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target_m, reduction="none")
    p_t = prob * target_m + (1 - prob) * (1 - target_m)
    alpha_t = 0.25 * target_m + 0.75 * (1 - target_m)
    focal = (alpha_t * ce * (1 - p_t) ** 2).mean(dim=(2, 3))
    inter = (prob * target_m).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(2, 3)) + target_m.sum(dim=(2, 3)) + 1)
    combined = 20 * focal + dice
    best = combined.argmin(dim=1)
    rows = torch.arange(len(best))
    hard = (logits > 0).float()
    true_iou = (hard * target_m).sum(dim=(2, 3)) / ((hard + target_m).clamp(max=1).sum(dim=(2, 3))).clamp(min=1)
    present = (target.flatten(1).amax(dim=1) > 0).float()
    n = present.sum().clamp(min=1)
    mask_loss = (combined[rows, best] * present).sum() / n
    iou_loss = ((ious - true_iou).abs().mean(dim=1) * present).sum() / n
    object_loss = F.binary_cross_entropy_with_logits(object_logits[:, 0], present)
    return mask_loss + iou_loss + object_loss, mask_loss.item(), object_loss.item()


def feature_penalty(features, bound: float):
    """Hinge on the RMS of the image embedding the decoder and memory attention read.

    The mask decoder locates prompts by adding a bounded (sin/cos) positional encoding to the image tokens;
    trained from scratch without this, the token norm grew to ~150 against ~6 for the encoding, the prompt's
    position was drowned and the model segmented the most salient blob whatever the box (held-out key-slice
    Dice after phase 1: 0.36 without the bound, 0.81 with it).
    """
    return (features.pow(2).mean() - bound**2).clamp(min=0)


def decode_slices(model, images: list, points: dict, masks, multimask: bool):
    """Image encoder, prompt encoder and mask decoder on single slices, as the image predictor runs them.

    points: coordinates B x N x 2 and labels B x N (box corners 2/3 first, then clicks 1/0); masks: mask-prompt
    logits B x 1 x S/4 x S/4 or None. Returns logits at the model's input size, IoU and object-score predictions,
    and the backbone features (for the feature bound).
    """
    import torch
    import torch.nn.functional as F

    backbone = model.forward_image(torch.stack(images))
    _, feats, _, sizes = model._prepare_backbone_features(backbone)
    b = len(images)
    embed = (feats[-1] + model.no_mem_embed).permute(1, 2, 0).view(b, -1, *sizes[-1])
    high_res = [f.permute(1, 2, 0).view(b, -1, *s) for f, s in zip(feats[:-1], sizes[:-1])]
    sparse, dense = model.sam_prompt_encoder(
        points=(points["point_coords"], points["point_labels"]), boxes=None, masks=masks
    )
    low_res, ious, _, object_logits = model.sam_mask_decoder(
        image_embeddings=embed,
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=False,
        high_res_features=high_res,
    )
    logits = F.interpolate(low_res, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return logits, ious, object_logits, feats


def key_slice_step(model, pool: PhantomPool, schedule: Schedule, rng: np.random.Generator):
    """Phase 1: prompt encoder + mask decoder on single slices, the image predictor's path."""
    import torch
    import torch.nn.functional as F

    kind = "click" if rng.random() < 0.3 else "box"
    images, targets, coords = [], [], []
    while len(images) < schedule.key_batch:
        volume, objects, obj = pool.pick()
        present = np.flatnonzero(obj.sum(axis=(1, 2)) >= 6)
        if present.size == 0:
            continue
        if kind == "box" and rng.random() < schedule.negative_fraction:
            index = int(rng.integers(volume.shape[0]))
            box = background_box(np.logical_or.reduce([o[index] for o in objects]), rng)
            if box is None:
                continue
            coords.append(box)
            targets.append(torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE))
        else:
            index = int(rng.choice(present))
            coords.append(jittered_box(obj[index], rng) if kind == "box" else click(obj[index], rng))
            targets.append(resized_mask(obj[index]))
        images.append(frames(volume, [index])[0])
    points = prompt_points(kind, coords)
    logits, ious, object_logits, feats = decode_slices(model, images, points, None, multimask=kind == "click")
    # Supervise the raw masks even without an object: the image predictor ignores the object score.
    target = torch.stack(targets)
    loss, mask_loss, object_loss = mask_losses(logits, target, ious, object_logits)
    loss = loss + feature_penalty(feats[-1], schedule.feature_rms)
    empty = (target.flatten(1).amax(dim=1) == 0).float()
    if empty.any():
        empty_focal = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
        loss = loss + schedule.empty_weight * (empty_focal.mean(dim=(1, 2, 3)) * empty).sum() / empty.sum()
    return loss, mask_loss, object_loss


def tracking_step(model, pool: PhantomPool, schedule: Schedule, rng: np.random.Generator,
                  second_condition: bool = False):
    """Phase 2: conditioning key slice, then the following slices through the memory bank (one direction).

    With `second_condition` (phase 3) the clip's last slice is a second conditioning slice (its true mask, as a
    user's corrected slice) and the slices between are tracked with both in the memory bank, the way the
    engine propagates between two conditioning slices.
    """
    import torch

    kind = str(rng.choice(["box", "mask", "click"], p=[0.6, 0.3, 0.1]))
    reverse = bool(rng.random() < 0.5)
    t = schedule.interaction_frames if second_condition else schedule.track_frames
    samples = []
    while len(samples) < schedule.track_batch:
        volume, _, obj = pool.pick()
        depth = volume.shape[0]
        areas = obj.sum(axis=(1, 2))
        candidates = np.flatnonzero(areas >= max(6, 0.25 * areas.max()))
        candidates = candidates[(candidates - (t - 1) >= 0) if reverse else (candidates + t - 1 < depth)]
        if second_condition:  # the object is there on the far conditioning slice too
            far = candidates - (t - 1) if reverse else candidates + t - 1
            candidates = candidates[areas[far] >= 6]
        elif rng.random() < schedule.ending_fraction:  # the object ends inside the tracked slices
            last = np.flatnonzero(areas)[0 if reverse else -1]
            candidates = candidates[np.abs(last - candidates) <= t - 2]
        if candidates.size == 0:
            continue
        key = int(rng.choice(candidates))
        samples.append((volume, obj, key))
    step = -1 if reverse else 1
    images = torch.stack([frames(v, [k + step * i for i in range(t)]) for v, _, k in samples], dim=1)
    b = len(samples)
    backbone = model.forward_image(images.flatten(0, 1))  # frame-major: [t0 of all samples, t1 ...]
    _, feats, pos, sizes = model._prepare_backbone_features(backbone)
    depth = min(v.shape[0] for v, _, _ in samples)
    output = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    total, mask_sum, object_sum, scored = 0, 0.0, 0.0, 0
    base = depth - 1 if reverse else 0  # frame numbers as the video predictor sees them
    conditioning = [0, t - 1] if second_condition else [0]
    for i in conditioning + [i for i in range(t) if i not in conditioning]:
        frame_idx = base + step * i
        frame_feats = [f[:, i * b:(i + 1) * b] for f in feats]
        frame_pos = [p[:, i * b:(i + 1) * b] for p in pos]
        target = torch.stack([resized_mask(o[k + step * i]) for _, o, k in samples])
        point_inputs = mask_inputs = None
        if i == 0 and kind != "mask":
            maker = (lambda m: jittered_box(m, rng)) if kind == "box" else (lambda m: click(m, rng))
            point_inputs = prompt_points(kind, [maker(o[k]) for _, o, k in samples])
        elif i in conditioning:
            mask_inputs = target
        current, sam_outputs, _, _ = model._track_step(
            frame_idx, i in conditioning, frame_feats, frame_pos, sizes, point_inputs, mask_inputs, output, depth,
            reverse, None,
        )
        multimasks, high_res_multimasks, ious, low_res, high_res, obj_ptr, object_logits = sam_outputs
        current.update(pred_masks=low_res, pred_masks_high_res=high_res, obj_ptr=obj_ptr)
        model._encode_memory_in_output(frame_feats, sizes, point_inputs, True, high_res, object_logits, current)
        output["cond_frame_outputs" if i in conditioning else "non_cond_frame_outputs"][frame_idx] = current
        if mask_inputs is not None:
            continue  # the mask prompt is passed through as the output: nothing to learn on this frame
        loss, mask_loss, object_loss = mask_losses(high_res_multimasks, target, ious, object_logits)
        total = total + loss
        mask_sum += mask_loss
        object_sum += object_loss
        scored += 1
    total = total / scored + feature_penalty(feats[-1], schedule.feature_rms)
    return total, mask_sum / scored, object_sum / scored


def tracking_with_key_rehearsal(model, pool: PhantomPool, schedule: Schedule, rng: np.random.Generator):
    """Phase 2 step: tracking, plus on some steps a phase-1 batch so the box → mask path is not forgotten.

    Measured after phase 1 at 0.81 held-out key-slice Dice: 400 tracking steps gave 0.87 with the rehearsal; the
    first recipe's 800 without it ended at 0.77.
    """
    loss, mask_loss, object_loss = tracking_step(model, pool, schedule, rng)
    if rng.random() < schedule.key_rehearsal:
        loss = loss + key_slice_step(model, pool, schedule, rng)[0]
    return loss, mask_loss, object_loss


INTERACTIONS = ("click", "clicks", "box_clicks", "leak", "miss")
INTERACTION_SHARES = (0.2, 0.15, 0.1, 0.4, 0.15)
REPAIR_SHARES = (0.1, 0.15, 0.1, 0.55, 0.1)


def _pixel(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random pixel of a non-empty 2D region, as slice (x, y)."""
    ys, xs = np.nonzero(region)
    i = int(rng.integers(len(ys)))
    return np.array([xs[i], ys[i]], dtype=np.float64)


def _disc(shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.hypot(xx - centre[0], yy - centre[1]) <= radius


def _near(target: np.ndarray, margin: float) -> np.ndarray:
    """Pixels within the target's box grown by `margin` of its size (where a user's wrong click would land)."""
    x0, y0, x1, y1 = bounding_box(target)
    mx, my = margin * (x1 - x0 + 1) + 3, margin * (y1 - y0 + 1) + 3
    near = np.zeros_like(target)
    near[max(0, int(y0 - my)):int(y1 + my) + 1, max(0, int(x0 - mx)):int(x1 + mx) + 1] = True
    return near


def corrupted_mask(kind: str, target: np.ndarray, others: list[np.ndarray], rng: np.random.Generator,
                   far_leaks: bool = False):
    """(previous mask, the region a correcting click goes in) for a leak or a miss, or None if this slice has none.

    A leak adds a whole neighbouring object (a leaked distractor; with `far_leaks` any object on the slice, so a
    leak larger than the target is common) or a bulge outside the target; a miss cuts a bite out of the target.
    Neither stage taught negative clicks to remove a whole leaked distractor on held-out phantoms (see
    Testing/Data/README.md).
    """
    radius = np.sqrt(target.sum() / np.pi)
    edge = target & ~np.roll(target, 1, 0) | target & ~np.roll(target, 1, 1)
    if kind == "leak":
        near = _near(target, 0.8)
        neighbours = [o for o in others if o.any() and (far_leaks or (o & near).any())]
        if neighbours and rng.random() < 0.7:
            wrong = neighbours[int(rng.integers(len(neighbours)))]
        else:
            bulge = rng.uniform(0.5, 1.3) if far_leaks else rng.uniform(0.4, 0.9)
            wrong = _disc(target.shape, _pixel(edge, rng), radius * bulge) & ~target
        wrong &= ~np.logical_or.reduce([target, *others])
        if wrong.sum() < 6:
            return None
        return target | wrong, wrong
    wrong = _disc(target.shape, _pixel(edge, rng), radius * rng.uniform(0.5, 0.9)) & target
    if wrong.sum() < max(6, 0.12 * target.sum()) or wrong.sum() > 0.7 * target.sum():
        return None
    return target & ~wrong, wrong


def interaction_key_step(model, pool: PhantomPool, schedule: Schedule, rng: np.random.Generator):
    """Phase 3 on single slices: clicks alone, clicks with a box, and clicks that correct the slice's current mask.

    One kind of interaction per step (so prompts stack into a batch). The current mask goes in as mask-prompt
    logits made by the engine's own function; a correcting click lies in what the mask got wrong: a negative
    click on a leak (a neighbouring object or a bulge), a positive click in a missed bite.
    """
    import torch

    from MedSAM2HITLLib.preprocessing import mask_prompt_logits

    kind = str(rng.choice(INTERACTIONS, p=REPAIR_SHARES if schedule.crowded_leaks else INTERACTION_SHARES))
    with_box = kind == "box_clicks" or (kind in ("leak", "miss") and rng.random() < 0.5)
    positives = {"click": 1, "clicks": int(rng.integers(1, 4)), "box_clicks": 1, "leak": 0, "miss": 1}[kind]
    negatives = {"click": 0, "clicks": int(rng.integers(0, 3)), "box_clicks": int(rng.integers(0, 2)), "leak": 1,
                 "miss": 0}[kind]
    if kind == "clicks" and positives + negatives == 1:
        negatives = 1
    images, targets, coords, labels, masks = [], [], [], [], []
    while len(images) < schedule.key_batch:
        volume, objects, obj = pool.pick()
        present = np.flatnonzero(obj.sum(axis=(1, 2)) >= 20)
        if kind == "leak" and schedule.crowded_leaks:  # a slice where another object can leak in whole, if any
            crowded = np.logical_or.reduce([o[present].sum(axis=(1, 2)) >= 20 for o in objects if o is not obj]
                                           + [np.zeros(present.size, bool)])
            present = present[crowded] if crowded.any() else present
        if present.size == 0:
            continue
        index = int(rng.choice(present))
        target = obj[index]
        others = [o[index] for o in objects if o is not obj]
        points, point_labels, previous = [], [], None
        if kind in ("leak", "miss"):
            corrupted = corrupted_mask(kind, target, others, rng, schedule.far_leaks)
            if corrupted is None:
                continue
            previous, wrong = corrupted
            points += [_pixel(wrong, rng) for _ in range(positives + negatives)]
            point_labels += [1 if kind == "miss" else 0] * (positives + negatives)
        else:
            points += [_pixel(target, rng) for _ in range(positives)]
            outside = (np.logical_or.reduce([_near(target, 0.5), *others])) & ~target
            points += [_pixel(outside, rng) for _ in range(negatives)]
            point_labels += [1] * positives + [0] * negatives
        xy = [_to_model(p, target.shape) for p in points]
        if with_box:
            boxed = previous if kind == "leak" and rng.random() < 0.5 else target
            xy = list(jittered_box(boxed, rng).reshape(2, 2)) + xy
            point_labels = [2, 3] + point_labels
        coords.append(np.stack(xy))
        labels.append(point_labels)
        masks.append(None if previous is None else mask_prompt_logits(previous, IMAGE_SIZE))
        targets.append(resized_mask(target))
        images.append(frames(volume, [index])[0])
    points = {"point_coords": torch.from_numpy(np.stack(coords)).float(),
              "point_labels": torch.tensor(labels, dtype=torch.int32)}
    mask_inputs = None if masks[0] is None else torch.stack(masks)
    multimask = kind == "click"
    logits, ious, object_logits, feats = decode_slices(model, images, points, mask_inputs, multimask)
    loss, mask_loss, object_loss = mask_losses(logits, torch.stack(targets), ious, object_logits)
    return loss + feature_penalty(feats[-1], schedule.feature_rms), mask_loss, object_loss


def repair_step(model, pool: PhantomPool, schedule: Schedule, rng: np.random.Generator):
    """Stage 4 step: corrections on a slice (most of them whole-object leaks) and a box batch (with boxes on
    empty background): what stage 3 left weak, the click deciding which object stays, and box sensitivity."""
    loss, mask_loss, object_loss = interaction_key_step(model, pool, schedule, rng)
    return loss + key_slice_step(model, pool, schedule, rng)[0], mask_loss, object_loss


def _two_objects(pool: PhantomPool, rng: np.random.Generator):
    """A volume, a slice and two different objects on it (≥ 20 pixels each), in random order."""
    while True:
        volume, objects, _ = pool.pick()
        present = np.stack([o.sum(axis=(1, 2)) >= 20 for o in objects])
        crowded = np.flatnonzero(present.sum(axis=0) >= 2)
        if crowded.size:
            index = int(rng.choice(crowded))
            first, second = rng.choice(np.flatnonzero(present[:, index]), 2, replace=False)
            return volume, index, objects[int(first)][index], objects[int(second)][index]


def choice_step(model, pool: PhantomPool, schedule: Schedule, rng: np.random.Generator):
    """Stage 5: the slice's mask holds two whole objects; the clicks say which one stays, in mirrored pairs.

    Each pair is one slice and one mask input (both objects) twice: a negative click on B (with a positive
    click on A on half of the steps) must give A, and the same clicks with the labels swapped must give B. So
    only the labels decide: stage 4's model had learned to drop the smaller attached part whatever the label (a
    negative click removed 48 % of a leaked neighbour). A box batch follows every step, to keep box
    sensitivity, stage 4's corrections 30 % of them and stage 2's tracking half of them.
    """
    import torch

    from MedSAM2HITLLib.preprocessing import mask_prompt_logits

    with_positive = rng.random() < 0.5
    with_box = rng.random() < 0.2
    images, targets, coords, labels, masks = [], [], [], [], []
    while len(images) < schedule.key_batch:
        volume, index, a, b = _two_objects(pool, rng)
        both = mask_prompt_logits(a | b, IMAGE_SIZE)
        image = frames(volume, [index])[0]
        for keep, drop in ((a, b), (b, a)):
            points = [_pixel(drop, rng)] + ([_pixel(keep, rng)] if with_positive else [])
            xy = [_to_model(p, keep.shape) for p in points]
            point_labels = [0] + ([1] if with_positive else [])
            if with_box:
                xy = list(jittered_box(keep, rng).reshape(2, 2)) + xy
                point_labels = [2, 3] + point_labels
            coords.append(np.stack(xy))
            labels.append(point_labels)
            masks.append(both)
            targets.append(resized_mask(keep))
            images.append(image)
    points = {"point_coords": torch.from_numpy(np.stack(coords)).float(),
              "point_labels": torch.tensor(labels, dtype=torch.int32)}
    logits, ious, object_logits, feats = decode_slices(model, images, points, torch.stack(masks), False)
    loss, mask_loss, object_loss = mask_losses(logits, torch.stack(targets), ious, object_logits)
    loss = loss + feature_penalty(feats[-1], schedule.feature_rms) + key_slice_step(model, pool, schedule, rng)[0]
    if rng.random() < 0.3:  # the other clicks and corrections, rehearsed
        loss = loss + interaction_key_step(model, pool, schedule, rng)[0]
    if rng.random() < 0.5:  # and tracking, which slice-only training lets slip along the short slice axes
        second = bool(rng.random() < schedule.second_condition)
        loss = loss + tracking_step(model, pool, schedule, rng, second_condition=second)[0]
    return loss, mask_loss, object_loss


def interaction_step(model, pool: PhantomPool, schedule: Schedule, rng: np.random.Generator):
    """Phase 3 step: corrections on a slice, tracking (often between two conditioning slices), and a box batch."""
    second = bool(rng.random() < schedule.second_condition)
    loss, mask_loss, object_loss = tracking_step(model, pool, schedule, rng, second_condition=second)
    loss = loss + interaction_key_step(model, pool, schedule, rng)[0]
    if rng.random() < 0.3:
        loss = loss + key_slice_step(model, pool, schedule, rng)[0]
    return loss, mask_loss, object_loss


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


# The stages after the first, each fine-tuning the previous stage's weights: its phase's name, the Schedule field
# with its number of steps, its step function, and its leak samples (Schedule.far_leaks, .crowded_leaks).
LATER_STAGES = {
    2: ("interaction", "interaction_steps", interaction_step, {}),
    3: ("corrections", "correction_steps", interaction_step, {"far_leaks": True}),
    4: ("repair", "repair_steps", repair_step, {"far_leaks": True, "crowded_leaks": True}),
    5: ("choice", "choice_steps", choice_step, {"far_leaks": True, "crowded_leaks": True}),
}


def train(schedule: Schedule, out: Path, log_every: int = 25, init: Path | None = None, stage: int = 1) -> Path:
    """Stage 1 (phases 1 and 2) from random weights; each later stage from the previous stage's checkpoint
    `init`: 2 phase 3, 3 phase 3 with far leaks, 4 repairs on single slices, 5 mirrored click choices."""
    import dataclasses

    import torch

    from MedSAM2HITLLib.model import build_predictor, save_checkpoint

    if (init is None) != (stage == 1):
        raise ValueError("stage 1 starts from random weights; stages 2-5 need the previous stage's checkpoint")
    seed = SEED + stage - 1
    if stage > 1:
        phase, steps_field, stage_step, leaks = LATER_STAGES[stage]
        schedule = dataclasses.replace(schedule, interaction_steps=getattr(schedule, steps_field), **leaks)
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = write_config(out.with_suffix(".yaml"))
    model = build_predictor(config)
    model.train()
    if init is not None:
        model.load_state_dict(torch.load(init, map_location="cpu", weights_only=True)["model"])
        # Inference's rules for the memory bank (object pointers from past slices only, masks from prompts
        # binarised), so that tracking between two conditioning slices learns what the engine will run.
        model.training = False
    pool = PhantomPool(schedule.pool, rng, varied=stage > 1)
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        decays = parameter.ndim > 1 and "pos_embed" not in name
        groups.setdefault((decays, name.startswith(MEMORY_PATH)), []).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "weight_decay": schedule.weight_decay if decays else 0.0,
             "lr_scale": schedule.memory_lr_scale if memory else 1.0}
            for (decays, memory), params in groups.items()
        ],
        lr=schedule.key_lr,
    )
    started = time.perf_counter()
    phases = [
        ("key", schedule.key_steps, schedule.key_lr, key_slice_step),
        ("track", schedule.track_steps, schedule.track_lr, tracking_with_key_rehearsal),
    ] if stage == 1 else [
        (phase, schedule.interaction_steps, schedule.interaction_lr, stage_step),
    ]
    for name, steps, peak, step_fn in phases:
        for step in range(steps):
            lr = learning_rate(step, steps, peak, schedule.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss, mask_loss, object_loss = step_fn(model, pool, schedule, rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 2:
                pool.refresh()
            if step % log_every == 0 or step == steps - 1:
                print(
                    f"{name} {step:5d}/{steps} loss {loss.item():.4f} mask {mask_loss:.4f} object {object_loss:.4f} "
                    f"lr {lr:.2e} {time.perf_counter() - started:7.1f}s",
                    flush=True,
                )
    model.eval()
    save_checkpoint(model, out)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB) and {config.name} in {time.perf_counter() - started:.0f}s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DATA / "phantom_sam2.pt", help="checkpoint to write")
    parser.add_argument("--stage", choices=("1", *map(str, LATER_STAGES), "all"), default="all",
                        help="1: phases 1-2 from random weights; 2-5: from --init, the previous stage's "
                             "checkpoint; all: the five in turn (about 80 min)")
    parser.add_argument("--init", type=Path, help="the previous stage's checkpoint, for --stage 2-5")
    parser.add_argument("--key-steps", type=int, default=Schedule.key_steps)
    parser.add_argument("--track-steps", type=int, default=Schedule.track_steps)
    parser.add_argument("--interaction-steps", type=int, default=Schedule.interaction_steps)
    parser.add_argument("--correction-steps", type=int, default=Schedule.correction_steps)
    args = parser.parse_args()
    schedule = Schedule(key_steps=args.key_steps, track_steps=args.track_steps,
                        interaction_steps=args.interaction_steps, correction_steps=args.correction_steps)
    if args.stage != "all":
        if (args.init is None) != (args.stage == "1"):
            parser.error("--stage 2-5 need --init, the checkpoint the previous stage wrote (stage 1 none)")
        train(schedule, args.out, init=args.init, stage=int(args.stage))
        return
    previous = None
    for stage in (1, *LATER_STAGES):
        out = args.out if stage == max(LATER_STAGES) else args.out.with_name(f"{args.out.stem}_stage{stage}.pt")
        previous = train(schedule, out, init=previous, stage=stage)


if __name__ == "__main__":
    main()
