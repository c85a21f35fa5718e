"""Issue 13, item 10: nothing that changes features hides from the cache key, and no stale hash is trusted."""

from __future__ import annotations

import os

import keras
import numpy as np
from PIL import Image

from tl_app.core.config import DataConfig
from tl_app.data.scan import scan


def test_the_recipe_key_changes_with_the_dtype_policy_and_records_libraries_and_decoder(tiny_config):
    import PIL
    import tensorflow as tf

    from tl_app.data.decode import DECODER_RULE
    from tl_app.features.recipe import recipe_for

    plain = recipe_for(tiny_config)
    before = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = recipe_for(tiny_config)
    finally:
        keras.config.set_dtype_policy(before)
    assert plain.dtype_policy == "float32" and mixed.dtype_policy == "mixed_float16"
    assert plain.key() != mixed.key()  # float16 features never land under a float32 key
    assert f"tensorflow={tf.__version__}" in plain.libraries and f"pillow={PIL.__version__}" in plain.libraries
    assert f"keras={keras.__version__}" in plain.libraries and plain.decoder == DECODER_RULE


def write_images(root, count=4):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / label / f"{k}.png")


def test_a_file_changed_after_the_scan_is_never_decoded_under_its_old_hash(tmp_path):
    from tl_app.data.pipeline import make_dataset

    write_images(tmp_path / "data")
    manifest = scan(tmp_path / "data", DataConfig(val_fraction=0.0))
    changed = tmp_path / "data" / "a" / "1.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(changed)  # after the scan, before extraction
    kept = []
    for _, index in make_dataset(manifest.records, 16, "stretch", batch_size=3, with_index=True):
        kept += index.numpy().tolist()
    assert [manifest.records[i].relpath for i in kept] == [r.relpath for r in manifest.records if r.path != str(changed)]


def test_the_scan_cache_notices_a_rewrite_that_kept_size_and_mtime(tmp_path):
    import hashlib

    write_images(tmp_path / "data")
    target = tmp_path / "data" / "a" / "extra.bmp"  # a BMP of the same size always has the same byte count
    Image.new("RGB", (16, 16), (10, 20, 30)).save(target)
    cache = tmp_path / "cache"
    first = {r.relpath: r.sha256 for r in scan(tmp_path / "data", cache_dir=cache).records}
    stat = target.stat()
    Image.new("RGB", (16, 16), (200, 100, 0)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime put back, as a restore or rsync -t does
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    second = {r.relpath: r.sha256 for r in scan(tmp_path / "data", cache_dir=cache).records}
    assert second["a/extra.bmp"] == hashlib.sha256(target.read_bytes()).hexdigest() != first["a/extra.bmp"]
