"""Training-only augmentation as Keras preprocessing layers.

One definition serves fine-tuning (inside the training branch of the model's
input pipeline) and the augmentation-aware feature cache. Images are float
pixels in 0..255; every layer is a no-op at inference.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from tl_app.core.config import AugmentConfig
import hashlib
from dataclasses import asdict
import numpy as np
from tl_app.core.config import Config

VALUE_RANGE = (0.0, 255.0)


@keras.saving.register_keras_serializable(package="tl_app")
class RandomChannelShift(layers.Layer):
    """Add a random offset in [-intensity, intensity] to each colour channel."""

    def __init__(self, intensity: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.intensity = float(intensity)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training or not self.intensity:
            return images
        shape = ops.shape(images)
        offsets = keras.random.uniform((shape[0], 1, 1, 3), -self.intensity, self.intensity,
                                       seed=self.generator, dtype=images.dtype)
        return ops.clip(images + offsets, *VALUE_RANGE)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "intensity": self.intensity, "seed": self.seed}


def augmentation_layers(config: AugmentConfig, input_size: int, seed: int = 0) -> list[layers.Layer]:
    """The configured layers, in a fixed order; each gets its own derived seed."""
    seeds = iter(range(seed * 100, seed * 100 + 100))
    out: list[layers.Layer] = []
    flip = {(True, False): "horizontal", (False, True): "vertical", (True, True): "horizontal_and_vertical"}
    mode = flip.get((config.horizontal_flip, config.vertical_flip))
    if mode:
        out.append(layers.RandomFlip(mode, seed=next(seeds)))
    if config.rotation:
        out.append(layers.RandomRotation(config.rotation, fill_mode="reflect", seed=next(seeds)))
    if config.zoom:
        out.append(layers.RandomZoom(config.zoom, fill_mode="reflect", seed=next(seeds)))
    if config.translation:
        out.append(layers.RandomTranslation(config.translation, config.translation, fill_mode="reflect",
                                            seed=next(seeds)))
    if config.random_crop:
        crop = max(8, int(round(input_size * (1.0 - config.random_crop))))
        out.append(layers.RandomCrop(crop, crop, seed=next(seeds)))
        out.append(layers.Resizing(input_size, input_size))
    if config.shear:
        out.append(layers.RandomShear(config.shear, config.shear, fill_mode="reflect", seed=next(seeds)))
    if config.contrast:
        out.append(layers.RandomContrast(config.contrast, value_range=VALUE_RANGE, seed=next(seeds)))
    if config.brightness:
        out.append(layers.RandomBrightness(config.brightness, value_range=VALUE_RANGE, seed=next(seeds)))
    if config.channel_shift:
        out.append(RandomChannelShift(config.channel_shift, seed=next(seeds)))
    if config.grayscale:
        out.append(layers.RandomGrayscale(config.grayscale, seed=next(seeds)))
    return out


def build_augmenter(config: AugmentConfig, input_size: int, seed: int = 0, name: str = "augment") -> keras.Sequential:
    """A Sequential of the configured layers (identity when nothing is configured)."""
    stack = augmentation_layers(config, input_size, seed) or [layers.Identity(name="no_augmentation")]
    model = keras.Sequential(stack, name=name)
    model.build((None, input_size, input_size, 3))
    return model


def seed_generators(augmenter: keras.Sequential) -> list[keras.random.SeedGenerator]:
    """The random layers' seed generators, in layer order (empty: the augmenter changes nothing)."""
    return [value for layer in augmenter.layers for value in vars(layer).values()
            if isinstance(value, keras.random.SeedGenerator)]


# ---- augmented views -----------------------------------------------------------
def augment_settings(config: Config) -> dict:
    return asdict(config.augment)


class ViewAugmenter:
    """tl_app.augment's layers, made deterministic per (image content, view index).

    Before each image the layers' seed generators are set from a hash of the
    content and the view, so a view is the same in every run, batch and order.
    """

    def __init__(self, config: Config, input_size: int):
        import tensorflow as tf


        self.augmenter = build_augmenter(config.augment, input_size, seed=0, name="view_augment")
        self.generators = seed_generators(self.augmenter)
        augmenter, generators = self.augmenter, self.generators

        @tf.function(reduce_retracing=True)
        def one(image, seed):
            for i, generator in enumerate(generators):
                state = tf.stack([seed + tf.constant(i * 7919, tf.int64), tf.constant(0, tf.int64)])
                generator.state.assign(tf.cast(state, generator.state.dtype))
            return augmenter(image[None], training=True)[0]

        self._one = one

    @staticmethod
    def seed(sha256: str, view: int) -> int:
        return int(hashlib.sha256(f"{sha256}:{view}".encode()).hexdigest()[:12], 16)

    def __call__(self, image, sha256: str, view: int) -> np.ndarray:
        import tensorflow as tf

        return self._one(image, tf.constant(self.seed(sha256, view), tf.int64)).numpy()
