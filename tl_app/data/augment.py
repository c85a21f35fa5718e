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


# ---- mixup and CutMix -----------------------------------------------------------
def mix_batch(images, labels, seed, mixup: float = 0.0, cutmix: float = 0.0):
    """Mixup or CutMix of a training batch with a shuffled copy of itself; returns (images, soft labels).

    One mixing proportion per batch, drawn from Beta(alpha, alpha) by stateless ops
    seeded by ``seed`` (a [2] integer tensor), so the pipeline stays a function of
    seed and epoch. Mixup blends whole images; CutMix pastes a box of the partner
    and mixes the labels by the box's actual (clipped) area. With both on, each
    batch uses one of the two at random. Labels stay a distribution: they sum to 1.
    """
    import tensorflow as tf

    seed = tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, 5)
    n = tf.shape(images)[0]
    partner = tf.random.experimental.stateless_shuffle(tf.range(n), seed=seeds[0])
    other_images, other_labels = tf.gather(images, partner), tf.gather(labels, partner)

    def beta(alpha: float, key):
        g = tf.random.stateless_gamma([2], seed=key, alpha=float(alpha), dtype=tf.float32)
        return g[0] / tf.maximum(g[0] + g[1], 1e-12)

    def blend(lam):
        lam = tf.cast(lam, labels.dtype)
        return lam * labels + (1.0 - lam) * other_labels

    def do_mixup():
        lam = beta(mixup, seeds[1])
        mixed = tf.cast(lam, images.dtype) * images + tf.cast(1.0 - lam, images.dtype) * other_images
        return mixed, blend(lam)

    def do_cutmix():
        lam = beta(cutmix, seeds[2])
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        ratio = tf.sqrt(1.0 - lam)
        cut_h = tf.cast(tf.round(tf.cast(height, tf.float32) * ratio), tf.int32)
        cut_w = tf.cast(tf.round(tf.cast(width, tf.float32) * ratio), tf.int32)
        centre = tf.random.stateless_uniform([2], seed=seeds[3], minval=0.0, maxval=1.0)
        cy = tf.cast(centre[0] * tf.cast(height, tf.float32), tf.int32)
        cx = tf.cast(centre[1] * tf.cast(width, tf.float32), tf.int32)
        y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, height), tf.clip_by_value(cy + cut_h - cut_h // 2, 0, height)
        x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, width), tf.clip_by_value(cx + cut_w - cut_w // 2, 0, width)
        rows, cols = tf.range(height), tf.range(width)
        inside = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]
        mixed = tf.where(inside[None, :, :, None], other_images, images)
        area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(height * width, tf.float32)
        return mixed, blend(1.0 - area)

    if mixup > 0 and cutmix > 0:
        choose_cutmix = tf.random.stateless_uniform([], seed=seeds[4]) < 0.5
        return tf.cond(choose_cutmix, do_cutmix, do_mixup)
    if cutmix > 0:
        return do_cutmix()
    if mixup > 0:
        return do_mixup()
    return images, labels
