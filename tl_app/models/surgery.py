"""Model surgery: assemble backbone and head, freeze the backbone, unfreeze its top
blocks with BatchNormalization kept in inference mode.
"""

from __future__ import annotations

import keras

import numpy as np
from tl_app.core.config import Config
from tl_app.core.errors import ConfigError, TlAppError
from tl_app.models.backbones import build_feature_model
from tl_app.models.heads import build_head


def assemble(feature_model: keras.Model, head: keras.Model, name: str = "classifier") -> keras.Model:
    """One model from raw pixels to class probabilities (layers: image, preprocess, <backbone>, pool, head)."""
    outputs = head(feature_model.output)
    return keras.Model(feature_model.input, outputs, name=name)


# ---- the model ------------------------------------------------------------------------
def build_classifier(config: Config, spec, input_size: int, num_classes: int, weights: str | None = None,
                     policy: str = "float32"):
    """image -> preprocess -> backbone (training=False) -> pool -> head, under a dtype policy."""
    import keras


    b = config.backbone
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        feature_model = build_feature_model(spec, input_size, b.weights if weights is None else weights, b.seed,
                                            b.layer, b.pooling)
        keras.utils.set_random_seed(config.train.seed)
        head = build_head(num_classes, int(feature_model.output.shape[-1]), config.head)
        return assemble(feature_model, head)
    finally:
        keras.config.set_dtype_policy(previous)


def find_backbone(model, spec):
    """The nested backbone model inside an assembled classifier."""
    import keras

    try:
        return model.get_layer(spec.name)
    except ValueError:
        nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "head"]
        if not nested:
            raise TlAppError(f"No backbone inside model {model.name!r}: expected a nested {spec.name} model.")
        return nested[0]


def freeze_backbone(model, spec) -> None:
    """Phase 1: nothing in the backbone trains."""
    find_backbone(model, spec).trainable = False


def layers_to_unfreeze(base, spec, blocks: int = 1, layers: int = 0) -> list:
    """The backbone layers phase 2 trains: the top ``blocks`` registry blocks or the top ``layers`` layers,
    BatchNormalization excluded."""
    import keras

    candidates = [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    if layers > 0:
        chosen = candidates[-layers:]
    else:
        chosen = [layer for block in spec.blocks[:blocks] for layer in spec.block_layers(base, block)]
    return [layer for layer in chosen if not isinstance(layer, keras.layers.BatchNormalization)]


def unfreeze_top(model, spec, blocks: int = 1, layers: int = 0) -> list[str]:
    """Phase 2: unfreeze the top ``blocks`` registry blocks, or the top ``layers`` layers.

    BatchNormalization layers stay frozen (and the backbone runs in inference
    mode), the Keras transfer-learning guide's rule. Returns the names of the
    layers with weights that now train.
    """
    base = find_backbone(model, spec)
    chosen = {id(layer) for layer in layers_to_unfreeze(base, spec, blocks, layers)}
    base.trainable = True
    trainable = []
    for layer in base.layers:
        layer.trainable = id(layer) in chosen
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable


def check_unfreeze(model, spec, config: Config) -> None:
    """Phase 2 must have something to train: a block above a ``backbone.layer`` cut does not exist."""
    t = config.train
    if t.finetune_epochs <= 0 or (t.unfreeze_blocks <= 0 and t.unfreeze_layers <= 0):
        return
    base = find_backbone(model, spec)
    if not any(layer.weights for layer in layers_to_unfreeze(base, spec, t.unfreeze_blocks, t.unfreeze_layers)):
        what = (f"the top {t.unfreeze_layers} layers" if t.unfreeze_layers > 0
                else f"block(s) {', '.join(spec.blocks[:t.unfreeze_blocks])}")
        cut = f" (cut at backbone.layer = {config.backbone.layer!r})" if config.backbone.layer else ""
        raise ConfigError(f"Phase 2 would unfreeze {what}, which hold no trainable weights in this "
                          f"{spec.name}{cut}. Use train.unfreeze_layers = N (the top N layers) or more blocks.")


def count_params(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))
