"""2-D maps of feature space (PCA or t-SNE), coloured by class.

Features come from the cheapest place that has them: a similarity index, a
feature folder written by ``tl-app extract``, or (for an image folder) the
bottleneck feature cache via ``tl_app.features.gather.extract_features``.

This module imports neither TensorFlow nor Keras: the backbone arrives as
``extractor_class`` and is made only when an image is missing from the cache
(tl_app.insight.embed hands in this process's Extractor).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.errors import ConfigError, DataError, unknown_choice
from tl_app.insight.similarity_index import META_FILE, VECTORS_FILE, SimilarityIndex
from tl_app.features.gather import extract_features
from tl_app.features.store import load_feature_dir
from tl_app.core.config import Config
from tl_app.insight.plots import scatter_2d
from tl_app.models.embedding_space import BACKBONE_FILE, Projection, projection_in
from tl_app.models.artifacts import CARD_FILE, RUN_FILE, is_complete_version, list_versions, read_card, read_run_info, resolve_version_dir

METHODS = ("pca", "tsne")
SPACES = ("auto", "features", "embeddings")  # auto: a metric run's embeddings, else the backbone features
SILHOUETTE_SAMPLE = 3000


def load_points(source: str | Path, config=None, echo=print, *, extractor_class: Callable,
                space: str = "auto") -> tuple[np.ndarray, list[str], list[str], str]:
    """(features N x D, label per row, classes, where they came from); ``extractor_class`` runs the backbone
    for images missing from the cache (features.gather). For a metric run (or its export), ``space`` auto or
    embeddings maps its learned embeddings instead of the backbone features."""
    if space not in SPACES:
        raise ConfigError(unknown_choice("space", space, SPACES))
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist. Expected a feature folder (tl-app extract), a similarity "
                        f"index (tl-app index) or an image folder with one sub-folder per class.")
    if (source / META_FILE).is_file() and (source / VECTORS_FILE).is_file():
        index = SimilarityIndex.load(source)
        labels = [item.get("label", "") for item in index.items]
        return np.asarray(index.vectors, np.float32), labels, sorted(set(labels)), f"similarity index {source}"
    recipe = model_recipe(source, config)
    projection = metric_projection(source) if recipe is not None and space != "features" else None
    if space == "embeddings" and projection is None:
        raise DataError(f"{source} has no learned embeddings (projection.npz): only a run trained with "
                        f"'--strategy metric', or its export, has them. Use --space features or auto.")
    if recipe is not None:  # a run or an exported model: its backbone and recipe, on the data it trained on
        feature_set = extract_features(recipe, echo=echo, extractor_class=extractor_class)
        origin = (f"{recipe.backbone.name} features (the recipe of {source}, pretrained backbone) of "
                  f"{recipe.data.root}")
        if projection is not None:
            labels = [r.label for r in feature_set.records]
            return (projection(feature_set.features), labels, list(feature_set.classes) or sorted(set(labels)),
                    f"metric embeddings ({projection.dim}-d) of {source}, from its {origin}")
    elif looks_like_feature_dir(source):
        feature_set = load_feature_dir(source)
        origin = f"feature folder {source}"
    else:
        config = config or Config()
        config = config.with_overrides({"data.root": str(source)})
        feature_set = extract_features(config, echo=echo, extractor_class=extractor_class)
        origin = f"{config.backbone.name} features of {source} (bottleneck cache)"
    labels = [r.label for r in feature_set.records]
    classes = list(feature_set.classes) or sorted(set(labels))
    return np.asarray(feature_set.features, np.float32), labels, classes, origin


def model_recipe(source: Path, config=None) -> Config | None:
    """The feature settings of a run folder or an exported model (version) folder, with the data root it was
    trained on; None for anything else. The feature cache stays the one of ``config``."""
    if (source / RUN_FILE).is_file():
        info, config_file = read_run_info(source), source / "config.json"
        saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
        folder = source
    elif (source / CARD_FILE).is_file() or any(is_complete_version(source / str(v)) for v in list_versions(source)):
        folder = resolve_version_dir(source)
        info = read_card(folder)
        saved = info.get("config") or {}
    else:
        return None
    recipe = Config.from_dict(saved, source=str(source)) if saved else Config()
    root = info.get("data_root") or recipe.data.root
    if not root or not Path(root).is_dir():
        raise DataError(f"{source} was trained on {root!r}, which is not a folder here. Pass the image folder "
                        f"itself: tl-app embed IMAGES --backbone {info.get('backbone') or recipe.backbone.name} "
                        f"--weights {info.get('weights') or recipe.backbone.weights}.")
    overrides = {"data.root": str(root)}
    if info.get("backbone"):
        overrides["backbone.name"] = info["backbone"]
    if (folder / BACKBONE_FILE).is_file():  # a metric run that trained its backbone: features from that backbone
        overrides["backbone.weights"] = str((folder / BACKBONE_FILE).resolve())
    if config is not None:
        overrides["features.cache_dir"] = config.features.cache_dir
    return recipe.with_overrides(overrides)


def metric_projection(source: Path) -> Projection | None:
    """The learned projection of a metric run, or of an exported model version of one; None otherwise."""
    if (source / RUN_FILE).is_file():
        return projection_in(source)
    return projection_in(resolve_version_dir(source))


def embedding_recipe(run: str | Path, data: str | Path, config=None) -> tuple[Config, Projection]:
    """(the feature settings of metric run ``run`` applied to image folder ``data``, its projection), for an
    index of ``data`` in the run's embedding space. The backbone, weights, size and layer are the run's: the
    projection only fits the features it was trained on."""
    run = Path(run)
    recipe = model_recipe(run, config) if run.is_dir() else None
    projection = metric_projection(run) if recipe is not None else None
    if projection is None:
        raise DataError(f"{run} is not a metric run or its export (expected run.json or a model card, and "
                        f"projection.npz). Train one with 'tl-app train DATA --strategy metric'.")
    return recipe.with_overrides({"data.root": str(data)}), projection


def looks_like_feature_dir(path: Path) -> bool:
    """A folder of arrays (written by extract), not a folder of class sub-folders of images."""
    if not path.is_dir():
        return False
    return any(p.suffix in (".npy", ".npz") for p in path.iterdir() if p.is_file())


def project(features: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, dict]:
    """Two coordinates per row, plus what the projection kept (explained variance for PCA)."""
    from sklearn.decomposition import PCA

    if method not in METHODS:
        raise ConfigError(unknown_choice("embedding method", method, METHODS))
    n = len(features)
    if n < 3:
        raise DataError(f"A 2-D map needs at least 3 feature vectors, got {n}.")
    features = np.asarray(features, np.float64)
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed)
        points = pca.fit_transform(features)
        return points, {"explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_]}
    from sklearn.manifold import TSNE

    reduced = PCA(n_components=min(50, n, features.shape[1]), random_state=seed).fit_transform(features) \
        if features.shape[1] > 50 else features
    perplexity = float(max(2.0, min(30.0, (n - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    return points, {"perplexity": perplexity}


def silhouette(points: np.ndarray, labels: np.ndarray, seed: int = 0) -> float | None:
    """How well classes separate (-1..1); None when it is undefined."""
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2 or len(set(labels.tolist())) >= len(labels):
        return None
    size = min(len(labels), SILHOUETTE_SAMPLE)
    return float(silhouette_score(points, labels, sample_size=size, random_state=seed))


def embed(source: str | Path, method: str = "pca", out: str | Path = "embedding.png", config=None,
          seed: int = 0, echo=print, *, extractor_class: Callable, space: str = "auto") -> dict:
    """Write the scatter PNG (and the coordinates as CSV next to it); returns a summary."""
    say = echo or (lambda *a, **k: None)
    if method not in METHODS:
        raise ConfigError(unknown_choice("embedding method", method, METHODS))
    features, labels, classes, origin = load_points(source, config, echo, extractor_class=extractor_class,
                                                    space=space)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in labels], int)
    points, extra = project(features, method, seed)
    out = Path(out)
    title = f"{method.upper()} of {len(features)} feature vectors ({features.shape[1]}-d)"
    if "explained_variance_ratio" in extra:
        title += " - variance kept {:.0%}".format(sum(extra["explained_variance_ratio"]))
    scatter_2d(points, y, classes, out, title=title)
    coordinates = out.with_suffix(".csv")
    with open(coordinates, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "label"])
        writer.writerows([[f"{a:.6f}", f"{b:.6f}", label] for (a, b), label in zip(points, labels)])
    summary = {"source": origin, "method": method, "count": int(len(features)), "dim": int(features.shape[1]),
               "classes": classes, "plot": str(out), "coordinates": str(coordinates),
               "silhouette_2d": silhouette(points, y, seed), **extra}
    say(f"{method}: {len(features)} points from {origin} -> {out}")
    return summary
