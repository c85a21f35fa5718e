"""Bottleneck features: a content-addressed cache and an open export format.

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

import csv
import hashlib
import io
import json
import os
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tl_app.config import Config
from tl_app.dataset import Manifest, Record, Skipped
from tl_app.errors import ConfigError, TlAppError
from tl_app.files import atomic_write_bytes, atomic_write_text, remove_stale_temporaries, temporary_sibling

FORMAT_VERSION = 1
SHARD_PREFIX = "shard-"
COMPACT_ABOVE = 64  # shards per recipe before they are merged
COMPACT_BYTES = 64 << 20  # the largest merged shard
STALE_TEMP_SECONDS = 3600
INDEX_COLUMNS = ["row", "path", "relpath", "label", "label_index", "split", "sha256", "format",
                 "width", "height", "fast", "view_row"]


# ---- the key ---------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Everything that changes a feature vector except the image itself."""

    backbone: str
    weights_fingerprint: str
    input_size: int
    resize_policy: str
    preprocess: str
    layer: str
    pooling: str
    background: tuple = (255, 255, 255)
    augment: str = ""  # JSON of the augmentation settings; empty for the images themselves
    format_version: int = FORMAT_VERSION

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def with_augment(self, augment: dict) -> "Recipe":
        return Recipe(**{**asdict(self), "augment": json.dumps(augment, sort_keys=True)})


def recipe_for(config: Config) -> Recipe:
    """The recipe of a configuration (resolves the input size and the weights fingerprint)."""
    from tl_app.backbones import get_spec, resolve_input_size
    from tl_app.pipeline import effective_policy

    spec = get_spec(config.backbone.name)
    return Recipe(
        backbone=spec.name,
        weights_fingerprint=weights_fingerprint(spec, config.backbone.weights, config.backbone.seed,
                                                Path(config.features.cache_dir)),
        input_size=resolve_input_size(spec, config.backbone.input_size),
        resize_policy=effective_policy(config.data.resize_policy),
        preprocess=spec.preprocess,
        layer=config.backbone.layer or "",
        pooling=config.backbone.pooling,
        background=tuple(int(v) for v in config.data.background),
        format_version=FORMAT_VERSION,
    )


def weights_fingerprint(spec, weights: str, seed: int, cache_root: Path) -> str:
    """tl_app.weights.fingerprint, remembered in the feature cache's folder."""
    from tl_app.weights import fingerprint

    return fingerprint(spec, weights, seed, memo_dir=cache_root)


# ---- the cache ---------------------------------------------------------------
def shard_dtype(dim: int) -> np.dtype:
    return np.dtype([("sha256", "S64"), ("view", "<i4"), ("features", "<f4", (dim,)), ("crc", "<u4")])


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of every row's bytes except its own crc field."""
    raw = rows.view(np.uint8).reshape(len(rows), rows.dtype.itemsize)[:, :-4]
    return np.fromiter((zlib.crc32(r.tobytes()) for r in raw), np.uint32, len(rows))


def shard_size(path: Path) -> int:
    """Bytes of a shard; a shard another process just merged away counts as large (left alone)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return COMPACT_BYTES


class FeatureCache:
    """Append-only shards of one recipe; safe under SIGKILL and concurrent writers."""

    def __init__(self, root: str | Path, recipe: Recipe):
        self.recipe = recipe
        self.dir = Path(root) / f"v{recipe.format_version}" / recipe.key()
        self.dir.mkdir(parents=True, exist_ok=True)
        recipe_file = self.dir / "recipe.json"
        if not recipe_file.exists():
            atomic_write_bytes(recipe_file, json.dumps(asdict(recipe), indent=1, sort_keys=True).encode())
        self.corrupt_rows = 0
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.dir.glob(".tmp-*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob(f"{SHARD_PREFIX}*.npy"))

    def open_shard(self, path: Path) -> np.ndarray | None:
        """The shard's rows (memory-mapped), or None when it is not a readable shard."""
        try:
            rows = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError):
            return None  # truncated or not an .npy file: its rows are recomputed
        names = rows.dtype.names or ()
        if rows.ndim != 1 or names != ("sha256", "view", "features", "crc"):
            return None
        if rows.dtype != shard_dtype(rows.dtype["features"].shape[0]):
            return None
        return rows

    def dim(self) -> int | None:
        """The feature width, from the first readable shard (None for an empty cache)."""
        for path in self.shards():
            try:
                rows = self.open_shard(path)
            except FileNotFoundError:
                continue
            if rows is not None:
                return int(rows.dtype["features"].shape[0])
        return None

    def fill(self, keys: Sequence[tuple[str, int]], out: np.ndarray) -> np.ndarray:
        """Copy the cached features of ``keys`` into the rows of ``out``; returns the found mask.

        The index is rebuilt from the shards on every call; only rows whose
        checksum holds are served. A shard that another job merged away while
        we read is found again by listing once more.
        """
        wanted: dict[tuple[bytes, int], list[int]] = {}
        for position, (sha, view) in enumerate(keys):
            wanted.setdefault((sha.encode(), int(view)), []).append(position)
        found = np.zeros(len(keys), bool)
        dim = out.shape[1] if out.ndim == 2 else None
        self.corrupt_rows = 0
        for _attempt in range(3):
            vanished = False
            for path in self.shards():
                if not wanted:
                    return found
                try:
                    rows = self.open_shard(path)
                except FileNotFoundError:
                    vanished = True
                    continue
                if rows is None or (dim is not None and rows.dtype["features"].shape[0] != dim):
                    continue
                shas = np.asarray(rows["sha256"])
                views = np.asarray(rows["view"])
                hits = [i for i, key in enumerate(zip(shas.tolist(), views.tolist())) if key in wanted]
                if not hits:
                    continue
                chunk = np.asarray(rows[hits])
                good = row_checksums(chunk) == chunk["crc"]
                self.corrupt_rows += int((~good).sum())
                for row, ok in zip(chunk, good):
                    key = (bytes(row["sha256"]), int(row["view"]))
                    if not ok or key not in wanted:
                        continue
                    positions = wanted.pop(key)
                    out[positions] = row["features"]
                    found[positions] = True
            if not vanished:
                break
        return found

    def write(self, shas: Sequence[str], views: Sequence[int], features: np.ndarray) -> Path | None:
        """Append one shard atomically (temporary file, then rename)."""
        if len(shas) == 0:
            return None
        features = np.asarray(features, np.float32)
        rows = np.zeros(len(shas), shard_dtype(features.shape[1]))
        rows["sha256"] = [s.encode() for s in shas]
        rows["view"] = views
        rows["features"] = features
        rows["crc"] = row_checksums(rows)
        return self._write_rows(rows)

    def _write_rows(self, rows: np.ndarray) -> Path:
        name = f"{SHARD_PREFIX}{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        tmp = self.dir / f".tmp-{name}"
        with open(tmp, "wb") as handle:
            np.save(handle, rows, allow_pickle=False)
        os.replace(tmp, self.dir / name)
        return self.dir / name

    def compact(self, above: int = COMPACT_ABOVE) -> int:
        """Merge many small shards into few (merged shards are not rewritten); concurrent readers and compactors
        stay correct.

        Rows are written to new shards before the old ones are removed, so at
        every moment each row is in at least one complete shard. Returns the
        number of shards removed.
        """
        paths = [path for path in self.shards() if shard_size(path) < COMPACT_BYTES // 2]  # merged ones stay
        if len(paths) <= above:
            return 0
        seen: set[tuple[bytes, int]] = set()
        pending: list[np.ndarray] = []
        pending_bytes = 0
        merged: list[Path] = []
        dim = None
        for path in paths:
            try:
                rows = self.open_shard(path)
            except FileNotFoundError:
                continue
            merged.append(path)
            if rows is None:
                continue
            if dim is None:
                dim = rows.dtype["features"].shape[0]
            if rows.dtype["features"].shape[0] != dim:
                continue
            rows = np.asarray(rows)
            rows = rows[row_checksums(rows) == rows["crc"]]
            keep = []
            for i, key in enumerate(zip(rows["sha256"].tolist(), rows["view"].tolist())):
                if key not in seen:
                    seen.add(key)
                    keep.append(i)
            if keep:
                pending.append(rows[keep])
                pending_bytes += pending[-1].nbytes
            if pending_bytes >= COMPACT_BYTES:
                self._write_rows(np.concatenate(pending))
                pending, pending_bytes = [], 0
        if pending:
            self._write_rows(np.concatenate(pending))
        for path in merged:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        return len(merged)


# ---- augmented views -----------------------------------------------------------
def augment_settings(config: Config) -> dict:
    return asdict(config.augment)


class ViewAugmenter:
    """tl_app.augment's layers, made deterministic per (image content, view index).

    Before each image the layers' seed generators are set from a hash of the
    content and the view, so a view is the same in every run, batch and order.
    """

    def __init__(self, config: Config, input_size: int):
        import tensorflow as tf

        from tl_app.augment import build_augmenter, seed_generators

        self.augmenter = build_augmenter(config.augment, input_size, seed=0, name="view_augment")
        self.generators = seed_generators(self.augmenter)
        augmenter, generators = self.augmenter, self.generators

        @tf.function(reduce_retracing=True)
        def one(image, seed):
            for i, generator in enumerate(generators):
                state = tf.stack([seed + tf.constant(i * 7919, tf.int64), tf.constant(0, tf.int64)])
                generator.state.assign(tf.cast(state, generator.state.dtype))
            return augmenter(image[None], training=True)[0]

        self._one = one

    @staticmethod
    def seed(sha256: str, view: int) -> int:
        return int(hashlib.sha256(f"{sha256}:{view}".encode()).hexdigest()[:12], 16)

    def __call__(self, image, sha256: str, view: int) -> np.ndarray:
        import tensorflow as tf

        return self._one(image, tf.constant(self.seed(sha256, view), tf.int64)).numpy()


# ---- extraction -------------------------------------------------------------------
@dataclass
class FeatureSet:
    """Features aligned with records; ``views`` holds cached augmented views of training images."""

    features: np.ndarray  # [N, D]
    records: list[Record]
    classes: list[str]
    out_dir: Path | None = None
    stats: dict = field(default_factory=dict)
    views: np.ndarray | None = None  # [T, K, D]
    view_rows: np.ndarray | None = None  # [N]: row in views, -1 for none
    recipe: dict = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    feature_model: Any = field(default=None, repr=False)  # the backbone model, when this run built one

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label_index for r in self.records], np.int64)

    def rows(self, split: str) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r.split == split], np.int64)


class Progress:
    """A one-line progress bar with images/s on stderr (a line per step when not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self.end = time.perf_counter()
        self.first: tuple[int, float] | None = None
        self.last = 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def steady_rate(self) -> float | None:
        """Images/s after the first batch (which pays for building and tracing), like a warmed-up predict."""
        if self.first is None:
            return None
        elapsed = self.end - self.first[1]
        if self.done == self.first[0] or elapsed <= 0:
            return round(self.rate(), 2)
        return round((self.done - self.first[0]) / elapsed, 2)

    def update(self, count: int) -> None:
        self.done += count
        self.end = time.perf_counter()
        if self.first is None:
            self.first = (self.done, self.end)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.done < self.total and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * self.done / self.total)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{rate:.1f} images/s eta {eta:.0f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def default_out_dir(config: Config) -> Path:
    from tl_app.backbones import get_spec
    from tl_app.runs import slug

    if config.features.out:
        return Path(config.features.out)
    name = config.train.name or f"features-{get_spec(config.backbone.name).name}"
    return Path(config.train.runs_dir) / slug(name) / "features"


def extract_features(config: Config, manifest: Manifest | None = None, out_dir: str | Path | None = None,
                     echo: Callable | None = print) -> FeatureSet:
    """Features for every usable image (and K augmented views per training image), cached.

    Only what the cache lacks runs through the backbone; every batch computed
    is written to the cache at once, so a killed run resumes where it stopped.
    With ``out_dir`` the result is also exported (see the module docstring) and
    ``.features`` is memory-mapped from there, so memory does not grow with the
    number of images.
    """
    from tl_app.train import scan_dataset

    views_wanted = int(config.features.augment_views)
    if views_wanted < 0:
        raise ConfigError(f"features.augment_views must be 0 or more, got {views_wanted}.")
    started = time.perf_counter()
    recipe = recipe_for(config)  # fails early (unknown backbone, missing weights) before any scan
    if manifest is None:
        manifest = scan_dataset(config)
        if echo:
            from tl_app.dataset import print_report

            print_report(manifest)
    cache_root = Path(config.features.cache_dir)
    cache = FeatureCache(cache_root, recipe)
    view_cache = FeatureCache(cache_root, recipe.with_augment(augment_settings(config))) if views_wanted else None
    records = list(manifest.records)
    batch_size = int(config.data.batch_size)
    extractor = make_extractor(config, recipe)

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
            "seconds": 0.0, "cache_dir": str(cache.dir),
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


def make_extractor(config: Config, recipe: Recipe):
    """The local Extractor, or with --engine ray the Ray engine's (same interface, run by Ray Data actors)."""
    if config.engine.name == "ray":
        from tl_app.engines.ray_engine import RayExtractor

        return RayExtractor(config, recipe)
    return Extractor(config, recipe)


class Extractor:
    """The backbone feature model, built only when something has to be computed."""

    def __init__(self, config: Config, recipe: Recipe):
        self.config = config
        self.recipe = recipe
        self.model = None
        self._augmenter = None

    def build(self):
        if self.model is None:
            from tl_app.backbones import build_feature_model, get_spec

            b = self.config.backbone
            self.model = build_feature_model(get_spec(b.name), self.recipe.input_size, b.weights, b.seed,
                                             b.layer, b.pooling)
        return self.model

    def dim(self) -> int:
        return int(np.prod(self.build().output_shape[1:]))

    def predict(self, images, batch_size: int) -> np.ndarray:
        """One traced shape only: a short last batch is padded (a retrace costs seconds, XLA more)."""
        count = len(images)
        if count < batch_size:
            pad = np.zeros((batch_size - count,) + tuple(images.shape[1:]), np.float32)
            images = np.concatenate([np.asarray(images, np.float32), pad])
        out = self.build().predict_on_batch(images)
        return np.asarray(out, np.float32).reshape(len(out), -1)[:count]

    def dataset(self, records: list[Record], batch_size: int):
        from tl_app.pipeline import make_dataset

        return make_dataset(records, self.recipe.input_size, self.recipe.resize_policy, batch_size,
                            with_index=True, background=self.recipe.background)

    def compute(self, records, missing, cache: FeatureCache, out, batch_size, progress) -> set[int]:
        """Run the backbone over the missing records, one cache shard per batch; returns the failures."""
        self.build()
        first: dict[str, int] = {}  # identical files run once
        duplicates: dict[str, list[int]] = {}
        for i in missing:
            first.setdefault(records[i].sha256, i)
            duplicates.setdefault(records[i].sha256, []).append(i)
        unique = sorted(first.values())
        subset = [records[i] for i in unique]
        done: set[int] = set()
        for images, index in self.dataset(subset, batch_size):
            features = self.predict(images, batch_size)
            positions = [unique[j] for j in index.numpy().tolist()]
            cache.write([records[p].sha256 for p in positions], [0] * len(positions), features)
            for p, vector in zip(positions, features):
                for q in duplicates[records[p].sha256]:
                    out[q] = vector
                    done.add(q)
            progress.update(sum(len(duplicates[records[p].sha256]) for p in positions))
        return set(missing) - done

    def compute_views(self, records, train_rows, k, missing_views, cache: FeatureCache, flat, batch_size,
                      progress) -> None:
        """Augment (deterministically) and featurise the missing views; flat[t * k + v - 1] is view v of train row t."""
        self.build()
        if self._augmenter is None:
            self._augmenter = ViewAugmenter(self.config, self.recipe.input_size)
        by_train_row: dict[int, list[int]] = {}
        for flat_index in missing_views:
            by_train_row.setdefault(flat_index // k, []).append(flat_index % k + 1)
        order = sorted(by_train_row)
        subset = [records[train_rows[t]] for t in order]
        queue_images, queue_keys = [], []

        def flush():
            if not queue_images:
                return
            features = self.predict(np.stack(queue_images), batch_size)
            cache.write([records[train_rows[t]].sha256 for t, _ in queue_keys], [v for _, v in queue_keys], features)
            for (t, v), vector in zip(queue_keys, features):
                flat[t * k + v - 1] = vector
            progress.update(len(queue_keys))
            queue_images.clear()
            queue_keys.clear()

        for images, index in self.dataset(subset, batch_size):
            for image, j in zip(images, index.numpy().tolist()):
                t = order[j]
                sha = records[train_rows[t]].sha256
                for v in by_train_row[t]:
                    queue_images.append(self._augmenter(image, sha, v))
                    queue_keys.append((t, v))
                    if len(queue_images) >= batch_size:
                        flush()
        flush()


class OutputArrays:
    """Where features land: memory, or memory-mapped temporary files in the export folder."""

    def __init__(self, out_dir: Path | None, count: int, dim: int):
        self.out_dir = out_dir
        self.dim = dim
        self.temps: list[Path] = []
        self.features = self._allocate("features.npy", (count, dim))
        self.views: np.ndarray | None = None

    def _allocate(self, name: str, shape: tuple) -> np.ndarray:
        if self.out_dir is None:
            return np.zeros(shape, np.float32)
        tmp = temporary_sibling(self.out_dir / name)
        self.temps.append(tmp)
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)

    def allocate_views(self, count: int, k: int) -> None:
        self.views = self._allocate("views.npy", (count, k, self.dim))

    def temp_for(self, array: np.ndarray) -> Path | None:
        return Path(array.filename) if isinstance(array, np.memmap) and array.filename else None

    def cleanup(self) -> None:
        for tmp in self.temps:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def _finish_array(store: OutputArrays, array: np.ndarray, rows: list[int] | None, target: Path,
                  dtype: str) -> None:
    """Move a temporary float32 array into place as ``target`` (dropping rows, converting dtype) in chunks."""
    source_path = store.temp_for(array)
    count = len(rows) if rows is not None else len(array)
    if source_path is not None and rows is None and dtype == "float32":
        array.flush()
        os.replace(source_path, target)
        return
    tmp = temporary_sibling(target)
    store.temps.append(tmp)  # removed by store.cleanup() if this is interrupted
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(count,) + array.shape[1:])
    chunk = 1024
    index = np.asarray(rows if rows is not None else range(len(array)), np.int64)
    for start in range(0, count, chunk):
        out[start:start + chunk] = np.asarray(array[index[start:start + chunk]]).astype(dtype)
    out.flush()
    del out
    os.replace(tmp, target)


def write_export(feature_set: FeatureSet, store: OutputArrays, kept: list[int], manifest: Manifest,
                 dtype: str) -> FeatureSet:
    """Write features.npy, views.npy, index.csv, meta.json and the skipped report (each file atomically)."""
    out_dir = feature_set.out_dir
    all_rows = None if len(kept) == len(manifest.records) else kept
    try:
        _finish_array(store, store.features, all_rows, out_dir / "features.npy", dtype)
        if store.views is not None:
            _finish_array(store, store.views, None, out_dir / "views.npy", dtype)
        elif (out_dir / "views.npy").exists():
            (out_dir / "views.npy").unlink()
    finally:
        store.cleanup()
    lines = []
    for row, (record, view_row) in enumerate(zip(feature_set.records, feature_set.view_rows)):
        lines.append({"row": row, **{k: getattr(record, k) for k in INDEX_COLUMNS[1:-1]}, "view_row": int(view_row)})
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS)
    writer.writeheader()
    writer.writerows(lines)
    atomic_write_text(out_dir / "index.csv", buffer.getvalue())
    partial = Manifest(root=manifest.root, layout=manifest.layout, classes=manifest.classes,
                       skipped=feature_set.skipped)
    partial.write_skipped_report(out_dir)
    meta = {
        "format_version": FORMAT_VERSION, "classes": feature_set.classes, "root": manifest.root,
        "shape": [len(feature_set.records), int(store.dim)], "dtype": dtype,
        "views_shape": list(store.views.shape) if store.views is not None else None,
        "recipe": feature_set.recipe, "stats": feature_set.stats,
        "files": {"features": "features.npy", "index": "index.csv", "meta": "meta.json",
                  "skipped": "skipped.csv", **({"views": "views.npy"} if store.views is not None else {})},
    }
    atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=1, default=str).encode())
    loaded = load_feature_dir(out_dir)
    loaded.stats = feature_set.stats
    loaded.feature_model = feature_set.feature_model
    loaded.skipped = feature_set.skipped
    return loaded


def export_paths(out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    names = ["features.npy", "index.csv", "meta.json", "skipped.csv", "skipped.json", "views.npy"]
    return {name.replace(".", "_"): str(out_dir / name) for name in names if (out_dir / name).exists()}


def load_feature_dir(out_dir: str | Path, mmap: bool = True) -> FeatureSet:
    """Read an export written by ``tl-app extract`` back into a FeatureSet."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file() or not (out_dir / "features.npy").is_file():
        raise TlAppError(
            f"{out_dir} is not a tl-app feature folder (meta.json and features.npy expected). "
            f"Create one with 'tl-app extract DATA --out {out_dir}'."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise TlAppError(f"{out_dir} has feature format {meta.get('format_version')}; this tl-app reads "
                         f"format {FORMAT_VERSION}. Extract again with 'tl-app extract'.")
    features = np.load(out_dir / "features.npy", mmap_mode="r" if mmap else None)
    records, view_rows = [], []
    with open(out_dir / "index.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            records.append(Record(
                path=row["path"], relpath=row["relpath"], label=row["label"], label_index=int(row["label_index"]),
                split=row["split"], sha256=row["sha256"], format=row["format"], width=int(row["width"]),
                height=int(row["height"]), fast=row["fast"] == "True"))
            view_rows.append(int(row["view_row"]))
    if len(records) != len(features):
        raise TlAppError(f"{out_dir} is inconsistent: {len(features)} feature rows, {len(records)} index rows. "
                         f"Extract again with 'tl-app extract'.")
    views = None
    if (out_dir / "views.npy").is_file():
        views = np.load(out_dir / "views.npy", mmap_mode="r" if mmap else None)
    skipped = []
    if (out_dir / "skipped.json").is_file():
        skipped = [Skipped(**s) for s in json.loads((out_dir / "skipped.json").read_text())]
    return FeatureSet(features=features, records=records, classes=list(meta["classes"]), out_dir=out_dir,
                      stats=dict(meta.get("stats", {})), views=views, view_rows=np.array(view_rows, np.int64),
                      recipe=dict(meta.get("recipe", {})), skipped=skipped)

