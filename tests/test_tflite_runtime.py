"""Issue 17: --runtime tflite (XNNPACK) runs a copy of the backbone converted once, used only if it matches Keras
within 1e-4, and shares the Keras recipe; a conversion that does not match is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tl_app.core.errors import TlAppError
from tl_app.features.cache import recipe_dir
from tl_app.features.extract import extract_features
from tl_app.features.recipe import recipe_for
from tl_app.features.runtime import TFLITE_FILE, TFLITE_PARITY_FILE, open_runtime, tflite_convert
from tl_app.models.backbones import build_feature_model, get_spec


@pytest.mark.slow
def test_tflite_features_match_keras_and_share_the_recipe(runtime_config, tmp_path):
    config = runtime_config
    keras_run = extract_features(config, echo=None)
    lite = config.with_overrides({"features.runtime": "tflite", "features.cache_dir": str(tmp_path / "cache-lite")})
    assert recipe_for(lite).key() == recipe_for(config).key()  # equal outputs, one recipe
    lite_run = extract_features(lite, echo=None)
    assert lite_run.stats["computed"] == keras_run.stats["computed"] == 4
    expected = np.asarray(keras_run.features)
    np.testing.assert_allclose(np.asarray(lite_run.features), expected, rtol=0,
                               atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    folder = recipe_dir(lite.features.cache_dir, recipe_for(lite))
    record = json.loads((folder / TFLITE_PARITY_FILE).read_text())
    assert (folder / TFLITE_FILE).is_file() and record["ok"] and record["max_abs_diff"] <= record["allowed"]


def test_a_tflite_conversion_that_does_not_match_keras_is_refused(tmp_path):
    import keras

    model = build_feature_model(get_spec("vgg16"), 32, "none", seed=0)

    def wrong_network(_model, path, size):  # a small other network with the same output width
        images = keras.Input((size, size, 3))
        tflite_convert(keras.Model(images, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(512, 1)(images))),
                       path, size)

    with pytest.raises(TlAppError, match="TFLite conversion of the backbone does not match Keras"):
        open_runtime("tflite", model, tmp_path, 32, converter=wrong_network)
    assert list(tmp_path.iterdir()) == []  # nothing kept, no temporary left
