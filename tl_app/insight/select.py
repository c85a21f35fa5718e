"""Choosing the backbone for the user: a K-fold logistic probe per candidate, on its cached features.

A linear probe on frozen features ranks backbones for transfer well (Kornblith
et al., CVPR 2019) and costs one extraction per backbone, which the feature
cache keeps: the run that follows with the winner extracts nothing again.
Candidates are tried cheapest first (fewest parameters) until the time budget
is spent. The winner has the best mean probe accuracy; candidates within
``TIE`` of it count as tied, and the fastest of those wins.

The probe uses the train and validation splits only: the test split stays
unseen, so a later evaluation of the chosen model is still honest.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Sequence

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import ConfigError, TlAppError
from tl_app.features.extract import extract_features
from tl_app.insight.confident_learning import out_of_fold_probabilities, reduce_features, stratified_folds
from tl_app.models.backbones import REGISTRY, build_feature_model, get_spec, resolve_input_size

DEFAULT_BUDGET = "10m"
TIE = 0.005  # probe accuracies closer than this are a tie, broken by speed
SPEED_BATCH = 8


def parse_budget(text: str | int | float) -> float:
    """Seconds from "90s", "10m", "1h" or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"A time budget looks like 90s, 10m or 1h; got {text!r}.")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def candidate_list(names: str | Sequence[str] | None) -> list[str]:
    """Registry names, cheapest first; empty or None: every registered backbone."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    specs = [get_spec(n.strip()) for n in names] if names else list(REGISTRY.values())
    unique = {spec.name: spec for spec in specs}
    return [spec.name for spec in sorted(unique.values(), key=lambda spec: spec.params)]


def weights_for(weights: str, name: str) -> str:
    """The weights one candidate is probed with: ``weights`` as given, or, for a per-backbone list such as
    ``vgg16=hed-vgg16,none``, the entry named for this backbone, else the entry without a name (else
    imagenet, the configuration's default). Offline, only some backbones have pretrained weights; the
    list lets them be compared with the rest on random weights in one table."""
    if "=" not in str(weights):
        return weights
    named, default = {}, "imagenet"
    for item in (part.strip() for part in str(weights).split(",") if part.strip()):
        key, sep, value = item.partition("=")
        if not sep:
            default = item
        elif not value.strip():
            raise ConfigError(f"--weights {weights!r}: '{item}' names no weights. Expected NAME=WEIGHTS entries "
                              f"and at most one default, e.g. 'vgg16=hed-vgg16,none'.")
        else:
            named[get_spec(key.strip()).name] = value.strip()
    return named.get(get_spec(name).name, default)


def probe_scores(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5,
                 seed: int = 0) -> dict:
    """Out-of-fold accuracy (mean and sd over folds) and macro-F1 of a logistic probe."""
    labels = np.asarray(labels, np.int64)
    splits = stratified_folds(labels, num_classes, folds, seed)
    if not splits:
        raise TlAppError("Too few images to compare backbones: the probe needs at least two images of two "
                         "classes in each of two folds (train and val splits). Add images or lower --folds.")
    reduced = reduce_features(features, seed=seed)
    predicted = out_of_fold_probabilities(features, labels, num_classes, folds, seed, reduced=reduced).argmax(1)
    fold_acc = [float(np.mean(predicted[test] == labels[test])) for _, test in splits]
    f1 = []
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (labels == c))
        denominator = np.sum(predicted == c) + np.sum(labels == c)
        if np.sum(labels == c):
            f1.append(2 * tp / denominator if denominator else 0.0)
    return {"probe_accuracy": float(np.mean(fold_acc)), "probe_accuracy_sd": float(np.std(fold_acc)),
            "macro_f1": float(np.mean(f1)), "folds": len(splits)}


def images_per_second(model, size: int, batch: int = SPEED_BATCH, repeats: int = 3) -> float:
    """Steady forward-pass speed on in-memory tensors (compiled, after a warm-up call)."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    x = tf.random.uniform((batch, size, size, 3), 0, 255, seed=0)
    forward(x)
    started = time.perf_counter()
    for _ in range(repeats):
        np.asarray(forward(x))
    return batch * repeats / (time.perf_counter() - started)


def select_backbone(config: Config, candidates: str | Sequence[str] | None = None,
                    budget: str | float = DEFAULT_BUDGET, folds: int = 5, echo: Callable | None = print) -> dict:
    """Probe each candidate within the budget; returns the table (tried first) and the recommendation."""
    say = echo or (lambda *a, **k: None)
    names, budget_s = candidate_list(candidates), parse_budget(budget)
    started, rows = time.perf_counter(), []
    for name in names:
        spent = time.perf_counter() - started
        if spent >= budget_s:
            rows.append({"backbone": name, "status": f"not tried: the {budget_s:g} s budget was spent"})
            continue
        settings = config.with_overrides({"backbone.name": name, "backbone.layer": "",
                                          "backbone.weights": weights_for(config.backbone.weights, name)})
        spec = get_spec(name)
        try:
            size = resolve_input_size(spec, settings.backbone.input_size)
            feature_set = extract_features(settings, echo=None)
        except TlAppError as error:  # e.g. weights that fit another backbone, or ImageNet weights offline
            rows.append({"backbone": name, "status": f"skipped: {error}"})
            say(f"select: {name}: skipped ({str(error).splitlines()[0]})")
            continue
        rows_used = np.concatenate([feature_set.rows("train"), feature_set.rows("val")])
        features = np.asarray(feature_set.features, np.float32)[rows_used]
        scores = probe_scores(features, np.asarray(feature_set.labels)[rows_used], len(feature_set.classes),
                              folds, settings.train.seed)
        b = settings.backbone
        model = build_feature_model(spec, size, b.weights, b.seed, "", b.pooling)
        params = int(model.count_params()) + (features.shape[1] + 1) * len(feature_set.classes)
        row = {"backbone": name, "status": "probed", "input_size": size, "weights": b.weights, **scores,
               "images_per_second": images_per_second(model, size), "params": params,
               "float32_mb": params * 4 / 1e6, "images": int(len(rows_used)),
               "features": {k: feature_set.stats.get(k) for k in ("computed", "cached")}}
        rows.append(row)
        say(f"select: {name}: probe accuracy {row['probe_accuracy']:.3f} ± {row['probe_accuracy_sd']:.3f}, "
            f"macro-F1 {row['macro_f1']:.3f}, {row['images_per_second']:.1f} images/s")
    probed = [row for row in rows if row["status"] == "probed"]
    if not probed:
        reasons = "; ".join(f"{row['backbone']}: {row['status']}" for row in rows)
        raise TlAppError(f"No backbone could be probed ({reasons}). Check --weights (hed-vgg16 fits vgg16 only; "
                         f"ImageNet weights need 'tl-app weights import' offline) or raise --budget.")
    best = max(row["probe_accuracy"] for row in probed)
    tied = [row for row in probed if row["probe_accuracy"] >= best - TIE]
    winner = max(tied, key=lambda row: row["images_per_second"])
    why = (f"best probe accuracy ({winner['probe_accuracy']:.3f}, {winner['folds']}-fold logistic probe on the "
           f"train and val splits)" if len(tied) == 1 else
           f"fastest ({winner['images_per_second']:.1f} images/s) of {len(tied)} backbones whose probe accuracy "
           f"is within {TIE} of the best ({best:.3f})")
    say(f"select: recommended {winner['backbone']}: {why}")
    return {"recommended": winner["backbone"], "recommended_weights": winner["weights"], "why": why, "table": rows,
            "budget_s": budget_s,
            "elapsed_s": time.perf_counter() - started, "weights": config.backbone.weights}


def table_text(selection: dict) -> str:
    """The comparison as an aligned text table, the recommendation marked (and each row's weights when they
    differ between rows)."""
    mixed = len({row.get("weights") for row in selection["table"] if row["status"] == "probed"}) > 1
    w = max([12] + [len(row["backbone"]) for row in selection["table"]])
    lines = [f"{'backbone':<{w}} {'size':>4} {'probe acc':>15} {'macro-F1':>8} {'img/s':>7} {'params':>11} "
             f"{'fp32 MB':>8}"]
    for row in selection["table"]:
        mark = " *" if row["backbone"] == selection["recommended"] else ""
        if row["status"] != "probed":
            lines.append(f"{row['backbone']:<{w}} {row['status']}")
            continue
        accuracy = f"{row['probe_accuracy']:.3f} ± {row['probe_accuracy_sd']:.3f}"
        lines.append(f"{row['backbone']:<{w}} {row['input_size']:>4} {accuracy:>15} {row['macro_f1']:>8.3f} "
                     f"{row['images_per_second']:>7.1f} {row['params']:>11,} {row['float32_mb']:>8.1f}"
                     f"{'  weights ' + row['weights'] if mixed else ''}{mark}")
    lines.append(f"* recommended: {selection['recommended']} ({selection['why']})")
    return "\n".join(lines)
