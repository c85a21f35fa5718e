"""Issue 17: --precision bf16|int8 is an explicit choice with its own accuracy gate (feature cosine >= 0.999 with
float32 Keras on the calibration batch) and its own cache recipe; a reduced copy that misses the gate is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tl_app.core.errors import TlAppError
from tl_app.features.cache import recipe_dir
from tl_app.features.extract import extract_features
from tl_app.features.recipe import recipe_for
from tl_app.features.runtime import INT8_FILE, INT8_RECORD, PRECISION_COSINE, cosine_gate, open_bf16, open_int8


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_precision_is_its_own_recipe_and_fp32_keys_are_unchanged(runtime_config):
    import hashlib
    from dataclasses import asdict

    fp32 = recipe_for(runtime_config)
    fields = {k: v for k, v in asdict(fp32).items() if k != "precision"}  # the key before precisions existed
    assert fp32.key() == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    keys = {p: recipe_for(runtime_config.with_overrides({"features.precision": p})).key() for p in ("bf16", "int8")}
    assert len({fp32.key(), *keys.values()}) == 3


@pytest.mark.slow
def test_bf16_features_pass_the_gate_and_are_cached_apart(runtime_config):
    reference = extract_features(runtime_config, echo=None)
    config = runtime_config.with_overrides({"features.precision": "bf16"})
    reduced = extract_features(config, echo=None)
    assert reduced.stats["computed"] == reference.stats["computed"] == 4  # not served from the fp32 cache
    assert cosines(reduced.features, reference.features).min() >= PRECISION_COSINE
    folder = recipe_dir(config.features.cache_dir, recipe_for(config))
    assert json.loads((folder / "recipe.json").read_text())["precision"] == "bf16"


@pytest.mark.slow
def test_int8_is_kept_with_its_gate_record_when_it_passes(tmp_path):
    """(The static default at 32 px measured a lowest cosine of 0.9985 here and is refused; the wrong-network
    test below covers refusals, so this one passes the gate with the dynamic quantiser, 0.9999 here.)"""
    from tl_app.models.backbones import build_feature_model, get_spec
    from tl_app.features.runtime import ort_quantize_dynamic

    model = build_feature_model(get_spec("vgg16"), 32, "none", seed=0)
    runtime = open_int8(model, tmp_path / "dynamic", 32, quantizer=ort_quantize_dynamic)  # 0.9999 here
    record = json.loads((tmp_path / "dynamic" / INT8_RECORD).read_text())
    assert record["ok"] and record["min_cosine"] >= PRECISION_COSINE and record["precision"] == "int8"
    assert (tmp_path / "dynamic" / INT8_FILE).is_file()
    images = np.random.default_rng(5).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    assert cosines(runtime(images), model.predict_on_batch(images)).min() >= 0.99


def test_reduced_copies_that_lose_the_features_are_refused_with_the_measured_cosine(tmp_path):
    import keras

    from tl_app.models.backbones import build_feature_model, get_spec
    from tl_app.features.runtime import tf2onnx_convert

    model = build_feature_model(get_spec("vgg16"), 32, "none", seed=0)

    def wrong_network(_model, path, size):  # a small other network with the same output width
        images = keras.Input((size, size, 3))
        out = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(512, 1)(images))
        tf2onnx_convert(keras.Model(images, out), path, size)

    with pytest.raises(TlAppError, match=r"--precision int8 is refused.*lowest feature cosine -?[0-9.]+"):
        open_int8(model, tmp_path, 32, converter=wrong_network)
    assert list(tmp_path.iterdir()) == []  # nothing kept, no temporary left

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:  # max pooling where the model averages (a 2x2 last map at 64 px): same weights and width
        other = build_feature_model(get_spec("vgg16"), 64, "none", seed=0, pooling="max")
    finally:
        keras.config.set_dtype_policy(previous)
    with pytest.raises(TlAppError, match=r"--precision bf16 is refused.*lowest feature cosine [0-9.]+"):
        open_bf16(build_feature_model(get_spec("vgg16"), 64, "none", seed=0), other, 64)

    same = np.random.default_rng(0).normal(size=(3, 8))
    assert cosine_gate(same, same)["ok"] and not cosine_gate(same, same + 0.2 * np.abs(same).max())["ok"]
