"""Plant known problems in a copy of an image folder, for measuring the dataset doctor.

The copy uses split folders (root/train|val/<class>/) so a planted duplicate
can be put across splits on purpose. Planted, with the truth in plant.json:

- flipped labels: a fraction of the *training* images moved to another class
  folder (val stays clean, so val accuracy measures the head, not the noise);
- near-duplicates: resized, re-encoded and slightly cropped copies of images,
  half of them in the other split (leakage);
- outliers: uniform noise, stripe/checker textures and blank (black, white,
  grey) frames, in training class folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def image_files(root: Path) -> list[tuple[Path, str]]:
    return [(p, d.name) for d in sorted(root.iterdir()) if d.is_dir()
            for p in sorted(d.iterdir()) if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]


def near_copy(source: Path, target: Path, variant: int, rng: np.random.Generator) -> str:
    with Image.open(source) as image:
        image = image.convert("RGB")
        w, h = image.size
        if variant % 3 == 0:
            how = "resized 75%"
            image = image.resize((max(8, int(w * 0.75)), max(8, int(h * 0.75))), Image.BILINEAR)
        elif variant % 3 == 1:
            how = "re-encoded JPEG q=60"
        else:
            dx, dy = int(w * 0.04), int(h * 0.04)
            how = "cropped 4% per side"
            image = image.crop((dx, dy, w - dx, h - dy))
        image.save(target, "JPEG", quality=60 if variant % 3 == 1 else 85)
    return how


def outlier_image(kind: int, rng: np.random.Generator, size: int = 96) -> tuple[Image.Image, str]:
    if kind % 5 == 0:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "noise"
    if kind % 5 == 1:
        yy, xx = np.mgrid[0:size, 0:size]
        stripes = ((np.sin(xx * rng.uniform(0.3, 0.9) + yy * rng.uniform(0.1, 0.5)) > 0) * 255).astype(np.uint8)
        return Image.fromarray(np.stack([stripes, 255 - stripes, stripes // 2], -1)), "stripes"
    if kind % 5 == 2:
        yy, xx = np.mgrid[0:size, 0:size]
        checker = (((xx // 6 + yy // 6) % 2) * 200 + 30).astype(np.uint8)
        return Image.fromarray(np.stack([checker] * 3, -1)), "checker"
    tone = {3: 0, 4: 255}[kind % 5] if kind % 10 < 5 else 128
    return Image.new("RGB", (size, size), (tone, tone, tone)), f"blank {tone}"


def plant(source: str | Path, target: str | Path, flip_fraction: float = 0.1, duplicates: int = 20,
          outliers: int = 10, val_fraction: float = 0.25, seed: int = 0) -> dict:
    """Copy ``source`` (class folders) to ``target`` (split folders) with problems planted; returns the truth."""
    source, target = Path(source), Path(target)
    if target.exists():
        shutil.rmtree(target)
    rng = np.random.default_rng(seed)
    files = image_files(source)
    classes = sorted({label for _, label in files})
    splits = np.where(rng.uniform(size=len(files)) < val_fraction, "val", "train")
    truth = {"flipped": [], "duplicates": [], "outliers": [], "classes": classes}
    placed: list[tuple[str, str, str]] = []  # relpath, true label, split
    train_rows = [i for i in range(len(files)) if splits[i] == "train"]
    flip = set(rng.choice(train_rows, size=int(round(flip_fraction * len(files))), replace=False).tolist())
    for i, (path, label) in enumerate(files):
        given = label
        if i in flip:
            given = str(rng.choice([c for c in classes if c != label]))
        folder = target / splits[i] / given
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / path.name)
        rel = f"{splits[i]}/{given}/{path.name}"
        placed.append((rel, label, str(splits[i])))
        if i in flip:
            truth["flipped"].append({"relpath": rel, "given": given, "true": label})
    clean = [k for k, (path, label) in enumerate(files) if k not in flip]
    for n, k in enumerate(rng.choice(clean, size=duplicates, replace=False).tolist()):
        path, label = files[k]
        split = str(splits[k]) if n % 2 == 0 else ("val" if splits[k] == "train" else "train")
        folder = target / split / label
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / f"dup{n:03d}_{path.stem}.jpg"
        how = near_copy(path, copy, n, rng)
        truth["duplicates"].append({"relpath": f"{split}/{label}/{copy.name}", "original": placed[k][0],
                                    "how": how, "crosses_splits": split != splits[k]})
    for n in range(outliers):
        image, kind = outlier_image(n, rng)
        label = classes[n % len(classes)]
        folder = target / "train" / label
        name = f"outlier{n:03d}.png"
        image.save(folder / name, "PNG")
        truth["outliers"].append({"relpath": f"train/{label}/{name}", "kind": kind})
    (target.parent / f"{target.name}.plant.json").write_text(json.dumps(truth, indent=1))
    return truth
