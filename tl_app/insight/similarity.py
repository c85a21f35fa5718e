"""Image retrieval from query images: embed them with the index's recipe, then search.

The index itself (building, saving, searching vectors) is numpy only and lives
in tl_app.insight.similarity_index; this module adds what needs the backbone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tl_app.core.errors import ConfigError
from tl_app.features.extract import Extractor
from tl_app.models.backbones import build_feature_model, get_spec
from tl_app.data.pipeline import load_images
from tl_app.insight.plots import GOOD, NEUTRAL, Tile, contact_sheet
from tl_app.insight.similarity_index import (CHUNK_ROWS, INDEX_VERSION, META_FILE, VECTORS_FILE,  # noqa: F401
                                             SimilarityIndex, item_of, naive_top_k, normalize, query_projection,
                                             similarities, top_k)
from tl_app.models.embedding_space import Projection
from tl_app.insight.similarity_index import build_index as index_images


def build_index(config, out: str | Path, dtype: str = "float32", echo=print, extractor_class=None,
                projection: Projection | None = None, projection_source: str = "") -> dict:
    """similarity_index.build_index with this process's Extractor unless another is handed in."""
    return index_images(config, out, dtype, echo, extractor_class=extractor_class or Extractor,
                        projection=projection, projection_source=projection_source)


class QueryEmbedder:
    """Embeds query images with the index's recipe (same backbone, weights, size, resize)."""

    def __init__(self, recipe: dict, projection: Projection | None = None):

        self.recipe = recipe
        self.projection = projection  # a metric run's embedding space, when the index holds its embeddings
        self.model = build_feature_model(get_spec(recipe["backbone"]), recipe["input_size"], recipe["weights"],
                                         recipe.get("seed", 0), recipe.get("layer", ""), recipe.get("pooling", "avg"))

    def __call__(self, paths) -> tuple[np.ndarray, list[str], list[dict]]:
        """(features of the readable images, their paths, skipped [{path, reason}])."""
        images, kept, skipped = [], [], []
        background = tuple(self.recipe.get("background", (255, 255, 255)))
        for path in paths:
            try:
                images.append(load_images([path], self.recipe["input_size"], self.recipe["resize_policy"],
                                          background)[0])
                kept.append(str(path))
            except Exception as exc:  # noqa: BLE001 - a bad query is reported, not fatal
                skipped.append({"path": str(path), "reason": f"could not be read as an image: {exc}"})
        if not images:
            width = self.projection.dim if self.projection is not None else self.model.output_shape[-1]
            return np.zeros((0, width), np.float32), kept, skipped
        features = np.asarray(self.model.predict(np.stack(images), batch_size=32, verbose=0), np.float32)
        if self.projection is not None:
            features = self.projection(features)
        return features, kept, skipped


def content_hash(path: str | Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def without_self(hits: list[dict], digest: str | None, k: int) -> list[dict]:
    """The k best hits that are not the query itself (same content hash), ranked again from 1."""
    kept = [dict(hit) for hit in hits if digest is None or hit.get("sha256") != digest][:k]
    for rank, hit in enumerate(kept, 1):
        hit["rank"] = rank
    return kept


def similar(index_dir: str | Path, queries, k: int = 5, sheet: str | Path | None = None, echo=print,
            include_self: bool = False) -> dict:
    """K nearest indexed images for each query image, with cosine similarities; optional contact sheet.

    A query that is itself in the index (same content hash) is left out of its own neighbours unless
    ``include_self``: it would always be the first hit, at similarity 1.
    """
    say = echo or (lambda *a, **kw: None)
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}.")
    index = SimilarityIndex.load(index_dir)
    features, kept, skipped = QueryEmbedder(index.recipe, query_projection(index_dir, index.recipe))(list(queries))
    if include_self:
        results = index.search(features, k) if len(kept) else []
    else:  # copies of the query may be indexed more than once: ask for enough to still return k others
        copies = [sum(1 for item in index.items if item.get("sha256") == digest) if digest else 0
                  for digest in (content_hash(path) for path in kept)]
        wide = index.search(features, k + max(copies, default=0)) if len(kept) else []
        results = [without_self(hits, content_hash(path), k) for path, hits in zip(kept, wide)]
    out = {"index": str(index_dir), "k": k, "queries": [
        {"query": path, "neighbours": hits} for path, hits in zip(kept, results)], "skipped": skipped}
    for entry in out["queries"]:
        say(entry["query"])
        for hit in entry["neighbours"]:
            say(f"  {hit['rank']:>3}. {hit['similarity']:.4f}  {hit['label']:<16} {hit['path']}")
    for item in skipped:
        say(f"skipped {item['path']}: {item['reason']}")
    if sheet and out["queries"]:
        out["sheet"] = str(write_sheet(out["queries"], sheet))
        say(f"contact sheet: {out['sheet']}")
    return out


def write_sheet(queries: list[dict], path: str | Path) -> Path:
    """One row per query: the query, then its neighbours with similarity and label."""
    rows = []
    for entry in queries:
        row = [Tile(entry["query"], f"query\n{Path(entry['query']).name[:20]}", GOOD)]
        row += [Tile(hit["path"], f"#{hit['rank']} sim {hit['similarity']:.3f} {hit['label']}\n"
                                  f"{Path(hit['path']).name[:22]}", NEUTRAL)
                for hit in entry["neighbours"]]
        rows.append(row)
    return contact_sheet(rows, path, title="nearest images by cosine similarity")
