"""Issue 17: --runtime onnxruntime runs a copy of the backbone converted once, used only if it matches Keras."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tl_app.core.errors import TlAppError
from tl_app.features.cache import recipe_dir
from tl_app.features.extract import extract_features
from tl_app.features.recipe import recipe_for
from tl_app.features.runtime import ONNX_FILE, PARITY_FILE, open_runtime, tf2onnx_convert
from tl_app.models.backbones import build_feature_model, get_spec


@pytest.mark.slow
def test_onnxruntime_features_match_keras_and_share_the_recipe(runtime_config, tmp_path):
    keras_run = extract_features(runtime_config, echo=None)
    onnx_config = runtime_config.with_overrides({"features.runtime": "onnxruntime",
                                             "features.cache_dir": str(tmp_path / "cache-onnx")})
    assert recipe_for(onnx_config).key() == recipe_for(runtime_config).key()  # equal outputs, one recipe
    onnx_run = extract_features(onnx_config, echo=None)
    assert onnx_run.stats["computed"] == keras_run.stats["computed"] > 0
    expected = np.asarray(keras_run.features)
    np.testing.assert_allclose(np.asarray(onnx_run.features), expected, rtol=0,
                               atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    folder = recipe_dir(onnx_config.features.cache_dir, recipe_for(onnx_config))
    record = json.loads((folder / PARITY_FILE).read_text())
    assert (folder / ONNX_FILE).is_file() and record["ok"] and record["max_abs_diff"] <= record["allowed"]


@pytest.mark.slow
def test_a_conversion_that_does_not_match_keras_is_refused(tmp_path):
    spec = get_spec("vgg16")
    model = build_feature_model(spec, 32, "none", seed=0)
    other = build_feature_model(spec, 32, "none", seed=1)  # same network, other weights: a wrong conversion

    def wrong_conversion(_model, path, size):
        tf2onnx_convert(other, path, size)

    with pytest.raises(TlAppError, match="does not match Keras"):
        open_runtime("onnxruntime", model, tmp_path, 32, converter=wrong_conversion)
    assert not (tmp_path / ONNX_FILE).exists() and not (tmp_path / PARITY_FILE).exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either

    runtime = open_runtime("onnxruntime", model, tmp_path, 32)  # the right conversion passes the same gate
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = np.asarray(model.predict_on_batch(images))
    np.testing.assert_allclose(runtime(images), expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
