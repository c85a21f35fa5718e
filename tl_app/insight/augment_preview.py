"""A picture of what the model sees in training: images next to their augmented views.

Uses the same augmenter (``tl_app.augment.build_augmenter``) and the same
decode/resize as fine-tuning, so the grid shows the real training inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import ConfigError, DataError
from tl_app.data.augment import build_augmenter
from tl_app.models.backbones import get_spec, resolve_input_size
from tl_app.data.pipeline import effective_policy, load_images
from tl_app.data.scan import scan_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def pick_records(records, count: int):
    """Up to ``count`` records, taking the classes in turn so every class shows up."""
    by_class: dict[int, list] = {}
    for record in sorted(records, key=lambda r: r.relpath):
        by_class.setdefault(record.label_index, []).append(record)
    queues = [by_class[k] for k in sorted(by_class)]
    out = []
    while len(out) < count and any(queues):
        for q in queues:
            if q and len(out) < count:
                out.append(q.pop(0))
    return out


def augment_preview(config: Config, out: str | Path, images: int = 8, views: int = 5, seed: int | None = None,
                    echo=print) -> dict:
    """Write a PNG/JPEG grid: one row per image, its original then ``views`` augmented versions."""
    import keras
    from PIL import Image, ImageDraw


    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"--out {str(out)!r}: expected a .png or .jpg file name, e.g. --out grid.png.")
    if images < 1 or views < 1:
        raise ConfigError(f"--images and --views must be at least 1, got {images} and {views}.")
    size = resolve_input_size(get_spec(config.backbone.name), config.backbone.input_size)
    manifest = scan_dataset(config)
    records = pick_records(manifest.split("train") or manifest.records, images)
    if not records:
        raise DataError(f"No usable images in {config.data.root}; see 'tl-app datasets inspect {config.data.root}'.")
    seed = config.train.seed if seed is None else seed
    pixels = load_images(records, size, effective_policy(config.data.resize_policy), config.data.background)
    augmenter = build_augmenter(config.augment, size, seed=seed)
    names = [type(layer).__name__ for layer in augmenter.layers if not isinstance(layer, keras.layers.Identity)]
    columns = [pixels] + [np.asarray(augmenter(pixels, training=True)) if augmenter else pixels
                          for _ in range(views)]

    tile = max(size, 128)
    pad, label_w, header_h = 4, 110, 18
    width = label_w + (views + 1) * (tile + pad) + pad
    height = header_h + len(records) * (tile + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c in range(views + 1):
        draw.text((label_w + pad + c * (tile + pad), 3), "original" if c == 0 else f"augmented {c}", fill=(0, 0, 0))
    for r, record in enumerate(records):
        y = header_h + pad + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), record.label[:16], fill=(0, 0, 0))
        for c, column in enumerate(columns):
            picture = Image.fromarray(np.clip(column[r], 0, 255).astype(np.uint8))
            if tile != size:
                picture = picture.resize((tile, tile), Image.Resampling.BILINEAR)
            grid.paste(picture, (label_w + pad + c * (tile + pad), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    if echo:
        echo(f"wrote {out} ({len(records)} images x {views} augmented views at {size}px; "
             f"augmentation: {', '.join(names) or 'none configured'})")
    return {"out": str(out), "images": len(records), "views": views, "input_size": size, "layers": names}
