"""Heads that are fitted, not trained: cosine k-NN and nearest class prototype, as Keras layers.

They hold their training features (k-NN) or class means (prototype) as
non-trainable weights, so the assembled ``image -> backbone -> head`` model is an
ordinary Keras model: ``.keras``, SavedModel and TFLite carry them unchanged, and
a class is added or removed by rebuilding the head from its own weights plus the
new class's features, with no gradient step and no other class touched.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from tl_app.models.head_state import VARIABLES, HeadState, added, l2_normalize, removed

SMOOTHING = 1e-4  # k-NN probabilities keep a floor so log losses stay finite; argmax is unchanged
EPS = 1e-12


def _normalize(x):
    return x / ops.maximum(ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)), EPS)


@keras.saving.register_keras_serializable(package="tl_app")
class KnnHead(keras.layers.Layer):
    """Cosine k-NN: the k most similar stored features vote, weighted by softmax(similarity / temperature)."""

    def __init__(self, num_classes: int, size: int, dim: int, neighbors: int = 5, temperature: float = 0.05,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes, self.size, self.dim = int(num_classes), int(size), int(dim)
        self.neighbors, self.temperature = int(neighbors), float(temperature)
        self.center = self.add_weight(shape=(self.dim,), initializer="zeros", trainable=False, name="center")
        self.memory = self.add_weight(shape=(self.size, self.dim), initializer="zeros", trainable=False,
                                      name="memory")
        self.memory_labels = self.add_weight(shape=(self.size, self.num_classes), initializer="zeros",
                                             trainable=False, name="memory_labels")

    def call(self, features):
        z = _normalize(ops.cast(features, "float32") - self.center)
        sims = ops.matmul(z, ops.transpose(self.memory))
        k = min(self.neighbors, self.size)
        values, indices = ops.top_k(sims, k=k)
        weights = ops.softmax(values / self.temperature, axis=-1)
        votes = ops.take(self.memory_labels, indices, axis=0)  # [B, k, C]
        probs = ops.sum(votes * ops.expand_dims(weights, -1), axis=1)
        return probs * (1.0 - SMOOTHING) + SMOOTHING / self.num_classes

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "size": self.size, "dim": self.dim,
                "neighbors": self.neighbors, "temperature": self.temperature}



@keras.saving.register_keras_serializable(package="tl_app")
class PrototypeHead(keras.layers.Layer):
    """Nearest class mean of L2-normalised features.

    Plain: softmax(cosine(z, mean_c) / temperature). Whitened (a shrunk pooled
    covariance was fitted): softmax(-0.5 * squared Mahalanobis distance), the
    posterior of Gaussians with one shared covariance and equal priors.
    """

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05, whitened: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.temperature, self.whitened = float(temperature), bool(whitened)
        self.center = self.add_weight(shape=(self.dim,), initializer="zeros", trainable=False, name="center")
        self.prototypes = self.add_weight(shape=(self.num_classes, self.dim), initializer="zeros",
                                          trainable=False, name="prototypes")
        if self.whitened:
            self.whiten_center = self.add_weight(shape=(self.dim,), initializer="zeros", trainable=False,
                                                 name="whiten_center")
            self.whitening = self.add_weight(shape=(self.dim, self.dim), initializer="identity", trainable=False,
                                             name="whitening")

    def call(self, features):
        z = _normalize(ops.cast(features, "float32") - self.center)
        if not self.whitened:
            return ops.softmax(ops.matmul(z, ops.transpose(self.prototypes)) / self.temperature, axis=-1)
        w = ops.matmul(z - self.whiten_center, self.whitening)
        d2 = (ops.sum(w * w, axis=-1, keepdims=True) - 2.0 * ops.matmul(w, ops.transpose(self.prototypes))
              + ops.expand_dims(ops.sum(self.prototypes * self.prototypes, axis=-1), 0))
        return ops.softmax(-0.5 * d2, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dim": self.dim,
                "temperature": self.temperature, "whitened": self.whitened}

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Features in the space the prototypes live in (normalised, then whitened if fitted)."""
        return layer_state(self).embed(features)


FEWSHOT_LAYERS = (KnnHead, PrototypeHead)


# ---- fitting and editing (numpy; no gradients) --------------------------------------
def shrunk_whitening(z: np.ndarray, labels: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """(center, W) with W = Sigma^-1/2 of the pooled within-class covariance shrunk towards a scaled identity."""
    center = z.mean(0)
    means = {c: z[labels == c].mean(0) for c in np.unique(labels)}
    within = z - np.stack([means[c] for c in labels])  # each row minus its class mean
    dim = z.shape[1]
    cov = within.T @ within / max(1, len(z) - len(np.unique(labels)))
    target = np.trace(cov) / dim
    cov = (1.0 - shrinkage) * cov + shrinkage * max(target, 1e-6) * np.eye(dim)
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, 1e-6 * max(vals.max(), 1e-12))
    return center.astype(np.float32), (vecs / np.sqrt(vals)) @ vecs.T


def prototype_head(features, labels, num_classes: int, temperature: float = 0.05, shrinkage: float = 0.0,
                   name: str = "head") -> keras.Model:
    """Class means of centred, L2-normalised features (SimpleShot's CL2N), optionally in a whitened space."""
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no features for class index(es) {missing}")
    center = features.mean(0)
    z = l2_normalize(features - center)
    whiten_center = whitening = None
    if shrinkage > 0:
        whiten_center, whitening = shrunk_whitening(z, labels, shrinkage)
        z = (z - whiten_center) @ whitening
    means = np.stack([z[labels == c].mean(0) for c in range(num_classes)])
    prototypes = means if whitening is not None else l2_normalize(means)
    return prototype_from(prototypes, temperature, center, whiten_center, whitening, name)


def prototype_from(prototypes, temperature, center, whiten_center=None, whitening=None,
                   name: str = "head") -> keras.Model:
    prototypes = np.asarray(prototypes, np.float32)
    inputs = keras.Input((prototypes.shape[1],), name="features")
    layer = PrototypeHead(len(prototypes), prototypes.shape[1], temperature, whitened=whitening is not None,
                          name="probabilities")
    outputs = layer(inputs)
    layer.prototypes.assign(prototypes)
    layer.center.assign(np.asarray(center, np.float32))
    if whitening is not None:
        layer.whiten_center.assign(np.asarray(whiten_center, np.float32))
        layer.whitening.assign(np.asarray(whitening, np.float32))
    return keras.Model(inputs, outputs, name=name)


def knn_head(features, labels, num_classes: int, neighbors: int = 5, temperature: float = 0.05,
             center=None, name: str = "head") -> keras.Model:
    """A k-NN head holding the centred, L2-normalised ``features`` and their labels.

    ``center`` given: ``features`` are already centred and normalised (a class added to a fitted head)."""
    features = np.asarray(features, np.float32)
    if center is None:
        center = features.mean(0)
        features = l2_normalize(features - center)
    labels = np.asarray(labels, np.int64)
    inputs = keras.Input((features.shape[1],), name="features")
    layer = KnnHead(num_classes, len(features), features.shape[1], neighbors, temperature, name="probabilities")
    outputs = layer(inputs)
    layer.center.assign(np.asarray(center, np.float32))
    layer.memory.assign(features)
    layer.memory_labels.assign(np.eye(num_classes, dtype=np.float32)[labels])
    return keras.Model(inputs, outputs, name=name)


def fewshot_layer(head: keras.Model):
    """The k-NN or prototype layer of a head model, or None for a dense/logistic head."""
    for layer in head.layers:
        if isinstance(layer, FEWSHOT_LAYERS):
            return layer
    return None


def layer_state(layer) -> HeadState:
    """A k-NN/prototype layer's settings and weights as numbers."""
    kind = type(layer).__name__
    arrays = {name: np.asarray(getattr(layer, name).numpy()) for name in VARIABLES[kind] if hasattr(layer, name)}
    return HeadState(kind, layer.get_config(), arrays)


def head_from_state(state: HeadState) -> keras.Model:
    a, c = state.arrays, state.config
    if state.kind == "KnnHead":
        return knn_head(a["memory"], a["memory_labels"].argmax(1), state.num_classes, c["neighbors"],
                        c["temperature"], center=a["center"])
    return prototype_from(a["prototypes"], c["temperature"], a["center"], a.get("whiten_center"), a.get("whitening"))


def with_class(layer, features) -> keras.Model:
    """A new head: ``layer``'s classes plus one more, from the new class's features only (the old space kept)."""
    return head_from_state(added(layer_state(layer), features))


def without_class(layer, index: int) -> keras.Model:
    """A new head without class ``index``; the other classes keep their order."""
    return head_from_state(removed(layer_state(layer), index))
