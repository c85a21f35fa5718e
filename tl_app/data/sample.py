"""A small procedural image-folder dataset, deterministic for a seed.

Classes differ only in the outline of one shape (circle, square, triangle):
colour, size, position, rotation, background and clutter are drawn the same
way for every class. Colour alone therefore tells nothing, and random-weight
features do little better than chance, while pretrained edge features separate
the shapes. Sizes vary, formats mix JPEG and PNG, and the classes are
imbalanced on purpose.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_COUNTS = {"circles": 64, "squares": 50, "triangles": 40}


def _tone(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def _outline(label: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]] | None:
    corners = {"squares": 4, "triangles": 3}.get(label)
    if corners is None:
        return None
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / corners),
             cy + radius * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)]


def _luma(tone: tuple) -> float:
    return 0.299 * tone[0] + 0.587 * tone[1] + 0.114 * tone[2]


def _contrasting(rng: np.random.Generator, background: tuple, apart: float = 90) -> tuple:
    """A random colour whose brightness is far from the background's, so the outline is always visible."""
    while True:
        tone = _tone(rng)
        if abs(_luma(tone) - _luma(background)) >= apart:
            return tone


def draw_sample(label: str, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    background = _tone(rng, 40, 230)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    # clutter drawn the same way for every class: strokes and small dots
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.uniform(0, width, 2), rng.uniform(0, height, 2)
        draw.line((x[0], y[0], x[1], y[1]), fill=_tone(rng), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 4))):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(1, side / 40 + 1)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_tone(rng))
    radius = side * rng.uniform(0.28, 0.45)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    colour = _contrasting(rng, background)
    outline = _outline(label, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    if outline is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon(outline, fill=colour)
    if rng.uniform() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    return image


def write_sample_dataset(directory: str | Path, seed: int = 0, counts: dict[str, int] | None = None) -> dict:
    """Write ``directory/<class>/<n>.{jpg,png}``; returns a summary."""
    directory = Path(directory)
    counts = counts or CLASS_COUNTS
    rng = np.random.default_rng(seed)
    written = {}
    formats = {"JPEG": 0, "PNG": 0}
    for label, count in counts.items():
        folder = directory / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            width, height = int(rng.integers(64, 200)), int(rng.integers(64, 200))
            image = draw_sample(label, rng, width, height)
            if rng.uniform() < 0.7:
                image.save(folder / f"{label}_{i:03d}.jpg", "JPEG", quality=90)
                formats["JPEG"] += 1
            else:
                image.save(folder / f"{label}_{i:03d}.png", "PNG")
                formats["PNG"] += 1
        written[label] = count
    return {"root": str(directory), "classes": written, "formats": formats, "seed": seed}
