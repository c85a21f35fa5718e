"""Classifier heads on top of pooled features (assembly with the backbone is in models.surgery).

The head is its own small Keras model (timm's ``forward_head``): bottleneck
training fits it on cached features, fine-tuning fits it on the live backbone,
and both assemble the same ``image -> preprocess -> backbone -> pool -> head``
model that export and inference use.
"""

from __future__ import annotations

import keras
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


def build_head(num_classes: int, feature_dim: int, config: HeadConfig | None = None,
               name: str = "head") -> keras.Model:
    """dense: [Dense -> (BN) -> Dropout] x len(units) -> softmax; logistic: softmax only.

    The softmax layer is float32 so mixed precision keeps stable probabilities.
    """
    config = config or HeadConfig()
    reg = regularizer(config)
    constraint = keras.constraints.MaxNorm(config.max_norm) if config.max_norm else None
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
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


