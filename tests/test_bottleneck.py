"""The bottleneck strategy: heads on cached features, the run directory, and model parity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tl_app.training.bottleneck import train_bottleneck


def run(config):
    return train_bottleneck(config, echo=None)


def test_dense_head_writes_a_complete_run_and_the_assembled_model_matches_the_head(tiny_config):
    from tl_app.models.opener import load_run_model
    from tl_app.models.artifacts import read_run_info

    tiny_config.head.units = [16, 8]
    tiny_config.head.batch_norm = True
    tiny_config.head.l2 = 1e-4
    tiny_config.head.max_norm = 3.0
    summary = run(tiny_config)
    run_dir = Path(summary["run_dir"])
    for name in ("model.keras", "history.json", "log.csv", "metrics.json", "run.json", "manifest.json",
                 "config.json", "skipped.csv"):
        assert (run_dir / name).is_file(), name
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    # the same records fine-tuning writes: epochs from 1, timing, the same log.csv columns
    assert set(history["epochs"][0]) >= {"epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
    with open(run_dir / "log.csv") as handle:
        log = list(csv.DictReader(handle))
    assert [row["epoch"] for row in log] == ["1", "2"] and "val_accuracy" in log[0]
    info = read_run_info(run_dir)
    assert info["strategy"] == "bottleneck" and info["metrics"]["val_accuracy"] is not None
    assert summary["features"]["computed"] == 36 and summary["metrics"] == info["metrics"]

    model = load_run_model(run_dir)
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "resnet50", "pool", "head"]
    head = model.get_layer("head")
    assert [layer.name for layer in head.layers if "dense" in layer.name] == ["dense_0", "dense_1"]

    assert_parity(tiny_config, run_dir)


def assert_parity(config, run_dir) -> None:
    """The same records through the same tf.data pipeline: cached features -> head == images -> model."""
    from tl_app.features.extract import extract_features
    from tl_app.data.pipeline import make_dataset
    from tl_app.models.opener import load_run_model

    model = load_run_model(run_dir)
    head = model.get_layer("head")
    cached = extract_features(config, echo=None)
    assert cached.stats["computed"] == 0
    images = make_dataset(cached.records, config.backbone.input_size, config.data.resize_policy, batch_size=8)
    from_images = model.predict(images, verbose=0)
    from_features = head.predict(np.asarray(cached.features), batch_size=8, verbose=0)
    assert from_images.shape == (len(cached.records), len(cached.classes))
    assert np.abs(from_images - from_features).max() <= 1e-5


def test_logistic_head_on_cached_augmented_views(tiny_config):
    tiny_config.backbone.name = "vgg16"
    tiny_config.head.kind = "logistic"
    tiny_config.features.augment_views = 2
    tiny_config.train.epochs = 3
    tiny_config.train.optimizer = "sgd"
    tiny_config.train.schedule = "cosine"
    summary = run(tiny_config)
    assert summary["features"]["views_per_image"] == 2
    assert summary["features"]["views_computed"] == 2 * summary["metrics"]["train_images"]
    from tl_app.models.opener import load_run_model

    head = load_run_model(summary["run_dir"]).get_layer("head")
    dense = [layer for layer in head.layers if layer.__class__.__name__ == "Dense"]
    assert [layer.name for layer in dense] == ["probabilities"]  # logistic regression: one softmax layer
    assert summary["metrics"]["epochs_trained"] == 3
    # a second run trains on the same cached views without running the backbone for them
    again = run(tiny_config.with_overrides({"train.name": "again"}))
    assert again["features"]["views_computed"] == 0 and again["features"]["computed"] == 0
    assert_parity(tiny_config, again["run_dir"])  # the backbone rebuilt from the recipe, not the one that extracted


def test_early_stopping_restores_the_best_epoch(tiny_config):
    tiny_config.backbone.name = "vgg16"
    tiny_config.train.epochs = 30
    tiny_config.train.early_stopping_patience = 1
    tiny_config.train.learning_rate = 0.5  # diverges: validation loss soon stops improving
    tiny_config.train.optimizer = "sgd"
    summary = run(tiny_config)
    metrics = summary["metrics"]
    assert metrics["epochs_trained"] < 30
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["epochs"]
    best = min(history, key=lambda e: e["val_loss"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["val_loss"] == pytest.approx(best["val_loss"], rel=1e-4)



def test_a_standardised_head_folds_into_its_first_dense_layer_exactly():
    """head.standardize: trained behind a Normalization layer from the given (training) features, saved folded."""
    import keras

    from tl_app.core.config import HeadConfig
    from tl_app.models.heads import build_head, fold_standardization

    rng = np.random.default_rng(0)
    features = rng.gamma(0.5, [1.0, 10.0, 50.0, 5.0], (200, 4)).astype(np.float32)
    features[:, 3] = 0.0  # a unit that never fired in training: its std is floored, not ~0
    for config in (HeadConfig(kind="logistic"), HeadConfig(units=[8, 6], batch_norm=True, dropout=0.2)):
        head = build_head(3, 4, config, standardize_on=features)
        norm = head.get_layer("standardize")
        np.testing.assert_allclose(np.asarray(norm.mean).ravel(), features.mean(0), rtol=1e-5)
        standardised = np.asarray(head(features[:5], training=False))
        expected = (features[:5, :3] - features[:, :3].mean(0)) / features[:, :3].std(0)
        np.testing.assert_allclose(np.asarray(norm(features[:5]))[:, :3], expected, rtol=1e-4, atol=1e-4)
        folded = fold_standardization(head, config)
        assert not any(isinstance(layer, keras.layers.Normalization) for layer in folded.layers)
        probe = np.concatenate([features[:20], rng.normal(0, 50, (20, 4)).astype(np.float32)])
        np.testing.assert_allclose(np.asarray(folded(probe[:5], training=False)), standardised, atol=1e-5)
        np.testing.assert_allclose(np.asarray(folded(probe, training=False)),
                                   np.asarray(head(probe, training=False)), atol=1e-5)
    assert len(build_head(3, 4, HeadConfig(kind="logistic", standardize=False), standardize_on=features).layers) == 2


@pytest.mark.slow
def test_a_standardised_bottleneck_run_saves_the_trained_head_and_exports_every_format(tiny_config):
    """The saved head computes what the trained one did (its validation loss on the cached features
    equals the run's), and every format passes the export's parity gate, ONNX included."""
    from tl_app.export.exporter import export_run
    from tl_app.features.extract import extract_features
    from tl_app.models.opener import load_run_model

    tiny_config.backbone.name = "vgg16"  # the fastest real backbone to build and save
    summary = run(tiny_config)
    head = load_run_model(summary["run_dir"]).get_layer("head")
    cached = extract_features(tiny_config, echo=None)
    val_rows = cached.rows("val")
    probs = head.predict(np.asarray(cached.features, np.float32)[val_rows], verbose=0)
    saved_loss = float(-np.mean(np.log(probs[np.arange(len(val_rows)), cached.labels[val_rows]])))
    assert saved_loss == pytest.approx(summary["metrics"]["val_loss"], rel=1e-4)
    exported = export_run(summary["run_dir"], root=tiny_config.export.root, name="standardised",
                          formats="savedmodel,keras,tflite,onnx", echo=None)
    assert {"savedmodel", "keras", "tflite", "onnx"} <= set(exported["parity"]), exported["parity"]
