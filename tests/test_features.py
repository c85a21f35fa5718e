"""Bottleneck features: the cache key, resumption, corruption, views, the export and the CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_app.features import cache as cache_mod
from tl_app.features import extract as features_mod
from tl_app.features import recipe as recipe_mod
from tl_app.features.cache import FeatureCache
from tl_app.features.recipe import Recipe, recipe_for
from tl_app.features.extract import extract_features
from tl_app.features.store import load_feature_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def vgg_config(tiny_config):
    """vgg16 builds and runs in a fraction of resnet50's time at 32x32."""
    tiny_config.backbone.name = "vgg16"
    return tiny_config


def extract(config, **kwargs):
    return extract_features(config, echo=None, **kwargs)


# ---- the key ---------------------------------------------------------------
def test_recipe_key_changes_with_every_component():
    base = Recipe("resnet50", "random-seed-0", 224, "center_crop", "caffe", "", "avg")
    changes = {"backbone": "vgg16", "weights_fingerprint": "sha256:abc", "input_size": 192,
               "resize_policy": "stretch", "preprocess": "tf", "layer": "conv4_block6_out", "pooling": "max",
               "background": (0, 0, 0), "format_version": base.format_version + 1}
    keys = {base.key()}
    for name, value in changes.items():
        keys.add(replace(base, **{name: value}).key())
    keys.add(base.with_augment({"zoom": 0.1}).key())
    assert len(keys) == len(changes) + 2


def test_recipe_follows_the_config(tiny_config):
    recipe = recipe_for(tiny_config)
    assert (recipe.backbone, recipe.input_size, recipe.preprocess) == ("resnet50", 32, "caffe")
    assert recipe.weights_fingerprint == "random-seed-0"
    assert recipe.resize_policy == "center_crop"  # "auto" resolved
    tiny_config.backbone.name = "resnet50v2"
    assert recipe_for(tiny_config).preprocess == "tf"


# ---- hits and misses -------------------------------------------------------
def test_rerun_is_served_from_the_cache_and_every_key_component_misses(vgg_config, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(vgg_config.data.root, data)
    vgg_config.data.root = str(data)
    first = extract(vgg_config)
    n = len(first.records)
    assert first.stats["computed"] == n and first.stats["cached"] == 0
    again = extract(vgg_config)
    assert again.stats["computed"] == 0 and again.stats["cached"] == n
    assert again.feature_model is None  # nothing to compute: the backbone is not even built
    np.testing.assert_array_equal(again.features, first.features)

    changes = {
        "backbone.name": "vgg19", "backbone.seed": 1, "backbone.input_size": 48,
        "data.resize_policy": "stretch", "backbone.layer": "block4_pool", "backbone.pooling": "max",
        "data.background": [0, 0, 0],
    }
    for dotted, value in changes.items():
        changed = vgg_config.with_overrides({dotted: value})
        stats = extract(changed).stats
        assert (stats["computed"], stats["cached"]) == (n, 0), dotted
    monkeypatch.setattr(recipe_mod, "FORMAT_VERSION", recipe_mod.FORMAT_VERSION + 1)
    assert extract(vgg_config).stats["computed"] == n
    monkeypatch.undo()

    # the image content: one edited file, one recomputed feature
    edited = next(r for r in first.records)
    image = Image.open(edited.path).convert("RGB")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited.path, format=edited.format)
    after = extract(vgg_config)
    assert (after.stats["computed"], after.stats["cached"]) == (1, n - 1)
    row = next(i for i, r in enumerate(after.records) if r.path == edited.path)
    assert not np.allclose(after.features[row], first.features[row])
    # nothing else moved
    others = [i for i in range(n) if i != row]
    np.testing.assert_array_equal(after.features[others], first.features[others])


def test_a_corrupt_cache_entry_is_recomputed_never_served(vgg_config):
    vgg_config.data.batch_size = 8
    first = extract(vgg_config)
    cache = FeatureCache(vgg_config.features.cache_dir, recipe_for(vgg_config))
    shards = cache.shards()
    # flip bytes inside the features of row 2 of the first shard
    rows = np.load(shards[0], mmap_mode="r")
    offset = rows.offset + 2 * rows.dtype.itemsize + 64 + 4 + 8
    del rows
    with open(shards[0], "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(4))
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))
    # truncate another shard (a torn write) and drop a garbage file that looks like a shard
    with open(shards[1], "r+b") as handle:
        handle.truncate(os.path.getsize(shards[1]) - 100)
    (cache.dir / "shard-garbage.npy").write_bytes(b"not an array")

    second = extract(vgg_config)
    assert second.stats["computed"] == 1 + 8  # the corrupt row and the torn shard's batch
    assert second.stats["corrupt_rows_ignored"] == 1
    np.testing.assert_allclose(second.features, first.features, rtol=0, atol=1e-6)
    third = extract(vgg_config)
    assert third.stats["computed"] == 0


def test_concurrent_writers_and_compaction_do_not_corrupt_the_cache(tmp_path):
    recipe = Recipe("vgg16", "random-seed-0", 32, "center_crop", "caffe", "", "avg")
    caches = [FeatureCache(tmp_path, recipe) for _ in range(3)]
    dim = 16
    keys = [(f"{i:064x}", 0) for i in range(400)]

    def vector(i):
        return np.full(dim, i, np.float32) + np.arange(dim, dtype=np.float32) / 100

    def writer(cache, start):
        for lo in range(start, 400, 20):  # overlapping key ranges
            chunk = list(range(lo, min(400, lo + 25)))
            cache.write([keys[i][0] for i in chunk], [0] * len(chunk), np.stack([vector(i) for i in chunk]))

    def compactor(cache):
        for _ in range(10):
            cache.compact(above=2)

    threads = [threading.Thread(target=writer, args=(caches[0], 0)),
               threading.Thread(target=writer, args=(caches[1], 10)),
               threading.Thread(target=compactor, args=(caches[2],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = np.zeros((len(keys), dim), np.float32)
    found = FeatureCache(tmp_path, recipe).fill(keys, out)
    assert found.all()
    np.testing.assert_array_equal(out, np.stack([vector(i) for i in range(400)]))
    assert not list(caches[0].dir.glob(".tmp-*"))


def test_compaction_merges_small_shards_and_leaves_merged_ones_alone(tmp_path, monkeypatch):
    recipe = Recipe("vgg16", "random-seed-0", 32, "center_crop", "caffe", "", "avg")
    cache = FeatureCache(tmp_path, recipe)
    keys = [f"{i:064x}" for i in range(12)]
    for i in range(4):  # 4 small shards of 3 rows
        cache.write(keys[3 * i:3 * i + 3], [0, 0, 0], np.full((3, 8), i, np.float32))
    assert cache.compact(above=2) == 4
    (merged,) = cache.shards()
    monkeypatch.setattr(cache_mod, "COMPACT_BYTES", 2 * merged.stat().st_size)  # merged: "large" from now on
    for i in range(3):
        cache.write([f"{100 + i:064x}"], [0], np.full((1, 8), 9, np.float32))
    assert cache.compact(above=2) == 3 and merged in cache.shards() and len(cache.shards()) == 2
    out = np.zeros((15, 8), np.float32)
    assert cache.fill([(k, 0) for k in keys] + [(f"{100 + i:064x}", 0) for i in range(3)], out).all()


# ---- augmented views -------------------------------------------------------
def test_augmented_views_are_deterministic_cached_and_per_view(vgg_config, tmp_path):
    vgg_config.features.augment_views = 2
    first = extract(vgg_config)
    train = first.rows("train")
    assert first.views.shape == (len(train), 2, first.features.shape[1])
    assert (first.view_rows[train] >= 0).all() and (first.view_rows[first.rows("val")] == -1).all()
    assert first.stats["views_computed"] == 2 * len(train)
    t = first.view_rows[train[0]]
    assert not np.allclose(first.views[t, 0], first.features[train[0]])
    assert not np.allclose(first.views[t, 0], first.views[t, 1])

    # the same views from scratch, with another batch size (so other batch neighbours)
    other = vgg_config.with_overrides({"features.cache_dir": str(tmp_path / "other"), "data.batch_size": 5})
    fresh = extract(other)
    np.testing.assert_allclose(fresh.views, first.views, rtol=0, atol=1e-5)

    # one more view: only the new one is computed
    vgg_config.features.augment_views = 3
    more = extract(vgg_config)
    assert (more.stats["views_cached"], more.stats["views_computed"]) == (2 * len(train), len(train))
    np.testing.assert_array_equal(more.views[:, :2], first.views)
    # other augmentation settings: new views, same plain features
    changed = vgg_config.with_overrides({"augment.zoom": 0.3})
    stats = extract(changed).stats
    assert stats["cached"] == len(first.records) and stats["views_computed"] == 3 * len(train)


# ---- export and CLI ------------------------------------------------------------
def test_extract_cli_end_to_end_json_and_numpy_only_export(cli, tmp_path):
    data = tmp_path / "data"
    from tl_app.data.sample import write_sample_dataset

    write_sample_dataset(data, seed=1, counts={"circles": 5, "squares": 4})
    (data / "circles" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "feats"
    args = ["extract", data, "--backbone", "vgg16", "--weights", "none", "--input-size", 32, "--out", out,
            "--cache-dir", tmp_path / "cache", "--dtype", "float16", "--json"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["used"], summary["skipped"], summary["computed"], summary["cached"]) == (9, 1, 9, 0)
    assert summary["skipped_files"][0]["path"].endswith("broken.jpg")
    assert set(summary["outputs"]) >= {"features_npy", "index_csv", "meta_json", "skipped_csv"}

    features = np.load(out / "features.npy")  # numpy alone
    rows = list(csv.DictReader(open(out / "index.csv", encoding="utf-8")))
    assert features.dtype == np.float16 and features.shape == (9, 512)
    assert [r["label"] for r in rows].count("circles") == 5
    assert all(len(r["sha256"]) == 64 and r["split"] in ("train", "val") for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["recipe"]["backbone"] == "vgg16" and meta["classes"] == ["circles", "squares"]
    assert "broken.jpg" in (out / "skipped.csv").read_text()

    loaded = load_feature_dir(out)
    assert [r.relpath for r in loaded.records] == [r["relpath"] for r in rows]

    again = json.loads(cli(*args).output)
    assert (again["computed"], again["cached"]) == (0, 9)
    np.testing.assert_array_equal(np.load(out / "features.npy"), features)

    help_text = cli("extract", "--help").output
    assert "features.npy" in help_text and "index.csv" in help_text


def test_an_interrupted_export_leaves_no_temporary_arrays(vgg_config, tmp_path, monkeypatch):
    out = tmp_path / "feats"
    real_compute = features_mod.Extractor.compute

    def compute_then_interrupt(self, *args, **kwargs):  # Ctrl-C right after the backbone ran
        real_compute(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(features_mod.Extractor, "compute", compute_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        extract(vgg_config, out_dir=out)
    assert not list(out.glob(".tmp-*")) and not (out / "features.npy").exists()
    monkeypatch.undo()
    stale = out / ".tmp-4194999-0badc0de-features.npy"  # from a process that no longer runs
    stale.write_bytes(b"half an array")
    result = extract(vgg_config, out_dir=out)
    assert result.stats["computed"] == 0 and result.stats["cached"] == len(result.records)  # the cache was kept
    assert not stale.exists() and (out / "features.npy").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_extract_reports_user_mistakes_clearly(cli, sample_dir, tmp_path):
    result = cli("extract", sample_dir, "--backbone", "vgg16", "--weights", "none", "--input-size", 32,
                 "--layer", "block9_conv1", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "Unknown layer of vgg16 'block9_conv1'" in result.output and "Traceback" not in result.output
    missing = cli("extract", tmp_path / "nope", "--weights", "none", "--cache-dir", tmp_path / "cache")
    assert missing.exit_code == 2 and "does not exist" in missing.output


# ---- resumption after SIGKILL ---------------------------------------------------
KILL_SCRIPT = """
import sys
from tl_app.core.config import Config
from tl_app.features.extract import extract_features
c = Config()
c.data.root, c.features.cache_dir = sys.argv[1], sys.argv[2]
c.backbone.name, c.backbone.weights, c.backbone.input_size = "resnet50", "none", 64
c.data.batch_size = 8
extract_features(c, echo=None)
print("finished")
"""


def write_many(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")


@pytest.mark.slow
def test_a_killed_extraction_resumes_and_matches_an_uninterrupted_run(tmp_path):
    from tl_app.core.config import Config

    data, cache = tmp_path / "data", tmp_path / "cache"
    write_many(data, 320)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(data), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    shards: list = []
    while time.time() < deadline and proc.poll() is None:
        shards = list(cache.glob("v*/*/shard-*.npy"))
        if len(shards) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the extraction ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    config = Config()
    config.data.root, config.features.cache_dir = str(data), str(cache)
    config.backbone.name, config.backbone.weights, config.backbone.input_size = "resnet50", "none", 64
    config.data.batch_size = 8
    resumed = extract(config)
    assert 0 < resumed.stats["cached"] < 320
    assert resumed.stats["computed"] == 320 - resumed.stats["cached"]

    clean = extract(config.with_overrides({"features.cache_dir": str(tmp_path / "clean")}))
    assert clean.stats["computed"] == 320
    np.testing.assert_array_equal(resumed.features, clean.features)


@pytest.mark.slow
def test_two_concurrent_extractions_share_one_cache_without_corrupting_it(tmp_path):
    from tl_app.core.config import Config

    data, cache = tmp_path / "data", tmp_path / "cache"
    write_many(data, 160)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(data), str(cache)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and b"finished" in out, err[-2000:]

    config = Config()
    config.data.root, config.features.cache_dir = str(data), str(cache)
    config.backbone.name, config.backbone.weights, config.backbone.input_size = "resnet50", "none", 64
    config.data.batch_size = 8
    shared = extract(config)
    assert (shared.stats["computed"], shared.stats["corrupt_rows_ignored"]) == (0, 0)
    assert not list(cache.glob("v*/*/.tmp-*"))
    clean = extract(config.with_overrides({"features.cache_dir": str(tmp_path / "clean")}))
    np.testing.assert_array_equal(shared.features, clean.features)
