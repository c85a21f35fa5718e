"""Issue 13, item 3: an image never changes split because files were added, removed, copied or moved."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from tl_app.core.config import DataConfig
from tl_app.data.scan import scan


def write_images(folder, names, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / name)


def splits_of(manifest) -> dict[str, str]:
    return {r.relpath: r.split for r in manifest.records}


def test_byte_identical_copies_under_earlier_names_move_nothing(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_images(root / "a", [f"m_{i:03d}.png" for i in range(40)], seed=1)
    write_images(root / "b", [f"m_{i:03d}.png" for i in range(20)], seed=2)
    config = DataConfig(val_fraction=0.2, test_fraction=0.1)
    before = splits_of(scan(root, config, cache_dir=cache))
    for relpath in list(before):
        label, name = relpath.split("/")
        shutil.copy(root / label / name, root / label / f"a_copy_{name}")  # sorts before the original
    after = splits_of(scan(root, config, cache_dir=cache))
    assert {k: after[k] for k in before} == before
    assert all(after[f"{k.split('/')[0]}/a_copy_{k.split('/')[1]}"] == v for k, v in before.items())


def test_a_small_class_keeps_its_splits_as_images_arrive_and_leave(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_images(root / "big", [f"b_{i:02d}.png" for i in range(30)], seed=3)
    write_images(root / "small", ["s_0.png", "s_1.png"], seed=4)
    config = DataConfig(val_fraction=0.25)
    first = splits_of(scan(root, config, cache_dir=cache))
    assert sorted(first[f"small/s_{i}.png"] for i in range(2)) == ["train", "val"]  # the small-class rule
    seen = dict(first)
    for step in range(12):  # one at a time: sooner or later a new image lands in val by its hash
        write_images(root / "small", [f"t_{step:02d}.png"], seed=100 + step)
        now = splits_of(scan(root, config, cache_dir=cache))
        assert {k: now[k] for k in seen} == seen, f"an image changed split after adding t_{step:02d}.png"
        seen.update(now)
    assert sum(1 for k, v in seen.items() if k.startswith("small/t_") and v == "val") >= 1
    for name in ("s_0.png", "t_03.png", "t_07.png"):
        (root / "small" / name).unlink()
        del seen[f"small/{name}"]
    now = splits_of(scan(root, config, cache_dir=cache))
    assert now == seen
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(root, moved)
    assert splits_of(scan(moved, config, cache_dir=cache)) == seen


def test_without_a_ledger_the_split_follows_the_content_not_the_name(tmp_path):
    root = tmp_path / "data"
    write_images(root / "a", [f"m_{i:03d}.png" for i in range(30)], seed=5)
    config = DataConfig(val_fraction=0.3)
    before = splits_of(scan(root, config))
    for name in list(before):
        (root / name).rename(root / name.replace("m_", "renamed_"))
    after = splits_of(scan(root, config))
    assert {k.replace("m_", "renamed_"): v for k, v in before.items()} == after
