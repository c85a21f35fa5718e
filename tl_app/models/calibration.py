"""Temperature scaling as a Keras layer, so that every exported format carries the calibration in its graph.

The classifiers output softmax probabilities p. For logits z, softmax(log p) =
softmax(z), so softmax(log(p) / T) is exactly temperature scaling of the
logits, applied after the model without touching it. A layer (not a Lambda)
keeps the model loadable in Keras safe mode and convertible to TFLite and ONNX.
"""

from __future__ import annotations

import keras
import numpy as np

EPSILON = 1e-12  # probabilities are clipped here before the log: a float32 softmax can underflow to exactly 0
LAYER_NAME = "temperature_scaling"


@keras.saving.register_keras_serializable(package="tl_app")
class TemperatureScaling(keras.layers.Layer):
    """probabilities -> softmax(log(max(p, EPSILON)) / temperature); the arg max is unchanged."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def call(self, probabilities):
        p = keras.ops.cast(probabilities, "float32")
        logits = keras.ops.log(keras.ops.maximum(p, EPSILON)) * (1.0 / self.temperature)
        return keras.ops.softmax(logits, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def scale_probabilities(probabilities, temperature: float) -> np.ndarray:
    """The layer's arithmetic in numpy (float64), for fitting and for metrics."""
    logits = np.log(np.maximum(np.asarray(probabilities, np.float64), EPSILON)) / float(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def with_temperature(model, temperature: float):
    """The classifier followed by TemperatureScaling: same inputs, calibrated probabilities.

    A model that already ends in the layer gets its temperature replaced, never a second layer.
    """
    base = without_temperature(model)
    outputs = TemperatureScaling(temperature, name=LAYER_NAME)(base.output)
    return keras.Model(base.input, outputs, name=base.name)


def temperature_of(model) -> float | None:
    """The temperature a model applies, or None when it ends in no TemperatureScaling layer."""
    last = model.layers[-1] if getattr(model, "layers", None) else None
    return last.temperature if isinstance(last, TemperatureScaling) else None


def without_temperature(model):
    """The uncalibrated classifier inside a calibrated one (the model itself when it has no temperature)."""
    if temperature_of(model) is None:
        return model
    return keras.Model(model.input, model.layers[-1].input, name=model.name)


def recorded_temperature(info: dict) -> float | None:
    """The temperature a run.json records (training's calibration), or None for an uncalibrated run."""
    calibration = (info or {}).get("calibration") or {}
    if calibration.get("method") != "temperature":
        return None
    return float(calibration["temperature"])
