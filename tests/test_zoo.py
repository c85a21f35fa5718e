"""The wider zoo (EfficientNetV2, ConvNeXt, MobileNetV3): registry facts against the real Keras models, and
every command end to end per family at the smallest legal size, random weights.

These backbones bring their own normalisation layers (keras.applications ``include_preprocessing``), so
tl-app's preprocessing mode is ``raw``: the exported model must still see exactly the training pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tl_app.core.errors import ConfigError
from tl_app.models.backbones import BackbonePreprocess, build_base, build_feature_model, get_spec
from tl_app.models.registry import BACKBONES, get_info

ZOO = ["efficientnetv2b0", "efficientnetv2s", "convnext_tiny", "convnext_small", "mobilenetv3small",
       "mobilenetv3large"]
LARGER = {"efficientnetv2s", "convnext_small", "mobilenetv3large"}  # the second of each family: slow tests
# how keras.applications normalises 0..255 inside each: ImageNet mean/std, or a rescaling to -1..1
NORMALISATION = {"efficientnetv2b0": "mean_std", "efficientnetv2s": 1 / 128, "convnext_tiny": "mean_std",
                 "convnext_small": "mean_std", "mobilenetv3small": 1 / 127.5, "mobilenetv3large": 1 / 127.5}
FAMILY = {"efficientnetv2": "efficientnetv2b0", "convnext": "convnext_tiny", "mobilenetv3": "mobilenetv3small"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGER else n for n in ZOO])
def test_registry_entry_matches_the_real_keras_model(name):
    spec = get_spec(name)
    assert spec.name == name and spec.preprocess == "raw"
    base = build_base(spec, spec.min_size, "none")
    assert base.name == name  # the assembled model finds its backbone by this name
    assert base.count_params() == spec.params
    assert base.output.shape[-1] == spec.feature_width
    names = [layer.name for layer in base.layers]
    assert spec.last_conv_layer in names and len(base.get_layer(spec.last_conv_layer).output.shape) == 4
    # keras' normalisation layers are inside the network (raw mode leaves pixels alone)
    normalisers = [layer for layer in base.layers if isinstance(layer, keras.layers.Normalization)]
    if NORMALISATION[name] == "mean_std":
        assert normalisers
    else:
        assert not normalisers and any(isinstance(layer, keras.layers.Rescaling)
                                       and abs(layer.scale - NORMALISATION[name]) < 1e-9 for layer in base.layers)
    weighted = [layer for layer in base.layers if layer.weights]
    blocks = {spec.block_of(layer.name) for layer in weighted}
    assert blocks == set(spec.blocks), f"blocks without weights or layers in no block: {blocks ^ set(spec.blocks)}"
    top = spec.block_layers(base, spec.blocks[0])
    assert base.get_layer(spec.last_conv_layer) in top or spec.block_of(spec.last_conv_layer) == spec.blocks[0]


@pytest.mark.parametrize("typed, name", [("convnext_tiny", "convnext_tiny"), ("ConvNeXt-Tiny", "convnext_tiny"),
                                         ("convnexttiny", "convnext_tiny"), ("EfficientNetV2-B0", "efficientnetv2b0"),
                                         ("mobilenet_v3_small", "mobilenetv3small"), ("ResNet-50", "resnet50")])
def test_names_round_trip_in_any_spelling(typed, name):
    assert get_spec(typed).name == name and get_info(typed).name == name


def test_unknown_zoo_name_lists_the_new_families():
    with pytest.raises(ConfigError) as err:
        get_spec("convnext_tiniest")
    assert "convnext_tiny" in str(err.value) and "mobilenetv3large" in str(err.value)


def test_mobilenetv3_blocks_take_the_longest_prefix():
    spec = get_spec("mobilenetv3large")
    assert spec.block_of("expanded_conv_10_project") == "expanded_conv_10"
    assert spec.block_of("expanded_conv_1_project") == "expanded_conv_1"
    assert spec.block_of("expanded_conv_project_bn") == "expanded_conv"
    assert spec.block_of("conv_1_bn") == "conv_1" and spec.block_of("conv_bn") == "conv"


@pytest.mark.parametrize("name", ["efficientnetv2s", "convnext_tiny", "mobilenetv3small"])
def test_weight_files_are_keras_own(name):
    """File name, address and hash as keras.applications downloads them (ConvNeXt's hash is sha256)."""
    import importlib

    spec = get_spec(name)
    module = importlib.import_module({"efficientnetv2s": "keras.src.applications.efficientnet_v2",
                                      "convnext_tiny": "keras.src.applications.convnext",
                                      "mobilenetv3small": "keras.src.applications.mobilenet_v3"}[name])
    hashes = [h for pair in module.WEIGHTS_HASHES.values() for h in pair]
    assert spec.weights_hash in hashes
    base_url = getattr(module, "BASE_WEIGHTS_PATH", None) or module.BASE_WEIGHT_PATH
    assert spec.weights_url == base_url and spec.weights_file.endswith(("_notop.h5", "_no_top_v2.h5"))
    assert spec.weights_hash_algorithm == ("sha256" if name.startswith("convnext") else "md5")


def test_imagenet_offline_is_a_clear_error(tmp_path, monkeypatch):
    from tl_app.core.errors import WeightsUnavailableError
    from tl_app.models.weights import resolve_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("keras.utils.get_file", _no_network)
    spec = get_spec("convnext_tiny")
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(spec, "imagenet")
    message = str(err.value)
    assert spec.weights_file in message and "tl-app weights import" in message and "--weights none" in message


def _no_network(*args, **kwargs):
    raise Exception("URL fetch failure: no internet")


def test_weights_import_status_says_official_by_keras_hash_algorithm(tmp_path, monkeypatch):
    """A MobileNetV3 weight file is checked, cached under Keras' file name and loaded as the ImageNet one, but
    not called official: its digest is not Keras' (ours holds random weights)."""
    from tl_app.models.backbones import import_weights
    from tl_app.models.weights import weights_status

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    spec = get_spec("mobilenetv3small")
    file = tmp_path / "mine.weights.h5"
    build_base(spec, 32, "none", seed=5).save_weights(file)
    result = import_weights(file, spec)
    assert result["official"] is False and Path(result["file"]).name == spec.weights_file
    row = next(r for r in weights_status([spec]) if r["backbone"] == spec.name)
    assert row["present"] and row["official"] is False
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    again = build_feature_model(spec, 32, "imagenet")  # the cached file, loaded as the ImageNet one
    donor = build_feature_model(spec, 32, "none", seed=5)
    np.testing.assert_allclose(again.predict(x, verbose=0), donor.predict(x, verbose=0), atol=1e-5)


def test_raw_mode_leaves_pixels_to_the_backbone():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(BackbonePreprocess("raw")(pixels)), pixels)
    with pytest.raises(ValueError, match="raw"):
        BackbonePreprocess("torch")


def test_backbones_command_lists_the_zoo_with_sizes_and_speeds(cli):
    rows = json.loads(cli("backbones", "--json").output)
    by_name = {r["name"]: r for r in rows}
    assert set(ZOO) <= set(by_name)
    tiny = by_name["convnext_tiny"]
    assert tiny["params"] == 27_820_128 and tiny["float32_mb"] == pytest.approx(111.3, abs=0.1)
    assert tiny["preprocess"] == "raw" and tiny["input_size"] == 224 and by_name["efficientnetv2s"]["input_size"] == 384
    assert all(by_name[n]["speed_vs_resnet50"] > 0 for n in ZOO + ["resnet50", "vgg16"])
    assert by_name["resnet50"]["speed_vs_resnet50"] == 1.0
    table = cli("backbones").output
    assert "convnext_tiny" in table and "MB" in table and "speed" in table


# ---- every command, per family ------------------------------------------------------------
def _ids(frame_dir: Path) -> list[Path]:
    return sorted(p for p in frame_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY))
def test_every_command_works_with_the_family(family, cli, sample_dir, tmp_path):
    """extract, train (bottleneck and finetune, one block unfrozen), export through the parity gate,
    predict from the export, Grad-CAM: 32 px, random weights, one epoch."""
    name = FAMILY[family]
    spec = get_spec(name)
    common = ["--backbone", name.replace("_", "-").upper() if family == "convnext" else name,
              "--weights", "none", "--input-size", "32"]
    cache = ["--cache-dir", tmp_path / "cache"]
    out = cli("extract", sample_dir, *common, *cache, "--out", tmp_path / "feats", "--json")
    assert out.exit_code == 0, out.output
    feats = np.load(tmp_path / "feats" / "features.npy")
    assert feats.shape[1] == spec.feature_width and np.isfinite(feats).all()

    runs = tmp_path / "runs"
    sets = ["--set", f"features.cache_dir={tmp_path / 'cache'}", "--set", "head.units=[8]"]
    bottleneck = cli("train", sample_dir, "--strategy", "bottleneck", *common, "--epochs", "1", "--batch-size", "8",
                     "--runs-dir", runs, "--name", "probe", "--json", *sets)
    assert bottleneck.exit_code == 0, bottleneck.output
    finetune = cli("train", sample_dir, "--strategy", "finetune", *common, "--epochs", "1", "--finetune-epochs", "1",
                   "--unfreeze-blocks", "1", "--batch-size", "8", "--runs-dir", runs, "--name", "tuned", "--json",
                   *sets)
    assert finetune.exit_code == 0, finetune.output
    run_dir = runs / "tuned"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backbone"] == name

    root = tmp_path / "models"
    exported = cli("export", run_dir, "--root", root, "--name", family, "--format", "savedmodel,keras")
    assert exported.exit_code == 0, exported.output
    # the text summary names every gate, the OOD score's by its relative difference (it raised KeyError)
    assert "parity savedmodel: max |diff|" in exported.output
    assert "parity savedmodel_ood_score: max relative diff" in exported.output
    version = root / family / "1"
    card = json.loads((version / "model_card.json").read_text())
    assert card["preprocessing"]["mode"] == "raw" and "built-in" in card["preprocessing"]["description"]
    assert card["parity"]["savedmodel"]["max_abs_diff"] <= 1e-4

    preds = tmp_path / "preds.csv"
    predicted = cli("predict", root / family, sample_dir, "--out", preds, "--quiet")
    assert predicted.exit_code == 0, predicted.output
    assert len(preds.read_text().strip().splitlines()) == 1 + sum(1 for _ in _ids(sample_dir))

    image = _ids(sample_dir)[0]
    explained = cli("explain", run_dir, image, "--out", tmp_path / "cam", "--json")
    assert explained.exit_code == 0, explained.output
    assert list((tmp_path / "cam").glob("*.png"))
    if family == "convnext":  # LayerScale, a keras.applications layer of its own, in a served SavedModel
        _served_equals_the_run(root, run_dir, tmp_path)


def _served_equals_the_run(root: Path, run_dir: Path, tmp_path: Path) -> None:
    """The server (a real process on loopback) answers what the run answers (calibrated) on the training
    pipeline's own pixels."""
    import httpx
    from factories import reference_pixels
    from test_server import b64, start

    from tl_app.models.opener import open_model

    pixels, records = reference_pixels(run_dir)
    expected = open_model(run_dir, keras=True).predict(pixels[:4])
    server = start(root, "--poll-seconds", "30", log=tmp_path / "server.log")
    try:
        response = httpx.post(server.url + "/v1/models/convnext:predict",
                              json={"instances": [b64(r.path) for r in records[:4]]}, timeout=120)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    served = np.array([p["probabilities"] for p in response.json()["predictions"]])
    assert np.max(np.abs(served - expected)) <= 1e-4


@pytest.mark.parametrize("name", ["convnext_tiny", "mobilenetv3small", "efficientnetv2b0"])
def test_finetune_unfreezes_the_top_block_and_keeps_batchnorm_frozen(name):
    from tl_app.models.heads import build_head
    from tl_app.core.config import Config
    from tl_app.models.surgery import assemble, unfreeze_top

    spec = get_spec(name)
    features = build_feature_model(spec, 32, "none")
    model = assemble(features, build_head(3, spec.feature_width, Config().head))
    trained = unfreeze_top(model, spec, blocks=1)
    assert trained and all(spec.block_of(layer) == spec.blocks[0] for layer in trained)
    base = model.get_layer(spec.name)
    assert not any(layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))
    if name == "convnext_tiny":
        assert f"{name}_stage_3_final_layernorm" in trained  # the top norm trains with the top stage
