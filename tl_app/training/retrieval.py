"""Retrieval quality of a feature space: recall@k and mean average precision (numpy, no TensorFlow).

Protocol (one for every caller, so figures compare): each validation image is a
query, the training images are the gallery, ranked by cosine similarity of
centred features (the gallery's mean removed); a gallery image is relevant
when it has the query's class. recall@k is the share of queries with at least
one relevant image among their k nearest (the metric-learning literature's
recall@k); mAP averages each query's average precision over the whole ranking.
The gallery is the training split because it is what a k-NN head searches and
because a small validation split would leave each query only a few
same-class partners.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5)


def _normalized(x: np.ndarray, center: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64) - center
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=KS) -> dict:
    """{"recall@1", "recall@5", "map", "queries", "gallery"}; None figures without queries or gallery."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    out = {"queries": int(len(query_labels)), "gallery": int(len(gallery_labels))}
    if len(query_labels) == 0 or len(gallery_labels) == 0:
        return {**out, **{f"recall@{k}": None for k in ks}, "map": None}
    center = np.asarray(gallery, np.float64).mean(0)
    sims = _normalized(query, center) @ _normalized(gallery, center).T
    order = np.argsort(-sims, axis=1, kind="stable")
    relevant = gallery_labels[order] == query_labels[:, None]  # [Q, G], in ranked order
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(relevant[:, :k].any(1)))
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, relevant.shape[1] + 1)
    counts = relevant.sum(1)
    ap = np.where(counts > 0, (precision * relevant).sum(1) / np.maximum(counts, 1), 0.0)
    out["map"] = float(ap[counts > 0].mean()) if np.any(counts > 0) else None
    return out


def retrieval_text(before: dict, after: dict | None = None) -> str:
    """One line: the figures of the plain features, and of the learned embeddings when given."""
    def row(r):
        return " ".join(f"{k} {r[k]:.3f}" if r.get(k) is not None else f"{k} -" for k in ("recall@1", "recall@5", "map"))

    line = f"retrieval (val queries vs train gallery, {before['queries']} x {before['gallery']}): features {row(before)}"
    return line + (f"; embeddings {row(after)}" if after is not None else "")
