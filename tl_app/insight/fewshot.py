"""N-way K-shot episodes on a backbone's features: how many images a new class needs.

Each episode draws ``way`` classes, ``shot`` support and ``queries`` query images
per class, and classifies the queries by the nearest support prototype of
centred, L2-normalised features (SimpleShot), which is what the prototype head
does. The mean accuracy over episodes comes with a 95% confidence interval
(1.96 standard errors), the form few-shot papers report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import ConfigError, DataError
from tl_app.data.scan import scan_dataset
from tl_app.features.extract import extract_features
from tl_app.models.fewshot_heads import l2_normalize
from tl_app.training.class_edit import open_source

DEFAULT_SHOTS = (1, 5, 10)


def parse_shots(shots) -> list[int]:
    if isinstance(shots, str):
        shots = [s for s in shots.replace(" ", "").split(",") if s]
    try:
        out = sorted({int(s) for s in shots or DEFAULT_SHOTS})
    except ValueError:
        raise ConfigError(f"--shot takes whole numbers, e.g. --shot 1,5,10; got {shots!r}.") from None
    if not out or out[0] < 1:
        raise ConfigError(f"--shot values must be 1 or more; got {shots!r}.")
    return out


def run_episodes(features: np.ndarray, labels: np.ndarray, way: int, shot: int, episodes: int = 600,
                 queries: int = 15, seed: int = 0) -> dict:
    """Mean accuracy and 95% CI of ``episodes`` way-way shot-shot episodes (classes with too few images skipped)."""
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = [c for c, rows in by_class.items() if len(rows) >= shot + 1]
    if len(eligible) < way:
        raise DataError(f"{way}-way {shot}-shot episodes need {way} classes with at least {shot + 1} images "
                        f"(shot + 1 query); only {len(eligible)} have that many. Lower --way or --shot, or add images.")
    queries = int(min(queries, min(len(by_class[c]) for c in eligible) - shot))
    z = l2_normalize(features - features.mean(0))  # centring: SimpleShot's CL2N
    rng = np.random.default_rng(seed)
    accuracies = np.empty(episodes)
    for e in range(episodes):
        chosen = rng.choice(eligible, size=way, replace=False)
        support, query, query_labels = [], [], []
        for i, c in enumerate(chosen):
            rows = rng.permutation(by_class[c])
            support.append(z[rows[:shot]].mean(0))
            query.append(z[rows[shot:shot + queries]])
            query_labels.append(np.full(queries, i))
        prototypes = l2_normalize(np.stack(support))
        predicted = (np.concatenate(query) @ prototypes.T).argmax(1)
        accuracies[e] = np.mean(predicted == np.concatenate(query_labels))
    half = 1.96 * accuracies.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else float("nan")
    return {"way": int(way), "shot": int(shot), "queries": queries, "episodes": int(episodes),
            "accuracy": float(accuracies.mean()), "ci95": float(half), "chance": 1.0 / way}


def fewshot_report(model, data=None, episodes: int = 600, way: int = 5, shots=DEFAULT_SHOTS, queries: int = 15,
                   seed: int = 0, echo=print) -> dict:
    """Episodes on the features ``model``'s backbone gives ``data`` (default: the model's training folder)."""
    say = echo or (lambda *a, **k: None)
    if episodes < 1 or way < 2 or queries < 1:
        raise ConfigError(f"--episodes must be >= 1, --way >= 2 and queries >= 1; got {episodes}, {way}, {queries}.")
    shots = parse_shots(shots)
    opened = open_source(model)
    config = Config.from_dict(opened["config"], source=str(model)) if opened["config"] else Config()
    if data is not None:
        config.data.root = str(data)
    config.data.val_fraction = config.data.test_fraction = 0.0  # episodes draw from every image
    if not Path(config.data.root).is_dir():
        raise DataError(f"Image folder {config.data.root!r} does not exist; pass DATA (a folder of class folders).")
    manifest = scan_dataset(config)
    feature_set = extract_features(config, manifest=manifest, echo=echo)
    features, labels = np.asarray(feature_set.features, np.float32), np.asarray(feature_set.labels)
    results = [run_episodes(features, labels, way, shot, episodes, queries, seed) for shot in shots]
    for r in results:
        say(f"{r['way']}-way {r['shot']}-shot: accuracy {r['accuracy']:.3f} ± {r['ci95']:.3f} (95% CI, "
            f"{r['episodes']} episodes, {r['queries']} queries per class; chance {r['chance']:.3f})")
    info = opened["info"]
    return {"model": str(model), "data": config.data.root, "backbone": info.get("backbone"),
            "weights": info.get("weights"), "images": int(len(labels)), "classes": list(feature_set.classes),
            "results": results}
