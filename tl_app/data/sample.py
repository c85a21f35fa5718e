"""A small procedural image-folder dataset, deterministic for a seed.

Classes differ in shape and colour (so a head on even random-weight features
can learn them), sizes vary, formats mix JPEG and PNG, and the classes are
imbalanced on purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_COUNTS = {"circles": 64, "squares": 50, "triangles": 40}
PALETTES = {
    "circles": ((220, 60, 50), (250, 140, 40)),
    "squares": ((40, 90, 220), (60, 180, 220)),
    "triangles": ((40, 170, 70), (150, 200, 40)),
}


def draw_sample(label: str, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 90, 3) + 140)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    # clutter shared by every class, so the task is not trivially colour-only
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(2, max(3, min(width, height) // 10)))
        tone = tuple(int(v) for v in rng.integers(60, 200, 3))
        draw.line((x - r, y, x + r, y + r), fill=tone, width=2)
    side = min(width, height)
    size = int(side * rng.uniform(0.35, 0.6))
    cx = int(rng.integers(size // 2 + 1, max(size // 2 + 2, width - size // 2)))
    cy = int(rng.integers(size // 2 + 1, max(size // 2 + 2, height - size // 2)))
    low, high = PALETTES[label]
    mix = rng.uniform()
    colour = tuple(int(a * (1 - mix) + b * mix) for a, b in zip(low, high))
    box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
    if label == "circles":
        draw.ellipse(box, fill=colour)
    elif label == "squares":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
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
