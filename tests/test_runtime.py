"""Issue 17: --runtime onnxruntime runs a copy of the backbone converted once, used only if it matches Keras."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tl_app.core.errors import TlAppError
from tl_app.features.cache import recipe_dir
from tl_app.features.extract import extract_features
from tl_app.features.recipe import recipe_for
from tl_app.features.runtime import ONNX_FILE, PARITY_FILE, open_runtime, tf2onnx_convert
from tl_app.models.backbones import build_feature_model, get_spec


@pytest.fixture
def vgg_config(tiny_config, tmp_path):
    """Four images: the conversion, not the image count, is what this tests."""
    rng = np.random.default_rng(0)
    for k in range(4):
        folder = tmp_path / "photos" / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return tiny_config.with_overrides({"backbone.name": "vgg16", "backbone.input_size": 32,
                                       "data.root": str(tmp_path / "photos"), "data.batch_size": 4,
                                       "features.cache_dir": str(tmp_path / "cache")})


@pytest.mark.slow
def test_onnxruntime_features_match_keras_and_share_the_recipe(vgg_config, tmp_path):
    keras_run = extract_features(vgg_config, echo=None)
    onnx_config = vgg_config.with_overrides({"features.runtime": "onnxruntime",
                                             "features.cache_dir": str(tmp_path / "cache-onnx")})
    assert recipe_for(onnx_config).key() == recipe_for(vgg_config).key()  # equal outputs, one recipe
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
