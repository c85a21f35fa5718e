"""Label issues by confident learning (Northcutt, Jiang and Chuang, JAIR 2021).

Out-of-fold probabilities come from K logistic heads on cached features, so no
image is judged by a head that saw its label. The per-class threshold t_j is
the mean probability of class j over the images labelled j; an image counts
toward class j when p_j >= t_j (the largest such p_j when several pass). The
images whose counted class differs from their given label are the off-diagonal
of the confident joint: the candidates, ranked by the normalised margin
p[suggested] - p[given].
"""

from __future__ import annotations

import warnings

import numpy as np


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5,
                              seed: int = 0, max_dim: int = 128, reduced: np.ndarray | None = None) -> np.ndarray:
    """[N, C] probabilities, each row from a logistic head trained on the other folds.

    Features are centred and, above ``max_dim`` dimensions, projected by PCA
    (fitted on all rows, labels unseen) so 10,000 images take seconds on 2 cores;
    ``reduced`` passes that projection in when the caller already made it.
    A class too small for ``folds`` folds lowers the fold count (at least 2).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = reduced if reduced is not None else reduce_features(features, max_dim, seed)
    labels = np.asarray(labels, np.int64)
    probs = np.zeros((len(labels), num_classes), np.float64)
    splits = stratified_folds(labels, num_classes, folds, seed)
    if not splits:
        probs[np.arange(len(labels)), labels] = 1.0  # nothing to learn from: no candidates
        return probs
    for train, test in splits:
        head = LogisticRegression(max_iter=200, tol=1e-3, C=1.0)
        with warnings.catch_warnings():  # the 200-step cap is for speed; bench_doctor measures the ranking it gives
            warnings.simplefilter("ignore", ConvergenceWarning)
            head.fit(x[train], labels[train])
        probs[np.ix_(test, head.classes_)] = head.predict_proba(x[test])
    return probs


def stratified_folds(labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0) -> list:
    """(train, test) index pairs of a shuffled stratified K-fold, K lowered to the smallest class (at least 2).

    Empty when there is nothing to learn from: fewer than two classes, or too few images for two folds.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    k = int(max(2, min(folds, present.min() if len(present) else 2)))
    if len(present) < 2 or len(labels) < 2 * k:
        return []
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def reduce_features(features: np.ndarray, max_dim: int = 128, seed: int = 0, standardise: bool = False) -> np.ndarray:
    """Centred features (one global scale), PCA-projected to ``max_dim`` when wider (label-free).

    A randomised range finder with two power iterations (Halko et al. 2011) in
    numpy: the same projection as scikit-learn's randomised PCA, without its
    seconds-long import.
    """
    x = np.asarray(features, np.float32)
    x = x - x.mean(axis=0)
    if standardise:  # every unit weighs the same: what near-duplicate angles are measured in
        x = x / (x.std(axis=0) + 1e-6)
    else:  # one scale for all: per-unit scaling blew up rare units and halved label precision (bench_doctor)
        x = x / (np.sqrt((x * x).mean()) + 1e-12)
    if x.shape[1] <= max_dim or x.shape[0] <= max_dim:
        return x
    rng = np.random.default_rng(seed)
    q = x @ rng.standard_normal((x.shape[1], max_dim + 10)).astype(np.float32)
    for _ in range(2):
        q, _ = np.linalg.qr(q)
        q, _ = np.linalg.qr(x.T @ q)
        q = x @ q
    q, _ = np.linalg.qr(q)
    u, s, _ = np.linalg.svd(q.T @ x, full_matrices=False)
    return ((q @ u[:, :max_dim]) * s[:max_dim]).astype(np.float32)


def per_class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j: the mean p_j over the images labelled j (1.0 for a class nobody carries: never passed)."""
    thresholds = np.ones(probs.shape[1])
    for j in range(probs.shape[1]):
        rows = labels == j
        if rows.any():
            thresholds[j] = probs[rows, j].mean()
    return thresholds


def confident_classes(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per image, the class it confidently belongs to (-1: none passes its threshold)."""
    passing = probs >= thresholds[None, :] - 1e-12
    masked = np.where(passing, probs, -np.inf)
    best = masked.argmax(axis=1)
    return np.where(passing.any(axis=1), best, -1)


def confident_joint(labels: np.ndarray, confident: np.ndarray, num_classes: int) -> np.ndarray:
    """C[i, j]: images labelled i that confidently belong to j."""
    joint = np.zeros((num_classes, num_classes), np.int64)
    for given, true in zip(labels, confident):
        if true >= 0:
            joint[given, true] += 1
    return joint


def label_issues(probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Candidates (off-diagonal of the confident joint), best first: row, given, suggested, score.

    score = p[suggested] - p[given], in [0, 1]: how much more the held-out heads
    believe the suggestion than the given label.
    """
    labels = np.asarray(labels, np.int64)
    thresholds = per_class_thresholds(probs, labels)
    confident = confident_classes(probs, thresholds)
    rows = np.flatnonzero((confident >= 0) & (confident != labels))
    found = [{"row": int(i), "given": int(labels[i]), "suggested": int(confident[i]),
              "score": float(probs[i, confident[i]] - probs[i, labels[i]]),
              "p_given": float(probs[i, labels[i]]), "p_suggested": float(probs[i, confident[i]])}
             for i in rows]
    found = [f for f in found if f["score"] > 0]
    return sorted(found, key=lambda f: -f["score"])
