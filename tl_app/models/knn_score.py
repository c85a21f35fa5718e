"""The k-NN "unknown" scorer: cosine distance to the k-th nearest training feature, as a Keras layer.

Sun et al. (2022), "Out-of-distribution detection with deep nearest neighbors":
features are L2-normalised and an image's score is 1 - its cosine similarity
to the k-th most similar training image. It assumes nothing about the shape
of each class, which is why it beat the class-conditional Gaussian
(Mahalanobis) on the sample's out-of-distribution family with pretrained
features (bench/bench_ood.py). The layer holds the normalised training
features (a bank, at most ``MAX_BANK`` rows, sampled evenly per class), so the
model's files grow by bank x feature size x 4 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

K = 5  # the neighbour whose similarity is the score (the paper's figure for small banks)
MAX_BANK = 2048  # training features kept; sampled evenly per class beyond this


def normalised(features) -> np.ndarray:
    x = np.asarray(features, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


@dataclass
class Knn:
    """L2-normalised training features and k."""

    bank: np.ndarray  # [N, D]
    k: int = K

    def score(self, features) -> np.ndarray:
        similarity = normalised(features) @ self.bank.T
        k = min(self.k, self.bank.shape[0])
        return 1.0 - np.sort(similarity, axis=1)[:, -k]


def fit_knn(features, labels, k: int = K, max_bank: int = MAX_BANK, seed: int = 0) -> Knn:
    """The bank: every training feature, or ``max_bank`` of them taken evenly across classes."""
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels, int)
    keep = np.arange(len(x))
    if len(x) > max_bank:
        rng = np.random.default_rng(seed)
        classes = np.unique(labels)
        share = max(1, max_bank // len(classes))
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:share] for c in classes])
        keep = np.sort(keep[:max_bank])
    return Knn(normalised(x[keep]), int(k))


@keras.saving.register_keras_serializable(package="tl_app")
class KnnScore(keras.layers.Layer):
    """features [N, D] -> 1 - (k-th largest cosine similarity to the bank) [N]."""

    def __init__(self, size: int, dim: int, k: int = K, threshold: float | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.size, self.dim, self.k = int(size), int(dim), int(k)
        self.threshold = None if threshold is None else float(threshold)
        self.bank = self.add_weight(name="bank", shape=(self.size, self.dim), initializer="zeros", trainable=False)

    def call(self, features):
        x = keras.ops.cast(features, "float32")
        x = x / keras.ops.maximum(keras.ops.sqrt(keras.ops.sum(x * x, axis=-1, keepdims=True)), 1e-12)
        similarity = keras.ops.matmul(x, keras.ops.transpose(self.bank))
        top, _ = keras.ops.top_k(similarity, min(self.k, self.size))
        return 1.0 - top[:, -1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "dim": self.dim, "k": self.k,
                "threshold": self.threshold}


def knn_layer(scorer: Knn, threshold: float, name: str) -> KnnScore:
    """A KnnScore layer holding ``scorer``'s bank (built, weights set)."""
    layer = KnnScore(scorer.bank.shape[0], scorer.bank.shape[1], scorer.k, threshold, name=name)
    layer.build((None, scorer.bank.shape[1]))
    layer.bank.assign(scorer.bank.astype(np.float32))
    return layer
