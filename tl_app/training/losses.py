"""Classification losses for both strategies: cross-entropy or focal, with smoothing and class weights.

Class weights are applied as per-sample weights (the weight of each sample's
true class), which is what Keras's ``class_weight`` does, so the same tables
work with tf.data pipelines and distribution strategies.
"""

from __future__ import annotations

import keras
import numpy as np

from tl_app.core.config import Config, TrainConfig
from tl_app.core.errors import ConfigError
from tl_app.training.optim import train_section


def make_loss(config: Config | TrainConfig) -> keras.losses.Loss:
    """Categorical cross-entropy on softmax outputs; focal loss when train.focal_gamma > 0.

    Focal loss uses alpha = 1: class balance comes from the class weights, so
    switching loss does not silently rescale the gradients.
    """
    t = train_section(config)
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}.")
    if t.focal_gamma < 0:
        raise ConfigError(f"train.focal_gamma must be >= 0 (0 turns focal loss off), got {t.focal_gamma}.")
    if t.focal_gamma > 0:
        return keras.losses.CategoricalFocalCrossentropy(alpha=1.0, gamma=float(t.focal_gamma),
                                                         label_smoothing=float(t.label_smoothing),
                                                         name="focal_loss")
    return keras.losses.CategoricalCrossentropy(label_smoothing=float(t.label_smoothing), name="loss")


def class_weight_table(class_weights: dict[int, float] | None, num_classes: int) -> np.ndarray:
    """weights[label_index] as float32 (1 for classes the mapping leaves out)."""
    class_weights = class_weights or {}
    table = np.array([float(class_weights.get(i, 1.0)) for i in range(num_classes)], np.float32)
    if not np.all(np.isfinite(table)) or np.any(table < 0):
        raise ConfigError(f"class weights must be finite and >= 0, got {table.tolist()}.")
    return table


def mixed_sample_weights(soft_labels, table):
    """Per-sample weights of soft (mixup/CutMix) labels: the label-weighted mean of the class weights.

    For a one-hot label this is the weight of its class, as before; a 70/30 mix
    of classes a and b weighs 0.7 w_a + 0.3 w_b. Label smoothing then acts on the
    soft labels inside the loss, as on one-hot ones.
    """
    return keras.ops.sum(keras.ops.cast(soft_labels, "float32") * keras.ops.cast(table, "float32"), axis=-1)
