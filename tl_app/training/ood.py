"""Fitting the model's out-of-distribution scorer at the end of training (both strategies).

The scorer (k-NN cosine or class-conditional Mahalanobis, tl_app.models.ood) is
fitted on the training split's backbone features; its threshold is the score
that accepts ACCEPTANCE of the validation images (of the training images when
there is no validation split). The scorer's arrays go to ood.npz, the rest to
run.json's ``ood``; export adds the score to the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tl_app.models.ood import (ACCEPTANCE, OOD_FILE, SCORED, acceptance_threshold, feature_model, fit_knn,
                               fit_mahalanobis, save_scorer)
from tl_app.training.runs import write_run_info

MIN_IMAGES = 2  # per fit: fewer training images than this say nothing about a class's spread


def fit_ood(method: str, train_features, train_labels, val_features, run_dir: str | Path,
            acceptance: float = ACCEPTANCE) -> dict:
    """Fit, store (ood.npz + run.json ``ood``) and return the record; ``none`` writes only the method."""
    run_dir = Path(run_dir)
    if method == "none":
        record = {"method": "none"}
    elif len(train_features) < MIN_IMAGES:
        record = {"method": "none", "requested": method,
                  "reason": f"{len(train_features)} training image(s): at least {MIN_IMAGES} are needed"}
    else:
        held_out = len(val_features) > 0
        if method == "knn":
            scorer = fit_knn(train_features, train_labels)
            # training images scored against the others (leave-one-out: each would be its own nearest
            # neighbour) join the validation images, so a small validation split does not set the threshold alone
            inside = np.concatenate([scorer.score(val_features) if held_out else np.zeros(0),
                                     leave_one_out_knn(scorer)])
            details = {"k": scorer.k, "bank": int(scorer.bank.shape[0]), "dim": int(scorer.bank.shape[1])}
        else:
            scorer = fit_mahalanobis(train_features, train_labels)
            inside = scorer.score(val_features if held_out else train_features)
            details = {"dim": int(scorer.means.shape[1]), "shrinkage": scorer.shrinkage}
        threshold = acceptance_threshold(inside, acceptance)
        save_scorer(scorer, run_dir / OOD_FILE)
        threshold_on = "val" if held_out else "train"
        if method == "knn":
            threshold_on = ("val+" if held_out else "") + "train (leave-one-out)"
        record = {"method": method, "threshold": threshold, "acceptance": acceptance,
                  "accepted": float(np.mean(inside <= threshold)), "threshold_on": threshold_on,
                  "train_images": int(len(train_features)), "threshold_images": int(len(inside)),
                  **details, "file": OOD_FILE}
    write_run_info(run_dir, ood=record)
    return record


def leave_one_out_knn(scorer) -> np.ndarray:
    """Each bank row's score against the others: its (k+1)-th nearest, the first being itself."""
    similarity = scorer.bank @ scorer.bank.T
    k = min(scorer.k + 1, len(scorer.bank))
    return 1.0 - np.sort(similarity, axis=1)[:, -k]


def dataset_features(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(backbone features, labels) of a classifier over batches of (images, one-hot labels)."""
    features_of = feature_model(model)
    feats, labels = [], []
    for images, onehot in (dataset if dataset is not None else []):
        feats.append(np.asarray(features_of.predict_on_batch(images), np.float32))
        labels.append(np.argmax(np.asarray(onehot), axis=1))
    if not feats:
        return np.zeros((0, 1), np.float32), np.zeros(0, int)
    return np.concatenate(feats), np.concatenate(labels)


def fit_ood_on_datasets(method: str, model, train_dataset, val_dataset, run_dir) -> dict:
    """fit_ood with the features a (fine-tuned) model computes on un-augmented training and validation images."""
    if method == "none" or feature_model(model) is None:
        return fit_ood("none", [], [], [], run_dir)
    train_f, train_labels = dataset_features(model, train_dataset())
    val_f, _ = dataset_features(model, val_dataset)
    return fit_ood(method, train_f, train_labels, val_f, run_dir)


def ood_text(record: dict) -> str:
    if record.get("method") not in SCORED:
        return "ood: none" + (f" ({record['reason']})" if record.get("reason") else "")
    return (f"ood: {record['method']}, threshold {record['threshold']:.4g} accepts {record['accepted']:.1%} of "
            f"{record['threshold_images']} {record['threshold_on']} images")
