"""Procedural 3D phantoms with a known target, for training and testing a small SAM2-family model.

A phantom is a slice stack (axis 0 = slices) of a body region with a few objects that drift, turn and change
size from slice to slice: one target and look-alike distractors. A distractor either differs clearly from the
target in intensity, or looks like it ("twin") but lies far away, so a prompt plus memory can tell them apart.
CT-like phantoms are int16 Hounsfield units (air -1000, soft tissue ~40, made for the abdomen window); MR-like
ones are non-negative float32 with a multiplicative bias field and Rician noise (made for the percentile window).

`held_out=True` draws shapes and orientations the training distribution never contains (lobed outlines,
rounded rectangles, other in-plane angles, steeper drift), for evaluation. `shapes=LONG_SHAPES` draws elongated
and tubular objects instead, and `thick_slices` turns a phantom into a thick-slice (anisotropic) one, to be viewed
along its other axes. Only numpy is used, and the same
seed always gives the same phantom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODALITIES = ("ct", "mr")
WINDOWS = {"ct": "abdomen", "mr": "mr"}  # the window each modality is made for (names of the engine's presets)
TRAIN_SHAPES = ("ellipse", "blob")
HELD_OUT_SHAPES = ("lobed", "rounded_rectangle")
LONG_SHAPES = ("elongated", "tube")  # in-plane aspect down to 1:5; thin and crossing most slices, running obliquely
TWISTED_SHAPES = ("twisted",)  # a bar that turns by 60-120° and drifts fast over its slices (evaluation only)
MIN_TARGET_SLICES = 14


@dataclass(frozen=True)
class Phantom:
    """A volume (slices along axis 0), its target mask and the masks of its distractor objects."""

    volume: np.ndarray
    mask: np.ndarray
    distractors: tuple[np.ndarray, ...]
    modality: str
    seed: int
    held_out: bool

    @property
    def window(self) -> str:
        return WINDOWS[self.modality]

    @property
    def key_index(self) -> int:
        """The slice (axis 0) where the target is largest: where a user would draw the box."""
        return int(np.argmax(self.mask.sum(axis=(1, 2))))

    @property
    def objects(self) -> tuple[np.ndarray, ...]:
        """Target first, then distractors: any of them can be a prompt's object."""
        return (self.mask, *self.distractors)

    def box(self, index: int | None = None, mask: np.ndarray | None = None) -> tuple[int, int, int, int]:
        """Tight (x_min, y_min, x_max, y_max) box, inclusive pixels, of an object (default the target) on a slice."""
        index = self.key_index if index is None else index
        return bounding_box((self.mask if mask is None else mask)[index])


def bounding_box(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive (x_min, y_min, x_max, y_max) of a non-empty 2D mask; x is the column."""
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        raise ValueError("bounding_box of an empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


@dataclass(frozen=True)
class _Shape:
    """An object's path through the slices: centre, radii, angle and outline, all smooth in z."""

    kind: str
    z_mid: float
    half_length: float
    centre: tuple[float, float]  # (y, x) at z_mid
    velocity: tuple[float, float]  # pixels per slice
    curvature: tuple[float, float]
    radii: tuple[float, float]  # (along u, along v) at the widest slice
    taper: float  # profile exponent: small = cylinder-like, 1 = ellipsoid
    angle: float
    spin: float  # radians per slice
    harmonics: tuple[tuple[int, float, float, float], ...]  # (order, amplitude, phase, phase drift per slice)

    def z_range(self, depth: int) -> range:
        return range(max(0, int(np.ceil(self.z_mid - self.half_length))),
                     min(depth, int(np.floor(self.z_mid + self.half_length)) + 1))

    def raster(self, shape: tuple[int, int, int]) -> np.ndarray:
        depth, height, width = shape
        mask = np.zeros(shape, dtype=bool)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        for z in self.z_range(depth):
            t = z - self.z_mid
            scale = max(0.0, 1.0 - (t / self.half_length) ** 2) ** (0.5 * self.taper)
            if scale <= 0.05:
                continue
            cy = self.centre[0] + self.velocity[0] * t + self.curvature[0] * t * t
            cx = self.centre[1] + self.velocity[1] * t + self.curvature[1] * t * t
            angle = self.angle + self.spin * t
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / (self.radii[0] * scale)
            v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (self.radii[1] * scale)
            if self.kind == "rounded_rectangle":
                mask[z] = np.abs(u) ** 4 + np.abs(v) ** 4 <= 1.0
                continue
            outline = np.ones_like(u)
            phi = np.arctan2(v, u)
            for order, amplitude, phase, drift in self.harmonics:
                outline += amplitude * np.cos(order * phi + phase + drift * t)
            mask[z] = np.hypot(u, v) <= outline
        return mask


def _random_shape(rng: np.random.Generator, size: tuple[int, int, int], held_out: bool, shapes: tuple[str, ...] | None,
                  centre: tuple[float, float], radius_range: tuple[float, float]) -> _Shape:
    depth, height, width = size
    kind = str(rng.choice(shapes or (HELD_OUT_SHAPES if held_out else TRAIN_SHAPES)))
    half_length = rng.uniform(MIN_TARGET_SLICES / 2 + 1, max(MIN_TARGET_SLICES / 2 + 2, 0.42 * depth))
    z_mid = rng.uniform(half_length * 0.6, depth - half_length * 0.6)
    speed = rng.uniform(0.3, 0.6) if held_out else rng.uniform(0.0, 0.4)
    heading = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(*radius_range)
    aspect = rng.uniform(0.55, 1.0)
    if held_out:
        angle = rng.uniform(np.pi / 3, 2 * np.pi / 3)
    else:
        angle = rng.uniform(-np.pi / 3, np.pi / 3)
    harmonics: list[tuple[int, float, float, float]] = []
    if kind == "blob":
        for order in (2, 3):
            harmonics.append((order, rng.uniform(0.05, 0.22), rng.uniform(0, 2 * np.pi), rng.uniform(-0.08, 0.08)))
    elif kind == "lobed":
        order = int(rng.choice((4, 5)))
        harmonics.append((order, rng.uniform(0.12, 0.22), rng.uniform(0, 2 * np.pi), rng.uniform(-0.05, 0.05)))
    curvature = tuple(rng.uniform(-0.006, 0.006, 2))
    taper = rng.uniform(0.3, 1.0)
    if kind == "elongated":  # a bar-like cross-section, 1:2 to 1:5
        radius, aspect = rng.uniform(0.6, 1.0) * radius_range[1], rng.uniform(0.2, 0.5)
    elif kind == "twisted":  # the cross-section changes much from end to end: corrections near the ends matter
        radius, aspect, taper = rng.uniform(0.7, 1.0) * radius_range[1], rng.uniform(0.25, 0.45), 0.3
        half_length = rng.uniform(0.3, 0.4) * depth
        z_mid = rng.uniform(0.45, 0.55) * depth
        speed = rng.uniform(0.5, 0.9)
    elif kind == "tube":  # a vessel-like cylinder through most slices, drifting so other views cut it obliquely
        radius, aspect, taper = rng.uniform(0.45, 0.8) * radius_range[0] + 1.5, rng.uniform(0.7, 1.0), 0.15
        half_length = rng.uniform(0.38, 0.48) * depth
        z_mid = rng.uniform(0.45, 0.55) * depth
        speed = rng.uniform(0.3, 0.8)
    spin = rng.uniform(-0.03, 0.03)
    if kind == "twisted":
        spin = rng.choice((-1, 1)) * rng.uniform(np.pi / 3, 2 * np.pi / 3) / (2 * half_length)
    return _Shape(
        kind=kind,
        z_mid=z_mid,
        half_length=half_length,
        centre=centre,
        velocity=(speed * np.sin(heading), speed * np.cos(heading)),
        curvature=curvature,
        radii=(radius, radius * aspect),
        taper=taper,
        angle=angle,
        spin=spin,
        harmonics=tuple(harmonics),
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], waves: int, max_cycles: float) -> np.ndarray:
    """A sum of random low-frequency plane waves, roughly in [-1, 1]."""
    grids = np.meshgrid(*(np.linspace(0, 1, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(waves):
        freq = rng.uniform(-max_cycles, max_cycles, 3)
        field += np.cos(2 * np.pi * sum(f * g for f, g in zip(freq, grids)) + rng.uniform(0, 2 * np.pi))
    return field / np.sqrt(waves)


def _blur_in_plane(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over rows and columns (partial-volume edges), edges padded by replication."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = volume
    for axis in (1, 2):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(kernel))
    return out


def _place(rng: np.random.Generator, size: tuple[int, int, int], body: tuple[float, float, float, float],
           radius_range: tuple[float, float], avoid: list[tuple[float, float]], min_distance: float,
           ) -> tuple[float, float] | None:
    """A centre inside the body ellipse, at least min_distance from every centre in `avoid`."""
    cy, cx, ry, rx = body
    margin = 0.5 * (radius_range[0] + radius_range[1]) + 2
    for _ in range(50):
        y = cy + rng.uniform(-1, 1) * max(1.0, ry - margin)
        x = cx + rng.uniform(-1, 1) * max(1.0, rx - margin)
        if ((y - cy) / max(1.0, ry - margin)) ** 2 + ((x - cx) / max(1.0, rx - margin)) ** 2 > 1:
            continue
        if all(np.hypot(y - ay, x - ax) >= min_distance for ay, ax in avoid):
            return float(y), float(x)
    return None


def make_phantom(seed: int, size: tuple[int, int, int] = (48, 96, 96), modality: str = "ct",
                 held_out: bool = False, distractors: int | None = None, shapes: tuple[str, ...] | None = None,
                 ) -> Phantom:
    """A reproducible phantom: `seed` fixes everything; `held_out` switches to shapes training never sees.

    `shapes` (e.g. LONG_SHAPES) picks the objects' outlines instead; the default keeps every older phantom as it was.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    depth, height, width = (int(n) for n in size)
    if depth < MIN_TARGET_SLICES + 4 or min(height, width) < 48:
        raise ValueError(f"size must be at least ({MIN_TARGET_SLICES + 4}, 48, 48), got {size}")
    shape3 = (depth, height, width)
    rng = np.random.default_rng((int(seed), int(held_out), MODALITIES.index(modality)))

    body = (height / 2 + rng.uniform(-2, 2), width / 2 + rng.uniform(-2, 2),
            height * rng.uniform(0.40, 0.48), width * rng.uniform(0.40, 0.48))
    small = min(height, width)
    radius_range = (0.07 * small, 0.17 * small)

    target_centre = _place(rng, shape3, body, radius_range, [], 0.0)
    target = _random_shape(rng, shape3, held_out, shapes, target_centre, radius_range).raster(shape3)
    polarity = 1.0 if rng.random() < 0.6 else -1.0
    contrast = rng.uniform(0.45, 1.0)  # in units of the modality's full object contrast

    objects: list[tuple[np.ndarray, float]] = [(target, polarity * contrast)]
    centres = [target_centre]
    count = int(rng.integers(1, 4)) if distractors is None else int(distractors)
    occupied = target.copy()
    for _ in range(count):
        twin = rng.random() < 0.4
        if twin:  # looks like the target, told apart by position
            level = polarity * contrast * rng.uniform(0.9, 1.1)
            min_distance = 0.36 * small
        else:  # anywhere, told apart by intensity: other polarity, or clearly weaker/stronger
            if rng.random() < 0.5:
                level = -polarity * rng.uniform(0.45, 1.0)
            else:
                level = polarity * (contrast * 0.45 if contrast > 0.7 else min(1.3, contrast * 1.9 + 0.2))
            min_distance = 1.5 * radius_range[1]
        centre = _place(rng, shape3, body, radius_range, centres, min_distance)
        if centre is None:
            continue
        other = _random_shape(rng, shape3, held_out, shapes, centre, radius_range).raster(shape3)
        grown = other | np.roll(other, 2, axis=1) | np.roll(other, -2, axis=1) | np.roll(other, 2, axis=2) \
            | np.roll(other, -2, axis=2)
        if not other.any() or (grown & occupied).any():
            continue
        objects.append((other, level))
        centres.append(centre)
        occupied |= other

    volume = _render(rng, shape3, body, objects, modality)
    return Phantom(volume=volume, mask=target, distractors=tuple(m for m, _ in objects[1:]), modality=modality,
                   seed=int(seed), held_out=bool(held_out))


def thick_slices(phantom: Phantom, factor: int) -> Phantom:
    """The phantom scanned with `factor`-times thicker slices along axis 0: intensities averaged, masks by majority.

    Viewed along axis 1 or 2, its slices are short and wide (anisotropic), as coronal views of thick-slice CT.
    """
    depth = phantom.volume.shape[0] // factor * factor

    def thicken(array: np.ndarray) -> np.ndarray:
        return array[:depth].reshape(depth // factor, factor, *array.shape[1:]).mean(axis=1)

    volume = thicken(phantom.volume.astype(np.float32)).astype(phantom.volume.dtype)
    mask, *distractors = (thicken(o.astype(np.float32)) >= 0.5 for o in phantom.objects)
    return Phantom(volume=volume, mask=mask, distractors=tuple(distractors), modality=phantom.modality,
                   seed=phantom.seed, held_out=phantom.held_out)


def _render(rng: np.random.Generator, shape3: tuple[int, int, int], body: tuple[float, float, float, float],
            objects: list[tuple[np.ndarray, float]], modality: str) -> np.ndarray:
    """Intensities: body, objects (level in units of full contrast), blur, bias field, noise."""
    depth, height, width = shape3
    cy, cx, ry, rx = body
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    inside = np.broadcast_to(inside, shape3)
    texture = _smooth_field(rng, shape3, 6, 4.0)

    if modality == "ct":
        tissue = rng.uniform(20, 60)
        full_contrast = rng.uniform(120, 200)
        clean = np.where(inside, tissue + rng.uniform(3, 10) * texture, -1000.0).astype(np.float32)
        for mask, level in objects:
            clean[mask] = tissue + level * full_contrast
        clean = _blur_in_plane(clean, rng.uniform(0.5, 1.0))
        clean += rng.uniform(0, 15) * _smooth_field(rng, shape3, 3, 1.0) * inside
        noisy = clean + rng.normal(0, rng.uniform(4, 16), shape3).astype(np.float32)
        return np.clip(np.rint(noisy), -1024, 3071).astype(np.int16)

    tissue = rng.uniform(150, 600)
    clean = np.where(inside, tissue * (1 + rng.uniform(0.02, 0.08) * texture), 0.0).astype(np.float32)
    for mask, level in objects:
        clean[mask] = tissue * (1 + level * (1.2 if level > 0 else 0.7))
    clean = _blur_in_plane(clean, rng.uniform(0.5, 1.0))
    clean *= 1 + rng.uniform(0.05, 0.3) * _smooth_field(rng, shape3, 3, 1.0)
    sigma = tissue * rng.uniform(0.02, 0.07)
    real = clean + rng.normal(0, sigma, shape3)
    imaginary = rng.normal(0, sigma, shape3)
    return np.hypot(real, imaginary).astype(np.float32)
