"""Bottleneck features for a folder: scan, cache read, backbone only for what is missing, export.

This module imports neither TensorFlow nor Keras: the backbone arrives as
``extractor_class`` and is built only when an image is missing from the
cache, so a fully cached re-run costs a scan and a cache read (numpy alone).

Features are what the backbone (plus its pooling) outputs for one image. They
are costly to compute and cheap to keep, so every feature ever computed goes
into a cache keyed by everything that changes it; a re-run computes only what
is missing, and a change to any key component gives new features, never stale
ones.

Export format (``tl-app extract --out DIR``; load it with numpy alone)::

    DIR/features.npy    [N, D] float32 (float16 with --dtype float16): row i is
                        the image on data line i of index.csv
    DIR/index.csv       row,path,relpath,label,label_index,split,sha256,format,
                        width,height,fast,view_row
    DIR/views.npy       only with --augment-views K: [T, K, D] features of K
                        augmented views of the T training images; index.csv's
                        view_row is the image's row here (-1: none)
    DIR/meta.json       format_version, classes, shape, dtype and the recipe:
                        backbone, weights fingerprint, input size, resize
                        policy, preprocessing, layer, pooling, augmentation
    DIR/skipped.csv     files that could not be used, with the reason (also .json)

    import csv, numpy as np
    X = np.load("DIR/features.npy")
    rows = list(csv.DictReader(open("DIR/index.csv")))
    y = np.array([int(r["label_index"]) for r in rows])

Cache layout (``features.cache_dir``, shared by every run and job)::

    CACHE/v<format>/<recipe key>/recipe.json     the key components, for people
    CACHE/v<format>/<recipe key>/shard-*.npy     one structured array per batch

The recipe key hashes backbone, weights fingerprint, input size, resize
policy, preprocessing, layer, pooling, background colour and the format
version (plus the augmentation settings for augmented views). Inside a recipe,
a row is keyed by the image's content hash (sha256) and its view (0: the image
itself, 1..K: augmented views). Each shard row is (sha256 S64, view int32,
features float32[D], crc uint32), the CRC-32 covering the row's other bytes.
Shards are written to a temporary name and renamed into place, so a killed job
loses only the batch in flight and concurrent jobs never see half a shard; the
index is rebuilt from the shards on every read, and a row whose checksum fails
is never served: it is recomputed.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import ConfigError
from tl_app.core.files import remove_stale_temporaries, slug
from tl_app.core.progress import Progress
from tl_app.data.manifest import Manifest, Skipped
from tl_app.data.scan import print_report, scan_dataset
from tl_app.features.cache import FeatureCache
from tl_app.features.recipe import recipe_for, view_settings
from tl_app.features.store import FeatureSet, OutputArrays, write_export
from tl_app.models.registry import get_info


class DeferredExtractor:
    """An extractor made on first use: until an image has to run through the backbone, no model
    (and with a factory that imports lazily, no TensorFlow) is loaded."""

    def __init__(self, factory: Callable, config: Config, recipe):
        self._factory, self._args, self._real = factory, (config, recipe), None

    @property
    def real(self):
        if self._real is None:
            self._real = self._factory(*self._args)
        return self._real

    @property
    def model(self):
        return self._real.model if self._real is not None else None

    def dim(self) -> int:
        return self.real.dim()

    def compute(self, *args, **kwargs):
        return self.real.compute(*args, **kwargs)

    def compute_views(self, *args, **kwargs):
        return self.real.compute_views(*args, **kwargs)


def default_out_dir(config: Config) -> Path:

    if config.features.out:
        return Path(config.features.out)
    name = config.train.name or f"features-{get_info(config.backbone.name).name}"
    return Path(config.train.runs_dir) / slug(name) / "features"


def extract_features(config: Config, manifest: Manifest | None = None, out_dir: str | Path | None = None,
                     echo: Callable | None = print, *, extractor_class: Callable) -> FeatureSet:
    """Features for every usable image (and K augmented views per training image), cached.

    Only what the cache lacks runs through the backbone; every batch computed
    is written to the cache at once, so a killed run resumes where it stopped.
    With ``out_dir`` the result is also exported (see the module docstring) and
    ``.features`` is memory-mapped from there, so memory does not grow with the
    number of images. ``extractor_class(config, recipe)`` runs the backbone
    (features.extract.Extractor, or the Ray engine's, with the same interface);
    it is called only when something is missing from the cache.
    """
    views_wanted = int(config.features.augment_views)
    if views_wanted < 0:
        raise ConfigError(f"features.augment_views must be 0 or more, got {views_wanted}.")
    started = time.perf_counter()
    recipe = recipe_for(config)  # fails early (unknown backbone, missing weights) before any scan
    if manifest is None:
        manifest = scan_dataset(config)
        if echo:
            print_report(manifest)
    cache_root = Path(config.features.cache_dir)
    cache = FeatureCache(cache_root, recipe)
    view_cache = FeatureCache(cache_root, recipe.with_augment(view_settings(config))) if views_wanted else None
    records = list(manifest.records)
    batch_size = int(config.data.batch_size)
    extractor = DeferredExtractor(extractor_class, config, recipe)

    dim = cache.dim() or (view_cache.dim() if view_cache else None) or extractor.dim()
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)  # left by an extraction that was killed
    store = OutputArrays(out_dir, len(records), dim)
    try:
        keys = [(r.sha256, 0) for r in records]
        found = cache.fill(keys, store.features)
        cached = int(found.sum())
        missing = [i for i in range(len(records)) if not found[i]]
        failed: set[int] = set()
        progress = Progress(len(missing), "extract", enabled=echo is not None)
        if missing:
            failed |= extractor.compute(records, missing, cache, store.features, batch_size, progress)

        train_rows = [i for i, r in enumerate(records) if r.split == "train" and i not in failed]
        view_rows = np.full(len(records), -1, np.int64)
        views_cached = views_computed = 0
        if views_wanted:
            view_rows[train_rows] = np.arange(len(train_rows))
            store.allocate_views(len(train_rows), views_wanted)
            view_keys = [(records[i].sha256, v) for i in train_rows for v in range(1, views_wanted + 1)]
            flat = store.views.reshape(len(view_keys), dim) if view_keys else store.views.reshape(0, dim)
            view_found = view_cache.fill(view_keys, flat)
            views_cached = int(view_found.sum())
            missing_views = [k for k in range(len(view_keys)) if not view_found[k]]
            views_computed = len(missing_views)
            if missing_views:
                vprogress = Progress(len(missing_views), f"views x{views_wanted}", enabled=echo is not None)
                extractor.compute_views(records, train_rows, views_wanted, missing_views, view_cache, flat,
                                        batch_size, vprogress)
            del flat

        for c in (cache, view_cache):
            if c is not None:
                c.compact()

        skipped = list(manifest.skipped) + [
            Skipped(records[i].path, "could not be decoded during extraction (changed since the scan?)")
            for i in sorted(failed)]
        kept = [i for i in range(len(records)) if i not in failed]
        computed = len(missing) - len(failed)
        stats = {
            "used": len(kept), "skipped": len(skipped), "computed": computed, "cached": cached,
            "views_per_image": views_wanted, "views_computed": views_computed, "views_cached": views_cached,
            "corrupt_rows_ignored": cache.corrupt_rows + (view_cache.corrupt_rows if view_cache else 0),
            "dim": int(dim), "dtype": config.features.dtype if out_dir is not None else "float32",
            "compute_images_per_s": progress.steady_rate(),
            # so far (meta.json is written below); the total replaces it on return
            "seconds": round(time.perf_counter() - started, 3), "cache_dir": str(cache.dir),
        }
        feature_set = FeatureSet(
            features=store.features, records=[records[i] for i in kept], classes=list(manifest.classes),
            out_dir=out_dir, stats=stats, views=store.views if views_wanted else None,
            view_rows=view_rows[kept], recipe=asdict(recipe), skipped=skipped, feature_model=extractor.model)
        if failed and out_dir is None:  # an export selects the kept rows itself, without a copy in memory
            feature_set.features = np.asarray(store.features)[kept]
        if out_dir is not None:
            feature_set = write_export(feature_set, store, kept, manifest, config.features.dtype)
    except BaseException:  # an interrupted or failed export leaves no temporary arrays behind
        store.cleanup()
        raise
    stats["seconds"] = round(time.perf_counter() - started, 3)
    if echo:
        echo(f"features: {stats['used']} images used, {stats['skipped']} skipped, {computed} computed, "
             f"{cached} from the cache" + (f"; views: {views_computed} computed, {views_cached} cached"
                                           if views_wanted else "") + f" ({stats['seconds']:.1f}s)")
    return feature_set
