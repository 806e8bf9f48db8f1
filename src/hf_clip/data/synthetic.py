"""A procedurally generated captioned-image dataset for pretraining and zero-shot evaluation offline.

Each image shows one shape (shape, colour, size, position) on a noisy, textured background; its caption
states all four attributes in one of several phrasings. The "test" split only contains (shape, colour)
combinations that never occur in "train" (every shape and every colour still does), so zero-shot
classification on it measures transfer through language rather than memorised pairings. "validation"
holds fresh images of the training combinations.

Images are drawn with PIL from a seeded numpy generator, so a (split, num_samples, image_size, seed)
tuple always gives the same bytes.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (250, 135, 25),
}
# Shape radius as a fraction of the image side.
SIZES = {"small": (0.08, 0.115), "large": (0.17, 0.21)}
# Shape centre as fractions of (width, height).
POSITIONS = {
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}

SYNTHETIC_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}

# One held-out colour per shape and one shape per colour: each value is still seen in training.
HELD_OUT_COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("circle", "blue"),
    ("square", "yellow"),
    ("triangle", "red"),
    ("star", "purple"),
    ("cross", "orange"),
    ("diamond", "green"),
)

CAPTION_TEMPLATES = (
    "a photo of a {size} {color} {shape} in the {position}.",
    "a {size} {color} {shape} in the {position}.",
    "there is a {size} {color} {shape} in the {position}.",
    "in the {position}, a {size} {color} {shape}.",
    "a {color} {shape}, {size}, in the {position}.",
    "a picture of a {size} {shape} colored {color} in the {position}.",
)
# The first caption template, used for zero-shot prompts; combination classes fill "{color} {shape}".
PROMPT_TEMPLATE = CAPTION_TEMPLATES[0]
COMBINATION_PROMPT_TEMPLATE = PROMPT_TEMPLATE.replace("{color} {shape}", "{combination}")

SPLITS = ("train", "validation", "test")
_CHUNK = 256  # images per independently seeded generation chunk
DEFAULT_NUM_SAMPLES = {"train": 10_000, "validation": 1_000, "test": 1_000}


def combination_name(shape: str, color: str) -> str:
    """Class name of a (shape, colour) combination, e.g. "red circle"."""
    return f"{color} {shape}"


ALL_COMBINATIONS = tuple(combination_name(s, c) for s, c in itertools.product(SHAPES, COLORS))
HELD_OUT_COMBINATION_NAMES = tuple(combination_name(s, c) for s, c in HELD_OUT_COMBINATIONS)
TRAIN_COMBINATION_NAMES = tuple(n for n in ALL_COMBINATIONS if n not in HELD_OUT_COMBINATION_NAMES)


def split_combinations(split: str) -> tuple[tuple[str, str], ...]:
    """(shape, colour) pairs drawn in `split`: held-out ones for "test", the others otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if split == "test":
        return HELD_OUT_COMBINATIONS
    return tuple(p for p in itertools.product(SHAPES, COLORS) if p not in HELD_OUT_COMBINATIONS)


def synthetic_zero_shot_templates(attribute: str) -> list[str]:
    """Prompt templates with one `{}` slot for a class of `attribute`, ensembling over the others.

    `attribute` is one of `SYNTHETIC_ATTRIBUTES` or "combination" (classes like "red circle", see
    `ALL_COMBINATIONS`). Every other attribute is enumerated, so averaging the text embeddings of a class's
    prompts (the paper's prompt ensembling) marginalises them out, in the captions' own phrasing.
    """
    if attribute == "combination":
        template, options = COMBINATION_PROMPT_TEMPLATE, {"combination": ["{}"]}
    elif attribute in SYNTHETIC_ATTRIBUTES:
        template, options = PROMPT_TEMPLATE, {attribute: ["{}"]}
    else:
        raise ValueError(
            f"attribute must be one of {[*SYNTHETIC_ATTRIBUTES, 'combination']}, got {attribute!r}."
        )
    for name, values in SYNTHETIC_ATTRIBUTES.items():
        if "{" + name + "}" in template:
            options.setdefault(name, list(values))
    return [template.format(**dict(zip(options, values))) for values in itertools.product(*options.values())]


def _ring(count: int, radii: tuple[float, ...]) -> list[tuple[float, float]]:
    """`count` vertices evenly spaced clockwise from the top, cycling through `radii`."""
    angles = [-math.pi / 2 + 2 * math.pi * k / count for k in range(count)]
    return [
        (radii[k % len(radii)] * math.cos(a), radii[k % len(radii)] * math.sin(a))
        for k, a in enumerate(angles)
    ]


def _quarter_turns(arm: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A 4-fold symmetric outline from one quarter's vertices ((x, y) -> (-y, x) is a quarter turn)."""
    points = list(arm)
    for _ in range(3):
        arm = [(-y, x) for x, y in arm]
        points += arm
    return points


# Unit outlines and scales, chosen so that shapes of one size look about equally big. Circles are ellipses.
_OUTLINES = {
    "square": ([(-1, -1), (1, -1), (1, 1), (-1, 1)], 0.82),
    "triangle": (_ring(3, (1.0,)), 1.1),
    "star": (_ring(10, (1.0, 0.42)), 1.1),
    "cross": (_quarter_turns([(-0.34, -1.0), (0.34, -1.0), (0.34, -0.34)]), 1.0),
    "diamond": ([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)], 1.1),
}


def _shape_polygon(
    shape: str, cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy), rotated by `angle` radians."""
    points, scale = _OUTLINES[shape]
    cos, sin = math.cos(angle), math.sin(angle)
    return [
        (cx + scale * radius * (x * cos - y * sin), cy + scale * radius * (x * sin + y * cos))
        for x, y in points
    ]


def _backgrounds(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """`count` low-saturation backgrounds with a random linear gradient and pixel noise, uint8 NxHxWx3."""
    f32 = np.float32
    base = (rng.uniform(25, 125, size=(count, 1, 1, 1)) + rng.uniform(-18, 18, size=(count, 1, 1, 3))).astype(
        f32
    )
    ramp = np.linspace(-1.0, 1.0, size, dtype=f32)
    direction = rng.uniform(0, 2 * math.pi, size=(count, 1, 1))
    strength = rng.uniform(0, 30, size=(count, 1, 1))
    gradient = (strength * np.cos(direction)).astype(f32) * ramp[None, None, :] + (
        strength * np.sin(direction)
    ).astype(f32) * ramp[None, :, None]
    pixels = rng.standard_normal((count, size, size, 3), dtype=f32)
    pixels *= rng.uniform(4, 12, size=(count, 1, 1, 1)).astype(f32)
    pixels += base
    pixels += gradient[..., None]
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def _to_rgb(values) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(v))) for v in values)


def _encode_png(pixels: np.ndarray) -> bytes:
    """Minimal RGB PNG encoder, several times faster than PIL's on noisy images (same decoded pixels).

    Rows use PNG's "Sub" filter (difference to the pixel on the left) and Huffman-only deflate: on noise,
    entropy coding is all that compresses, and zlib releases the GIL, so threads encode in parallel.
    """
    height, width, channels = pixels.shape
    flat = pixels.reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = 1  # filter type "Sub"
    rows[:, 1 : 1 + channels] = flat[:, :channels]
    np.subtract(flat[:, channels:], flat[:, :-channels], out=rows[:, 1 + channels :])  # wraps modulo 256

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour, not interlaced
    deflate = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    idat = deflate.compress(rows.tobytes()) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _draw_example(
    rng: np.random.Generator, background: np.ndarray, shape: str, color: str, size_name: str, position: str
) -> bytes:
    image_size = background.shape[0]
    canvas = PILImage.fromarray(background)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 4)):  # faint texture strokes, close to the background's brightness
        shade = _to_rgb(background[0, 0].astype(np.float64) + rng.uniform(-35, 35))
        draw.line(rng.uniform(0, image_size, size=4).tolist(), fill=shade, width=int(rng.integers(1, 3)))

    low, high = SIZES[size_name]
    radius = rng.uniform(low, high) * image_size
    fx, fy = POSITIONS[position]
    jitter = 0.04 * image_size
    cx, cy = fx * image_size + rng.uniform(-jitter, jitter), fy * image_size + rng.uniform(-jitter, jitter)
    rgb = np.asarray(COLORS[color], dtype=np.float64) * rng.uniform(0.85, 1.1) + rng.uniform(-18, 18, size=3)
    fill = _to_rgb(rgb)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, radius, rng.uniform(-0.26, 0.26)), fill=fill)
    return _encode_png(np.asarray(canvas))


def synthetic_features() -> Features:
    """Column types of the synthetic dataset (attribute columns are `ClassLabel`s)."""
    return Features(
        {
            "image": Image(),
            "caption": Value("string"),
            **{name: ClassLabel(names=list(values)) for name, values in SYNTHETIC_ATTRIBUTES.items()},
            "combination": ClassLabel(names=list(ALL_COMBINATIONS)),
        }
    )


def load_synthetic_clip_dataset(
    split: str = "train", num_samples: int | None = None, image_size: int = 64, seed: int = 0
) -> Dataset:
    """Generate the synthetic captioned-shape dataset.

    Args:
        split: "train" and "validation" draw the training (shape, colour) combinations, "test" only the
            held-out ones (`HELD_OUT_COMBINATIONS`).
        num_samples: number of examples; defaults to 10,000 / 1,000 / 1,000 for train / validation / test.
        image_size: side of the square RGB images, in pixels.
        seed: base seed; each split derives its own stream from it, so splits never share images.

    Returns a `datasets.Dataset` with columns `image` (PIL), `caption`, `shape`, `color`, `size`,
    `position` and `combination` (class-label ints; names in `dataset.features[column].names`).
    """
    combinations = split_combinations(split)
    num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    if image_size < 16:
        raise ValueError(
            f"image_size must be at least 16 pixels for the shapes to be legible, got {image_size}."
        )

    split_seed = [seed, SPLITS.index(split)]
    rng = np.random.default_rng(split_seed)
    pair_ids = rng.integers(0, len(combinations), size=num_samples)
    shapes = [combinations[i][0] for i in pair_ids]
    colors = [combinations[i][1] for i in pair_ids]
    sizes = [SYNTHETIC_ATTRIBUTES["size"][i] for i in rng.integers(0, len(SIZES), size=num_samples)]
    positions = [
        SYNTHETIC_ATTRIBUTES["position"][i] for i in rng.integers(0, len(POSITIONS), size=num_samples)
    ]
    templates = [CAPTION_TEMPLATES[i] for i in rng.integers(0, len(CAPTION_TEMPLATES), size=num_samples)]

    def render_chunk(start: int) -> list[bytes]:
        # Each chunk has its own generator, so the output does not depend on thread scheduling. The 1 tags
        # these streams apart from the labels' one: SeedSequence pads its entropy with zeros, so
        # [seed, split, 0] (the first chunk's old key) is [seed, split] and replayed the label draws.
        chunk_rng = np.random.default_rng([*split_seed, 1, start])
        stop = min(start + _CHUNK, num_samples)
        backgrounds = _backgrounds(chunk_rng, stop - start, image_size)
        return [
            _draw_example(chunk_rng, backgrounds[i - start], shapes[i], colors[i], sizes[i], positions[i])
            for i in range(start, stop)
        ]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        images = [image for chunk in pool.map(render_chunk, range(0, num_samples, _CHUNK)) for image in chunk]

    columns = {
        "image": [{"bytes": image, "path": None} for image in images],
        "caption": [
            template.format(size=size, color=color, shape=shape, position=position)
            for template, size, color, shape, position in zip(templates, sizes, colors, shapes, positions)
        ],
        "shape": shapes,
        "color": colors,
        "size": sizes,
        "position": positions,
        "combination": [combination_name(shape, color) for shape, color in zip(shapes, colors)],
    }
    return Dataset.from_dict(columns, features=synthetic_features(), split=split)
