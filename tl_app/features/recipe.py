"""The recipe key of the feature cache: everything that changes a feature vector."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import PIL
import tensorflow as tf

from tl_app.core.config import Config
from tl_app.models.backbones import get_spec, resolve_input_size
from tl_app.data.pipeline import effective_policy
from tl_app.models.weights import fingerprint
from tl_app.data.decode import DECODER_RULE


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

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def with_augment(self, augment: dict) -> "Recipe":
        return Recipe(**{**asdict(self), "augment": json.dumps(augment, sort_keys=True)})


def recipe_for(config: Config) -> Recipe:
    """The recipe of a configuration (resolves the input size and the weights fingerprint)."""
    spec = get_spec(config.backbone.name)
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
        dtype_policy=keras.config.dtype_policy().name,
        decoder=DECODER_RULE,
    )


def library_versions() -> str:
    return f"tensorflow={tf.__version__};keras={keras.__version__};pillow={PIL.__version__}"


def weights_fingerprint(spec, weights: str, seed: int, cache_root: Path) -> str:
    """tl_app.weights.fingerprint, remembered in the feature cache's folder."""
    return fingerprint(spec, weights, seed, memo_dir=cache_root)
