"""Image retrieval: a cosine-similarity index over backbone features (numpy only).

The index is an L2-normalised float32 matrix (float16 on disk optionally), so a
query is one matrix product plus ``argpartition`` (O(N) selection, not a full sort).
On disk (a folder): ``vectors.npy`` (memory-mapped on load) and ``index.json``
(the feature recipe, so queries are embedded exactly like the collection, and
one entry per image).

This module imports neither TensorFlow nor Keras: ``build_index`` gets its
backbone as ``extractor_class`` (see features.gather), so indexing a folder whose
features are all cached reads the cache with numpy alone. Queries need the
backbone: tl_app.insight.similarity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.errors import ConfigError, ModelNotFoundError, TlAppError
from tl_app.features.gather import extract_features
from tl_app.models.embedding_space import PROJECTION_FILE, Projection

VECTORS_FILE = "vectors.npy"
META_FILE = "index.json"
INDEX_VERSION = 1
CHUNK_ROWS = 65_536


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows in float32; all-zero rows stay zero."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def similarities(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Q x N cosine similarities of unit queries to the unit rows of ``matrix``."""
    if matrix.dtype == np.float32:
        return queries @ matrix.T
    out = np.empty((len(queries), len(matrix)), np.float32)
    for start in range(0, len(matrix), CHUNK_ROWS):  # float16 storage, float32 BLAS
        block = np.asarray(matrix[start:start + CHUNK_ROWS], np.float32)
        out[:, start:start + len(block)] = queries @ block.T
    return out


def top_k(matrix: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities), each Q x k, most similar first (ties: lower index first)."""
    queries = normalize(np.atleast_2d(queries))
    sims = similarities(matrix, queries)
    k = max(1, min(int(k), sims.shape[1]))
    if k < sims.shape[1]:
        candidates = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
    chosen = np.take_along_axis(sims, candidates, axis=1)
    order = np.lexsort((candidates, -chosen), axis=1)
    indices = np.take_along_axis(candidates, order, axis=1)
    return indices, np.take_along_axis(chosen, order, axis=1)


def naive_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The obvious loop: cosine to each raw vector in Python, then a full sort (benchmark baseline)."""
    query = np.asarray(query, np.float32)
    qnorm = float(np.linalg.norm(query))
    scores = []
    for i, vector in enumerate(vectors):
        denom = qnorm * float(np.linalg.norm(vector))
        scores.append((i, float(np.dot(query, vector)) / denom if denom else 0.0))
    scores.sort(key=lambda item: -item[1])
    return scores[:k]


@dataclass
class SimilarityIndex:
    """Unit feature vectors, one entry per image, and the recipe that produced them."""

    vectors: np.ndarray
    items: list[dict]
    recipe: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def from_features(cls, features: np.ndarray, items: list[dict], recipe: dict,
                      dtype: str = "float32") -> "SimilarityIndex":
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"index dtype must be float32 or float16, got {dtype!r}.")
        if len(features) != len(items):
            raise ValueError("features and items differ in length")
        return cls(normalize(features).astype(dtype), list(items), dict(recipe, dtype=dtype))

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[dict]]:
        """For each query vector, the k nearest entries with similarity and cosine distance."""
        if not len(self):
            return [[] for _ in range(len(np.atleast_2d(queries)))]
        indices, sims = top_k(self.vectors, queries, k)
        return [
            [dict(self.items[i], rank=r + 1, index=int(i), similarity=float(s), distance=float(1.0 - s))
             for r, (i, s) in enumerate(zip(row_i, row_s))]
            for row_i, row_s in zip(indices, sims)
        ]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / VECTORS_FILE, self.vectors)
        meta = {"version": INDEX_VERSION, "count": len(self), "dim": int(self.vectors.shape[1]),
                "recipe": self.recipe, "items": self.items}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True, upcast: bool = True) -> "SimilarityIndex":
        """Memory-maps the vectors; float16 storage is upcast to float32 once (queries then run at BLAS
        speed) unless ``upcast=False``, which keeps half the memory and converts blocks per query."""
        directory = Path(directory)
        if not (directory / META_FILE).is_file() or not (directory / VECTORS_FILE).is_file():
            raise ModelNotFoundError(
                f"{directory} is not a similarity index (expected {META_FILE} and {VECTORS_FILE}). "
                f"Build one with 'tl-app index DATA --backbone NAME --out {directory}'."
            )
        meta = json.loads((directory / META_FILE).read_text())
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r" if mmap else None)
        if upcast and vectors.dtype != np.float32:
            vectors = np.asarray(vectors, np.float32)
        if len(vectors) != len(meta["items"]):
            raise TlAppError(f"{directory} is inconsistent ({len(vectors)} vectors, {len(meta['items'])} items); "
                             f"rebuild it with 'tl-app index'.")
        return cls(vectors, meta["items"], meta.get("recipe", {}))


# ---- building from images ------------------------------------------------------
def item_of(record) -> dict:
    return {"path": record.path, "relpath": record.relpath, "label": record.label, "sha256": record.sha256}


def build_index(config, out: str | Path, dtype: str = "float32", echo=print, *, extractor_class: Callable,
                projection: Projection | None = None, projection_source: str = "") -> dict:
    """Index every usable image of ``config.data.root``, reusing the bottleneck feature cache;
    ``extractor_class`` (as in features.gather) is made only when an image is missing from it.

    With a metric run's ``projection`` the index holds its embeddings, not the backbone features; the
    projection is saved in the index folder and recorded in its recipe, so queries are embedded the same way.
    """
    say = echo or (lambda *a, **k: None)
    feature_set = extract_features(config, echo=echo, extractor_class=extractor_class)
    # the feature recipe, plus what a query needs to rebuild the model
    recipe = dict(feature_set.recipe, weights=config.backbone.weights, seed=config.backbone.seed,
                  data_root=str(config.data.root))
    vectors = feature_set.features
    if projection is not None:
        vectors = projection(np.asarray(vectors, np.float32))
        recipe["projection"] = {"file": PROJECTION_FILE, "source": str(projection_source),
                                "sha256": projection.digest(), "dim": projection.dim}
    index = SimilarityIndex.from_features(vectors, [item_of(r) for r in feature_set.records], recipe, dtype)
    index.save(out)
    if projection is not None:
        projection.save(Path(out) / PROJECTION_FILE)
    stats = dict(feature_set.stats)
    what = f"metric embeddings of {projection_source}" if projection is not None else "features"
    say(f"index: {len(index)} images x {index.vectors.shape[1]} {what} ({dtype}) -> {out}")
    return {"index": str(out), "count": len(index), "dim": int(index.vectors.shape[1]), "dtype": dtype,
            "space": "embeddings" if projection is not None else "features", "features": stats}


def query_projection(index_dir: str | Path, recipe: dict) -> Projection | None:
    """The projection an index's queries must go through (None for a feature index); refuses a changed file."""
    wanted = recipe.get("projection")
    if not wanted:
        return None
    path = Path(index_dir) / wanted.get("file", PROJECTION_FILE)
    if not path.is_file():
        raise TlAppError(f"{index_dir} was built with a metric run's embeddings but {path.name} is missing; "
                         f"rebuild it with 'tl-app index DATA --embeddings RUN --out {index_dir}'.")
    projection = Projection.load(path)
    if projection.digest() != wanted.get("sha256"):
        raise TlAppError(f"{path} is not the projection {index_dir} was built with (its checksum differs); "
                         f"rebuild the index with 'tl-app index DATA --embeddings RUN --out {index_dir}'.")
    return projection
