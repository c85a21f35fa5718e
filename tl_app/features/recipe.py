"""The recipe key of the feature cache: everything that changes a feature vector.

Built without importing TensorFlow or Keras (their versions come from the
installed packages' metadata, the dtype policy from Keras' own config file
unless Keras is already loaded), so a fully cached re-run never pays for them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import PIL

from tl_app.core.config import Config
from tl_app.data.pixel_rules import DECODER_RULE, effective_policy
from tl_app.models.registry import get_info, resolve_input_size
from tl_app.models.weights import fingerprint


FORMAT_VERSION = 2  # 2: JPEG decoded with the accurate IDCT in the graph (data.decode), 16-bit scaled by mode


# ---- the key ---------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Everything that changes a feature vector except the image itself."""

    backbone: str
    weights_fingerprint: str
    input_size: int
    resize_policy: str
    preprocess: str
    layer: str
    pooling: str
    background: tuple = (255, 255, 255)
    augment: str = ""  # JSON of the augmentation settings; empty for the images themselves
    format_version: int = FORMAT_VERSION
    libraries: str = ""  # TensorFlow, Keras and Pillow versions: kernels and decoders change with them
    dtype_policy: str = "float32"  # a global mixed_float16 computes other features
    decoder: str = DECODER_RULE
    precision: str = "fp32"  # features.precision: bf16/int8 features differ, so they are another recipe

    def key(self) -> str:
        fields = asdict(self)
        if fields["precision"] == "fp32":  # keys from before precisions existed stay valid
            del fields["precision"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def with_augment(self, augment: dict) -> "Recipe":
        return Recipe(**{**asdict(self), "augment": json.dumps(augment, sort_keys=True)})


def recipe_for(config: Config) -> Recipe:
    """The recipe of a configuration (resolves the input size and the weights fingerprint)."""
    spec = get_info(config.backbone.name)
    return Recipe(
        backbone=spec.name,
        weights_fingerprint=weights_fingerprint(spec, config.backbone.weights, config.backbone.seed,
                                                Path(config.features.cache_dir)),
        input_size=resolve_input_size(spec, config.backbone.input_size),
        resize_policy=effective_policy(config.data.resize_policy),
        preprocess=spec.preprocess,
        layer=config.backbone.layer or "",
        pooling=config.backbone.pooling,
        background=tuple(int(v) for v in config.data.background),
        format_version=FORMAT_VERSION,
        libraries=library_versions(),
        dtype_policy=global_dtype_policy(),
        decoder=DECODER_RULE,
        precision=config.features.precision,
    )


def view_settings(config: Config) -> dict:
    """The augmentation settings that key augmented views (``Recipe.with_augment``)."""
    return asdict(config.augment)


TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos", "tf-nightly",
                            "tensorflow-aarch64")


def installed_version(*distributions: str) -> str:
    """The version an installed package declares (read from its metadata, not by importing it)."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def library_versions() -> str:
    """TensorFlow, Keras and Pillow versions: kernels and decoders change with them."""
    return (f"tensorflow={installed_version(*TENSORFLOW_DISTRIBUTIONS)};keras={installed_version('keras')};"
            f"pillow={PIL.__version__}")


def global_dtype_policy() -> str:
    """Keras' global dtype policy; before Keras is imported nothing can have set it, so it is Keras' default
    (``floatx`` from KERAS_HOME/keras.json, float32 when unset), read here the way Keras reads it."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "config"):
        return keras.config.dtype_policy().name
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.expanduser(os.path.join(home, "keras.json"))) as handle:
            floatx = json.load(handle).get("floatx", "float32")
    except (OSError, ValueError, AttributeError):
        floatx = "float32"
    return floatx if floatx in ("float16", "float32", "float64") else "float32"


def weights_fingerprint(spec, weights: str, seed: int, cache_root: Path) -> str:
    """tl_app.weights.fingerprint, remembered in the feature cache's folder."""
    return fingerprint(spec, weights, seed, memo_dir=cache_root)
