import keras
import numpy as np
import pytest

from tl_app.models.backbones import REGISTRY, BackbonePreprocess, build_feature_model, get_spec
from tl_app.core.errors import ConfigError

REQUIRED = {"vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "resnet50v2", "resnet101v2", "resnet152v2"}


def test_registry_has_every_required_backbone():
    assert REQUIRED <= set(REGISTRY)


def test_unknown_backbone_lists_valid_names_and_closest_match():
    with pytest.raises(ConfigError) as err:
        get_spec("resnet5O")
    message = str(err.value)
    assert "resnet50" in message and "Did you mean" in message and "vgg16" in message


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_registry_entry_matches_the_real_keras_model(name):
    spec = get_spec(name)
    base = spec.constructor(include_top=False, weights=None, input_shape=(32, 32, 3))
    assert base.count_params() == spec.params
    assert base.output.shape[-1] == spec.feature_width
    names = [layer.name for layer in base.layers]
    assert spec.last_conv_layer in names
    for block in spec.blocks[:2]:
        assert spec.block_layers(base, block), f"no layers for block {block}"


@pytest.mark.parametrize("name", ["resnet50", "resnet50v2", "vgg16"])
def test_preprocess_layer_equals_keras_preprocess_input(name):
    spec = get_spec(name)
    module = {"resnet50": keras.applications.resnet, "resnet50v2": keras.applications.resnet_v2,
              "vgg16": keras.applications.vgg16}[name]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = np.asarray(BackbonePreprocess(spec.preprocess)(pixels))
    theirs = module.preprocess_input(pixels.copy())
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_random_weights_are_deterministic_for_a_seed():
    spec = get_spec("resnet50")
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    a = build_feature_model(spec, 32, "none", seed=3).predict(x, verbose=0)
    b = build_feature_model(spec, 32, "none", seed=3).predict(x, verbose=0)
    c = build_feature_model(spec, 32, "none", seed=4).predict(x, verbose=0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_feature_model_pooling_and_named_layer():
    spec = get_spec("vgg16")
    assert build_feature_model(spec, 32, "none", pooling="max").output.shape[-1] == 512
    flat = build_feature_model(spec, 64, "none", pooling="flatten")
    assert flat.output.shape[-1] == 2 * 2 * 512
    mid = build_feature_model(spec, 32, "none", layer="block4_conv3")
    assert mid.output.shape[-1] == 512
    with pytest.raises(ConfigError, match="block4_conv3"):
        build_feature_model(spec, 32, "none", layer="block4_conv9")


def test_input_size_below_minimum_is_a_clear_error():
    with pytest.raises(ConfigError, match="at least 32"):
        build_feature_model(get_spec("resnet50"), 16, "none")
