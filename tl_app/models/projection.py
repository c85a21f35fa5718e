"""The projection head of similarity learning: features -> Dense -> ReLU -> Dense -> unit length.

Its output is the embedding space the metric loss shapes. The input
standardisation used during training is folded into the first Dense layer
before saving, so the saved model needs no extra layer (and every export
carries it, as the dense heads' standardisation is carried).
"""

from __future__ import annotations

import keras
import numpy as np

HIDDEN, EMBEDDING = 256, 128


def build_projection(dim: int, hidden: int = HIDDEN, embedding: int = EMBEDDING, name: str = "projection"):
    """A fresh projection model [B, dim] -> [B, embedding], L2-normalised."""
    inputs = keras.Input((dim,), name="features")
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(embedding, name="embedding")(x)
    outputs = keras.layers.UnitNormalization(axis=-1, name="unit")(x)
    return keras.Model(inputs, outputs, name=name)


def fold_input_standardization(projection, mean: np.ndarray, std: np.ndarray) -> None:
    """Make ``projection(x)`` equal what it computed on ``(x - mean) / std``, in place (first Dense only)."""
    dense = projection.get_layer("hidden")
    kernel, bias = (np.asarray(w) for w in dense.get_weights())
    kernel_folded = kernel / std[:, None]
    dense.set_weights([kernel_folded.astype(np.float32), (bias - mean @ kernel_folded).astype(np.float32)])


def attach_head(projection, head, name: str = "head"):
    """features -> projection -> head as one model named ``head``: what follows the backbone's pool layer."""
    inputs = keras.Input(projection.input.shape[1:], name="features")
    return keras.Model(inputs, head(projection(inputs)), name=name)
