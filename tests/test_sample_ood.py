"""The sample generator's out-of-distribution family: noise, textures, other shapes and photo crops."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_datasets_sample_ood_writes_every_kind_deterministically(tmp_path, cli):
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    result = cli("datasets", "sample", first, "--ood", "--per-kind", 3, "--seed", 5)
    assert result.exit_code == 0, result.output
    assert "wrote 12 out-of-distribution images" in result.output
    assert "noise: 3, texture: 3, shape: 3, photo: 3" in result.output
    cli("datasets", "sample", again, "--ood", "--per-kind", 3, "--seed", 5)
    cli("datasets", "sample", other, "--ood", "--per-kind", 3, "--seed", 6)
    assert digest(first) == digest(again)  # same seed, same bytes
    assert digest(first) != digest(other)
    kinds = sorted({p.name.split("_")[0] for p in first.iterdir()})
    assert kinds == ["noise", "photo", "shape", "texture"]
    for path in first.iterdir():  # every file decodes, and is no class folder of the sample
        with Image.open(path) as image:
            assert min(image.size) >= 64
    assert not any(p.is_dir() for p in first.iterdir())


def test_photo_crops_come_from_photographs_the_core_dependencies_ship(tmp_path):
    from tl_app.data.sample import draw_ood, shipped_photos

    photos = shipped_photos()
    # scikit-learn and matplotlib are core dependencies: their photographs must be here (fail, not skip)
    assert len(photos) >= 2, photos
    rng = np.random.default_rng(0)
    crops = [np.asarray(draw_ood("photo", rng, 96, 80, photos), np.float64) for _ in range(4)]
    assert all(c.shape == (80, 96, 3) for c in crops)
    # a photograph is neither flat nor noise: neighbouring pixels agree far more than in uniform noise
    for crop in crops:
        grey = crop.mean(axis=2)
        assert grey.std() > 5
        assert np.abs(np.diff(grey, axis=1)).mean() < 0.5 * grey.std() + 20


def test_the_ood_family_is_left_out_of_a_sample_dataset_scan(tmp_path, cli):
    """The family is one flat folder: scanned as a dataset it has no class folders, so it cannot leak into training."""
    cli("datasets", "sample", tmp_path / "ood", "--ood", "--per-kind", 1)
    result = cli("datasets", "inspect", tmp_path / "ood")
    assert result.exit_code == 2
    assert "no class folders" in result.output
