"""Fitting a temperature on held-out probabilities, and the calibration figures (ECE, MCE, NLL, Brier).

Training ends with ``calibration_record``: the temperature that minimises the
validation negative log-likelihood (golden-section search on log T), with the
figures before and after, stored in run.json; export applies it in the graph
(models.calibration.TemperatureScaling). Evaluation reuses the figures.

A temperature from a few dozen validation images is noisy. The bottleneck route
(heads train in seconds on cached features) therefore fits it, when validation
has fewer than ``train.calibration_oof_below`` images, on out-of-fold
probabilities: k stratified folds over train+val, a fresh head per fold, each
image scored by the head that did not see it (``out_of_fold_probabilities``).
Fine-tuning keeps fitting on validation: a backbone per fold costs too much.
"""

from __future__ import annotations

import math

import numpy as np

from tl_app.models.calibration import scale_probabilities

from tl_app.core.config import CALIBRATIONS  # noqa: F401  (the choices live with the defaults)
ECE_BINS = 15
LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # T from 0.05 (sharpen) to 20 (soften)
MIN_IMAGES = 2  # fewer validation images than this cannot say anything about confidence
OOF_FOLDS = 5  # folds of the out-of-fold fit (fewer when there are fewer images)


# ---- figures -------------------------------------------------------------------------
def nll(probabilities, labels) -> float:
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0)))) if len(labels) else 0.0


def brier(probabilities, labels) -> float:
    """Mean over images of the squared distance to the one-hot label (summed over classes)."""
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    if not len(labels):
        return 0.0
    onehot = np.zeros_like(p)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def reliability_bins(probabilities, labels, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins (lower edge open, upper closed): count, mean confidence, accuracy."""
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    confidence = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == labels) if len(p) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                    "confidence": float(confidence[mask].mean()) if n else None,
                    "accuracy": float(correct[mask].mean()) if n else None})
    return out


def calibration_figures(probabilities, labels, bins: int = ECE_BINS) -> dict:
    """ECE (count-weighted |accuracy - confidence| over equal-width bins), MCE (the largest gap), NLL, Brier."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(b["count"] for b in table)
    gaps = [abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]]
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]) / total if total else 0.0
    p = np.asarray(probabilities, np.float64)
    accuracy = float(np.mean(p.argmax(axis=1) == np.asarray(labels, int))) if total else 0.0
    return {"ece": float(ece), "mce": float(max(gaps)) if gaps else 0.0, "nll": nll(p, labels),
            "brier": brier(p, labels), "accuracy": accuracy, "images": int(total), "bins": bins}


# ---- fitting ----------------------------------------------------------------------------
def fit_temperature(probabilities, labels, tolerance: float = 1e-4) -> float:
    """The T that minimises the NLL of softmax(log(p) / T): golden-section search on log T (NLL is convex in 1/T)."""
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)

    def loss(log_t: float) -> float:
        return nll(scale_probabilities(p, math.exp(log_t)), labels)

    low, high = LOG_T_RANGE
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > tolerance:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    best = (low + high) / 2.0
    # a flat or increasing loss (already calibrated): keep T = 1 unless the search found a real improvement
    return math.exp(best) if loss(best) < loss(0.0) else 1.0


def calibration_record(method: str, probabilities, labels, out_of_fold: dict | None = None) -> dict:
    """run.json's ``calibration``: the method, the temperature and the validation figures before and after.

    With ``out_of_fold`` ({"probabilities", "labels", "folds"}, see ``out_of_fold_probabilities``) the
    temperature is fitted on those alone (``fitted_on: "oof"``) and their figures are kept under ``oof``;
    ``before``/``after`` stay the validation split's, as evaluate and the report read them. Without it the
    temperature is fitted on validation (``fitted_on: "val"``: fine-tuning, or enough validation images).
    """
    labels = np.asarray(labels, int)
    if method == "none":
        return {"method": "none"}
    if len(labels) < MIN_IMAGES:
        return {"method": "none", "requested": method,
                "reason": f"{len(labels)} validation image(s): at least {MIN_IMAGES} are needed to fit a temperature"}
    if out_of_fold is None:
        temperature = fit_temperature(probabilities, labels)
        source = {"fitted_on": "val"}
    else:
        oof_probs, oof_labels = out_of_fold["probabilities"], np.asarray(out_of_fold["labels"], int)
        temperature = fit_temperature(oof_probs, oof_labels)
        source = {"fitted_on": "oof", "folds": int(out_of_fold["folds"]), "oof_images": int(len(oof_labels)),
                  "oof": {"before": calibration_figures(oof_probs, oof_labels),
                          "after": calibration_figures(scale_probabilities(oof_probs, temperature), oof_labels)}}
    return {"method": "temperature", "temperature": temperature, **source, "images": int(len(labels)),
            "before": calibration_figures(probabilities, labels),
            "after": calibration_figures(scale_probabilities(probabilities, temperature), labels)}


def record_text(record: dict) -> str:
    """One console line for the end of training: the temperature, what it was fitted on, the validation figures."""
    if record.get("method") != "temperature":
        return "calibration: none" + (f" ({record['reason']})" if record.get("reason") else "")
    b, a = record["before"], record["after"]
    figures = f"ECE {b['ece']:.4f} -> {a['ece']:.4f}, NLL {b['nll']:.4f} -> {a['nll']:.4f}"
    if record.get("fitted_on") == "oof":
        o = record["oof"]
        return (f"calibration: temperature {record['temperature']:.3f} fitted on out-of-fold probabilities of "
                f"{record['oof_images']} train+val images ({record['folds']} folds; OOF NLL {o['before']['nll']:.4f} "
                f"-> {o['after']['nll']:.4f}); on {record['images']} validation images {figures}")
    return f"calibration: temperature {record['temperature']:.3f} fitted on {record['images']} validation images ({figures})"


def uses_out_of_fold(method: str, validation_images: int, below: int) -> bool:
    """The bottleneck route's choice: out-of-fold when validation is small (``below`` = 0 turns it off)."""
    return method == "temperature" and below > 0 and MIN_IMAGES <= validation_images < below


def stratified_folds(labels, folds: int, seed: int) -> np.ndarray:
    """A fold number per row: each class shuffled (seeded) and dealt round-robin, so folds keep class shares.

    The deal continues across classes, so a class with fewer images than folds does not pile into fold 0.
    """
    labels = np.asarray(labels, int)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), np.int64)
    start = 0
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        out[rows] = (start + np.arange(len(rows))) % folds
        start += len(rows)
    return out


def out_of_fold_probabilities(fit_predict, labels, num_classes: int, seed: int,
                              folds: int = OOF_FOLDS) -> dict:
    """Every row's probabilities from a model fitted without it: ``fit_predict(fit_rows, held_rows)``
    trains a fresh model on ``fit_rows`` and returns its probabilities for ``held_rows``.

    Returns {"probabilities", "labels", "folds"}, ready for ``calibration_record(out_of_fold=...)``.
    """
    labels = np.asarray(labels, int)
    folds = max(2, min(int(folds), len(labels)))
    fold_of = stratified_folds(labels, folds, seed)
    probabilities = np.zeros((len(labels), num_classes), np.float64)
    for k in range(folds):
        held = np.flatnonzero(fold_of == k)
        probabilities[held] = np.asarray(fit_predict(np.flatnonzero(fold_of != k), held), np.float64)
    return {"probabilities": probabilities, "labels": labels, "folds": folds}


def dataset_probabilities(model, dataset, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of a model over batches of (images, one-hot labels); empty without a dataset."""
    probs, labels = [], []
    for images, onehot in (dataset if dataset is not None else []):
        probs.append(np.asarray(model.predict_on_batch(images), np.float32))
        labels.append(np.argmax(np.asarray(onehot), axis=1))
    if not probs:
        return np.zeros((0, num_classes), np.float32), np.zeros(0, int)
    return np.concatenate(probs), np.concatenate(labels)


# ---- selective prediction: accuracy as the least confident answers are withheld --------
COVERAGES = (1.0, 0.9, 0.8, 0.5)  # the points evaluate reports; the PNG draws the whole curve


def risk_coverage(probabilities, labels, scores=None) -> dict:
    """Accuracy of the kept answers when the least confident ones are rejected first.

    ``scores`` rank the rejection (higher = rejected first); the default is 1 - the top probability.
    Returns the curve (coverage k/n against accuracy of the k most confident, k = 1..n), the
    accuracy at ``COVERAGES`` and AURC, the mean risk (1 - accuracy) over the curve: lower is better,
    and 1 - accuracy for a ranking that knows nothing.
    """
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, int)
    if not len(labels):
        return {"coverage": [], "accuracy": [], "at": {}, "aurc": 0.0, "images": 0}
    rank = 1.0 - p.max(axis=1) if scores is None else np.asarray(scores, np.float64)
    order = np.argsort(rank, kind="stable")  # most confident first
    correct = (p.argmax(axis=1) == labels)[order].astype(np.float64)
    kept = np.arange(1, len(labels) + 1)
    accuracy = np.cumsum(correct) / kept
    coverage = kept / len(labels)
    at = {f"{c:.2f}": float(accuracy[max(0, int(np.ceil(c * len(labels))) - 1)]) for c in COVERAGES}
    return {"coverage": coverage.tolist(), "accuracy": accuracy.tolist(), "at": at,
            "aurc": float(np.mean(1.0 - accuracy)), "images": int(len(labels))}
