"""The backbone registry with its Keras parts: constructors, the preprocessing layer, feature models.

Every model tl-app builds takes raw RGB pixels (float, 0..255) at the input
size; the backbone's ``preprocess_input`` runs inside the model as the
``BackbonePreprocess`` layer, so exported models cannot drift from training.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
from keras import layers, ops

from tl_app.core.errors import ConfigError, unknown_choice
from tl_app.core.errors import TlAppError
from tl_app.models.registry import BACKBONES, KERAS_APPS, PREPROCESS_MODES, BackboneInfo  # noqa: F401
from tl_app.models.registry import canonical_name, registry_key  # noqa: F401
from tl_app.models.registry import resolve_input_size  # noqa: F401  (re-exported: callers import it from here)
from tl_app.models.weights import cache_path, file_digest, load_weight_file
from tl_app.models import weights as weights_mod


@dataclass(frozen=True)
class BackboneSpec(BackboneInfo):
    """A registry entry (tl_app.models.registry) plus its keras.applications constructor."""

    constructor: Callable[..., keras.Model] = None

    def block_of(self, layer_name: str) -> str:
        """The block a layer belongs to: the longest block name its name starts with ('' for none).

        Longest, so that MobileNetV3's ``expanded_conv_10_project`` is block ``expanded_conv_10``, not
        ``expanded_conv_1`` or ``expanded_conv``.
        """
        return max((block for block in self.blocks if layer_name.startswith(block)), key=len, default="")

    def block_layers(self, model: keras.Model, block: str) -> list[keras.layers.Layer]:
        return [layer for layer in model.layers if self.block_of(layer.name) == block]


REGISTRY: dict[str, BackboneSpec] = {
    name: BackboneSpec(**{f.name: getattr(info, f.name) for f in dataclasses.fields(info)},
                       constructor=getattr(keras.applications, info.application))
    for name, info in BACKBONES.items()
}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for a name; unknown names list the valid ones."""
    canonical = canonical_name(name)
    if canonical is None:
        raise ConfigError(unknown_choice("backbone", name, REGISTRY))
    return REGISTRY[canonical]


@keras.saving.register_keras_serializable(package="tl_app")
class BackbonePreprocess(layers.Layer):
    """The backbone's ``preprocess_input`` as a layer that is saved with the model.

    caffe: RGB -> BGR, minus the ImageNet channel means (VGG, ResNet v1).
    tf: scale 0..255 to -1..1 (ResNet v2).
    raw: unchanged 0..255 pixels; the backbone normalises them with its own layers (EfficientNetV2,
    ConvNeXt, MobileNetV3 are built with keras' include_preprocessing), which are saved with it.
    """

    CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {', '.join(PREPROCESS_MODES)}")
        self.mode = mode

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        if self.mode == "raw":
            return images
        if self.mode == "tf":
            return images / 127.5 - 1.0
        bgr = ops.flip(images, axis=-1)
        mean = ops.cast(ops.convert_to_tensor(self.CAFFE_MEAN_BGR), self.compute_dtype)
        return bgr - mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def pooling_layer(pooling: str, name: str = "pool") -> layers.Layer:
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name=name)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name=name)
    if pooling == "flatten":
        return layers.Flatten(name=name)
    raise ConfigError(unknown_choice("pooling", pooling, ("avg", "max", "flatten")))


def build_base(spec: BackboneSpec, input_size: int, weights: str = "none", seed: int = 0) -> keras.Model:
    """The bare keras.applications network (no top), with weights resolved."""
    size = resolve_input_size(spec, input_size)
    keras.utils.set_random_seed(seed)
    base = spec.constructor(include_top=False, weights=None, input_shape=(size, size, 3))
    name_keras_layers(base, spec)
    path = weights_mod.resolve_weights(spec, weights)
    if path is not None:
        weights_mod.load_weight_file(base, path, spec)
    return base


def name_keras_layers(base: keras.Model, spec: BackboneSpec) -> None:
    """Stable names where keras.applications leaves them to a global counter.

    The network is named as the registry names it (Keras says ``efficientnetv2-b0``,
    ``MobileNetV3Small``), so the assembled model finds it by ``spec.name``. ConvNeXt's final
    LayerNormalization and MobileNetV3's final hard-swish get the names the registry gives them
    (``last_conv_layer``, and ConvNeXt's top block). Weight files do not depend on layer names:
    keras.applications' .h5 files load in layer order, Keras 3 files by class and position.
    """
    base.name = spec.name
    last = base.layers[-1]
    if spec.last_conv_layer not in {layer.name for layer in base.layers} and spec.block_of(spec.last_conv_layer):
        last.name = spec.last_conv_layer


def build_feature_model(
    spec: BackboneSpec,
    input_size: int = 0,
    weights: str = "none",
    seed: int = 0,
    layer: str = "",
    pooling: str = "avg",
) -> keras.Model:
    """raw pixels -> preprocessing -> backbone (inference mode) -> pooled features."""
    size = resolve_input_size(spec, input_size)
    base = build_base(spec, size, weights, seed)
    if layer:
        names = [lyr.name for lyr in base.layers]
        if layer not in names:
            raise ConfigError(unknown_choice(f"layer of {spec.name}", layer, names))
        base = keras.Model(base.input, base.get_layer(layer).output, name=spec.name)
    inputs = keras.Input((size, size, 3), name="image")
    x = BackbonePreprocess(spec.preprocess, name="preprocess")(inputs)
    x = base(x, training=False)
    if len(x.shape) == 4:
        x = pooling_layer(pooling)(x)
    return keras.Model(inputs, x, name=f"{spec.name}_features")


MATCH_MODES = ("name", "order")


def import_weights(file: str | Path, spec, match: str = "name", name: str = "") -> dict:
    """Check a local weight file against the backbone, then cache it.

    ``match="name"`` checks the file's layers by name and shape and copies it
    as the backbone's ImageNet file (or under ``name``). ``match="order"`` maps
    the file's weighted layers onto the backbone's in order, checks every
    shape, skips trailing extras, and caches a standard weight file under
    ``name`` (never under the ImageNet file name: these are other weights).
    Copies are atomic (temporary file, then rename).
    """
    file = Path(file)
    if match not in MATCH_MODES:
        raise ConfigError(unknown_choice("--match", match, MATCH_MODES))
    if not file.is_file():
        raise TlAppError(f"Weight file {str(file)!r} does not exist.")
    if match == "order":
        name = name or f"{file.name.split('.')[0].lower().replace('_', '-')}-{spec.name}"
        result = weights_mod.convert_by_order(spec, file, name, source_label=str(file.resolve()))
        return {**result, "official": False}
    model = build_base(spec, spec.default_size, "none")
    load_weight_file(model, file, spec)  # raises if the layer shapes differ
    if name:  # saved again from the loaded model, so the cached file is always in Keras 3's format
        return {**weights_mod.save_named(model, spec, name, source=str(file.resolve()), match="name"),
                "official": False}
    target = cache_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".import-")
    os.close(fd)
    try:
        shutil.copyfile(file, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    official = file_digest(target, spec.weights_hash_algorithm) == spec.weights_hash
    return {"backbone": spec.name, "file": str(target), "official": official}
