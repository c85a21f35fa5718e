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


# ---- the out-of-distribution family (images from none of the classes above) --------------
OOD_KINDS = ("noise", "texture", "shape", "photo")
# natural photographs that installed packages ship (core dependencies of tl-app), cropped for the "photo" kind
PHOTO_FILES = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
               ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))


def shipped_photos() -> list[Path]:
    """The photographs in ``PHOTO_FILES`` that are installed here (found without importing their packages)."""
    import importlib.util

    found = []
    for package, relative in PHOTO_FILES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if path.is_file():
            found.append(path)
    return found


def _other_shape(rng: np.random.Generator, image: Image.Image) -> None:
    """A star or a cross: outlines that none of the sample's classes has."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    radius = min(width, height) * rng.uniform(0.3, 0.45)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    colour = _contrasting(rng, image.getpixel((0, 0)))
    angle = rng.uniform(0, 2 * math.pi)
    if rng.uniform() < 0.5:  # a five-pointed star
        points = [(cx + r * math.cos(angle + math.pi * k / 5), cy + r * math.sin(angle + math.pi * k / 5))
                  for k, r in zip(range(10), [radius, radius * 0.4] * 5)]
        draw.polygon(points, fill=colour)
    else:  # a cross of two bars
        bar = radius * 0.3
        for turn in (angle, angle + math.pi / 2):
            dx, dy = math.cos(turn), math.sin(turn)
            draw.polygon([(cx + radius * dx - bar * dy, cy + radius * dy + bar * dx),
                          (cx + radius * dx + bar * dy, cy + radius * dy - bar * dx),
                          (cx - radius * dx + bar * dy, cy - radius * dy - bar * dx),
                          (cx - radius * dx - bar * dy, cy - radius * dy + bar * dx)], fill=colour)


def _texture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Stripes at a random angle, a checkerboard, or a smooth two-colour gradient."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    a, b = np.array(_tone(rng), np.float64), np.array(_tone(rng), np.float64)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 24)
        mix = (np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period) > 0).astype(np.float64)
    elif kind == 1:
        cell = int(rng.integers(6, 20))
        mix = ((x // cell + y // cell) % 2).astype(np.float64)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(angle) + y * math.sin(angle)
        mix = (t - t.min()) / max(1e-9, t.max() - t.min())
    pixels = a * (1 - mix[..., None]) + b * mix[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def draw_ood(kind: str, rng: np.random.Generator, width: int, height: int, photos: list) -> Image.Image:
    if kind == "noise":
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if rng.uniform() < 0.5:  # blurred noise: blobs instead of grain
            image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 4))))
        return image
    if kind == "texture":
        return _texture(rng, width, height)
    if kind == "shape":
        image = Image.new("RGB", (width, height), _tone(rng, 40, 230))
        _other_shape(rng, image)
        return image
    if kind == "photo":
        with Image.open(photos[int(rng.integers(0, len(photos)))]) as source:
            photo = source.convert("RGB")
        side = int(min(photo.size) * rng.uniform(0.3, 0.8))
        left = int(rng.integers(0, photo.size[0] - side + 1))
        top = int(rng.integers(0, photo.size[1] - side + 1))
        return photo.crop((left, top, left + side, top + side)).resize((width, height), Image.BILINEAR)
    raise ValueError(f"unknown out-of-distribution kind {kind!r}; expected one of {', '.join(OOD_KINDS)}")


def write_ood_samples(directory: str | Path, seed: int = 0, per_kind: int = 12) -> dict:
    """Write ``directory/<kind>_<n>.{jpg,png}``: images from none of the sample's classes.

    For ``evaluate --ood-folder`` and for checking the "unknown" answer. The
    "photo" kind needs a photograph from an installed package; without one it
    is left out and the summary says so.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = shipped_photos()
    kinds = [kind for kind in OOD_KINDS if kind != "photo" or photos]
    written = {}
    for kind in kinds:
        for i in range(per_kind):
            width, height = int(rng.integers(64, 200)), int(rng.integers(64, 200))
            image = draw_ood(kind, rng, width, height, photos)
            if rng.uniform() < 0.7:
                image.save(directory / f"{kind}_{i:03d}.jpg", "JPEG", quality=90)
            else:
                image.save(directory / f"{kind}_{i:03d}.png", "PNG")
        written[kind] = per_kind
    missing = [kind for kind in OOD_KINDS if kind not in kinds]
    return {"root": str(directory), "kinds": written, "seed": seed,
            "left_out": {kind: "no photograph shipped by an installed package" for kind in missing}}
