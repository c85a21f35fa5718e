"""The local backbone extractor: tf.data decoding, the feature model, one cache shard per batch.

``features.gather`` runs the whole job (scan, cache, export) and builds this
only when an image is missing from the cache; see it for the export format
and the cache layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.config import Config
from tl_app.data.manifest import Manifest, Record
from tl_app.data.augment import ViewAugmenter
from tl_app.features.cache import FeatureCache, recipe_dir
from tl_app.features.gather import default_out_dir  # noqa: F401  (re-exported)
from tl_app.features.gather import extract_features as gather_features
from tl_app.features.recipe import Recipe
from tl_app.features.runtime import open_bf16, open_int8, open_runtime
from tl_app.features.store import FeatureSet
from tl_app.models.backbones import get_spec, build_feature_model
from tl_app.data.pipeline import make_dataset


def extract_features(config: Config, manifest: Manifest | None = None, out_dir: str | Path | None = None,
                     echo: Callable | None = print, extractor_class=None) -> FeatureSet:
    """features.gather.extract_features with this module's Extractor unless another is handed in."""
    return gather_features(config, manifest, out_dir, echo, extractor_class=extractor_class or Extractor)


class UniqueImages:
    """Identical files (same content hash) run through the backbone once; every copy gets the vector.

    Shared by the local Extractor and the Ray engine's, so both skip duplicates the same way.
    """

    def __init__(self, records, missing):
        self.records = records
        self.copies: dict[str, list[int]] = {}
        for i in missing:
            self.copies.setdefault(records[i].sha256, []).append(i)
        self.positions = sorted(copies[0] for copies in self.copies.values())  # one record per content
        self.done: set[int] = set()

    def take(self, positions, features, cache: FeatureCache, out) -> int:
        """Store one computed batch in the cache at once (a later failure keeps it), then in ``out``
        for every copy; returns how many records that completes."""
        if not len(positions):
            return 0
        cache.write([self.records[p].sha256 for p in positions], [0] * len(positions), features)
        count = 0
        for p, vector in zip(positions, features):
            for q in self.copies[self.records[p].sha256]:
                out[q] = vector
                self.done.add(q)
                count += 1
        return count

    def failed(self) -> set[int]:
        return {i for copies in self.copies.values() for i in copies} - self.done


class Extractor:
    """The backbone feature model, built only when something has to be computed."""

    def __init__(self, config: Config, recipe: Recipe):
        self.config = config
        self.recipe = recipe
        self.model = None
        self._runtime = None
        self._augmenter = None

    def build(self):
        if self.model is None:
            b = self.config.backbone
            self.model = build_feature_model(get_spec(b.name), self.recipe.input_size, b.weights, b.seed,
                                             b.layer, b.pooling)
        return self.model

    def runtime(self):
        """features.runtime: Keras, or ONNX Runtime on a copy converted once and checked against Keras;
        features.precision bf16/int8: a reduced-precision copy, gated against float32 Keras."""
        if self._runtime is None:
            folder = recipe_dir(self.config.features.cache_dir, self.recipe)
            precision = self.config.features.precision
            if precision == "int8":
                self._runtime = open_int8(self.build(), folder, self.recipe.input_size)
            elif precision == "bf16":
                self._runtime = open_bf16(self.build(), self.build_bf16(), self.recipe.input_size)
            else:
                self._runtime = open_runtime(self.config.features.runtime, self.build(), folder,
                                             self.recipe.input_size)
        return self._runtime

    def build_bf16(self):
        """The same feature model under Keras' mixed_bfloat16 policy (the global policy is restored after)."""
        import keras

        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_bfloat16")
        try:
            b = self.config.backbone
            return build_feature_model(get_spec(b.name), self.recipe.input_size, b.weights, b.seed, b.layer,
                                       b.pooling)
        finally:
            keras.config.set_dtype_policy(previous)

    def dim(self) -> int:
        return int(np.prod(self.build().output_shape[1:]))

    def predict(self, images, batch_size: int) -> np.ndarray:
        """One traced shape only: a short last batch is padded (a retrace costs seconds, XLA more)."""
        count = len(images)
        if count < batch_size:
            pad = np.zeros((batch_size - count,) + tuple(images.shape[1:]), np.float32)
            images = np.concatenate([np.asarray(images, np.float32), pad])
        out = self.runtime()(images)
        return np.asarray(out, np.float32).reshape(len(out), -1)[:count]

    def dataset(self, records: list[Record], batch_size: int):

        return make_dataset(records, self.recipe.input_size, self.recipe.resize_policy, batch_size,
                            with_index=True, background=self.recipe.background)

    def compute(self, records, missing, cache: FeatureCache, out, batch_size, progress) -> set[int]:
        """Run the backbone over the missing records, one cache shard per batch; returns the failures."""
        self.build()
        unique = UniqueImages(records, missing)
        subset = [records[i] for i in unique.positions]
        for images, index in self.dataset(subset, batch_size):
            features = self.predict(images, batch_size)
            positions = [unique.positions[j] for j in index.numpy().tolist()]
            progress.update(unique.take(positions, features, cache, out))
        return unique.failed()

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
