"""Classifier heads on top of pooled features (assembly with the backbone is in models.surgery).

The head is its own small Keras model (timm's ``forward_head``): bottleneck
training fits it on cached features, fine-tuning fits it on the live backbone,
and both assemble the same ``image -> preprocess -> backbone -> pool -> head``
model that export and inference use.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, regularizers

from tl_app.core.config import HeadConfig


def regularizer(config: HeadConfig):
    if config.l1 and config.l2:
        return regularizers.L1L2(l1=config.l1, l2=config.l2)
    if config.l1:
        return regularizers.L1(config.l1)
    if config.l2:
        return regularizers.L2(config.l2)
    return None


def standardization(features: np.ndarray, name: str = "standardize") -> layers.Normalization:
    """A Normalization layer holding the per-feature mean and variance of ``features`` as weights.

    Pooled backbone features have large, uneven scales (VGG16's run to the hundreds), which
    makes a head's first epochs unstable. The statistics come from the features given
    (training split only); ``fold_standardization`` moves them into the first Dense layer
    before saving, so the model, every export and the parity gate carry them. A feature that is (nearly)
    constant in ``features`` (a ReLU unit that never fired) would be divided by ~0 wherever it
    fires later; its standard deviation is floored at a hundredth of the features' typical one.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"standardization needs (images, features) with at least one image, got {x.shape}")
    mean, variance = x.mean(axis=0), x.var(axis=0)
    floor = 1e-4 * float(variance.mean()) if variance.mean() > 0 else 1.0
    variance = np.maximum(variance, floor)
    layer = layers.Normalization(axis=-1, name=name)
    layer.build((None, x.shape[1]))
    layer.adapt_mean.assign(mean.astype(np.float32))
    layer.adapt_variance.assign(variance.astype(np.float32))
    layer.finalize_state()  # the layer computes with its mean/variance tensors, set from the weights here
    return layer


def build_head(num_classes: int, feature_dim: int, config: HeadConfig | None = None,
               name: str = "head", standardize_on: np.ndarray | None = None) -> keras.Model:
    """dense: [Dense -> (BN) -> Dropout] x len(units) -> softmax; logistic: softmax only.

    With ``config.standardize`` and ``standardize_on`` (the training split's features,
    never validation), the head first standardises its input (see ``standardization``).
    The softmax layer is float32 so mixed precision keeps stable probabilities.
    """
    config = config or HeadConfig()
    reg = regularizer(config)
    constraint = keras.constraints.MaxNorm(config.max_norm) if config.max_norm else None
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if config.standardize and standardize_on is not None:
        x = standardization(standardize_on)(x)
    if config.kind == "dense":
        for i, units in enumerate(config.units):
            x = layers.Dense(int(units), activation=None if config.batch_norm else "relu",
                             kernel_regularizer=reg, kernel_constraint=constraint, name=f"dense_{i}")(x)
            if config.batch_norm:
                x = layers.BatchNormalization(name=f"bn_{i}")(x)
                x = layers.Activation("relu", name=f"relu_{i}")(x)
            if config.dropout:
                x = layers.Dropout(config.dropout, name=f"dropout_{i}")(x)
    elif config.dropout and config.kind != "logistic":
        x = layers.Dropout(config.dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg,
                           kernel_constraint=constraint, dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)




def fold_standardization(head: keras.Model, config: HeadConfig | None = None) -> keras.Model:
    """The same head with its standardisation folded into the first Dense layer (exact up to rounding).

    (x - mean) / std @ W + b == x @ (W / std) + (b - mean / std @ W). Training keeps the
    Normalization layer (the optimiser sees standardised inputs); the saved head has plain
    Dense weights, which every export format converts (tf2onnx cannot freeze the tensors a
    Normalization layer computes from its weights).
    """
    norms = [layer for layer in head.layers if isinstance(layer, layers.Normalization)]
    if not norms:
        return head
    norm = norms[0]
    mean = np.asarray(norm.mean, np.float64).ravel()
    std = np.maximum(np.sqrt(np.asarray(norm.variance, np.float64).ravel()), keras.backend.epsilon())
    config = config or HeadConfig()
    plain = build_head(int(head.output.shape[-1]), int(head.input.shape[-1]), config, name=head.name)
    sources = [layer for layer in head.layers if layer.weights and layer is not norm]
    targets = [layer for layer in plain.layers if layer.weights]
    first = next(layer for layer in sources if isinstance(layer, layers.Dense))
    for source, target in zip(sources, targets, strict=True):
        weights = source.get_weights()
        if source is first:
            kernel = weights[0].astype(np.float64) / std[:, None]
            weights[0] = kernel.astype(np.float32)
            weights[1] = (weights[1] - mean @ kernel).astype(np.float32)
        target.set_weights(weights)
    return plain
