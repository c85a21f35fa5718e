"""Fine-tuning: the run directory it leaves, safe BatchNorm unfreezing, seeded pipelines, NaN stop, preview.

Fast tests use VGG16 at 32x32 with random weights; the ResNet50 BatchNorm check,
class weights, kill-and-resume and the device paths are in test_finetune_slow.py.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image

from tl_app.core.errors import ConfigError, ModelNotFoundError


def finetune_config(tiny_config, **train):
    config = tiny_config
    config.train.strategy = "finetune"
    config.backbone.name = "vgg16"
    config.train.epochs = 1
    config.train.finetune_epochs = 1
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def compiled(model, config):
    from tl_app.training.losses import make_loss

    model.compile(loss=make_loss(config.train), metrics=["accuracy"])
    return model


def val_dataset(run_dir, config):
    from tl_app.data.manifest import Manifest
    from tl_app.data.pipeline import make_dataset

    manifest = Manifest.load(run_dir / "manifest.json")
    return make_dataset(manifest.split("val"), config.backbone.input_size, config.data.resize_policy,
                        config.train.batch_size, num_classes=manifest.num_classes)


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_cli_finetune_writes_a_complete_run_dir(tiny_config, cli, tmp_path):
    from tl_app.models.opener import load_run_model
    from tl_app.models.artifacts import read_run_info

    config = finetune_config(tiny_config)
    result = cli("train", config.data.root, "--strategy", "finetune", "--backbone", "vgg16", "--weights", "none",
                 "--input-size", 32, "--epochs", 1, "--finetune-epochs", 1, "--batch-size", 8,
                 "--set", "head.units=[16]", "--runs-dir", config.train.runs_dir, "--name", "ft", "--seed", 3)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "ft"
    assert f"run directory: {run_dir}" in result.output
    assert "phase 1: head on the frozen vgg16" in result.output and "phase 2: block5 of vgg16 unfrozen" in result.output
    for name in ("config.json", "config.toml", "manifest.json", "run.json", "model.keras", "history.json",
                 "log.csv", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 3
    assert list((run_dir / "checkpoints").glob("epoch-*.npz"))
    assert list((run_dir / "logs" / "train").iterdir()) and list((run_dir / "logs" / "validation").iterdir())

    epochs = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert [(e["epoch"], e["phase"]) for e in epochs] == [(1, 1), (2, 2)]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(epochs[0])
    assert epochs[1]["learning_rate"] == pytest.approx(epochs[0]["learning_rate"] * 0.1)
    assert len((run_dir / "log.csv").read_text().strip().splitlines()) == 3

    info = read_run_info(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert info["strategy"] == "finetune" and info["status"] == "finished" and info["metrics"] == metrics

    model = load_run_model(run_dir)
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "vgg16", "pool", "head"]
    assert not [layer for layer in model._flatten_layers() if type(layer).__name__.startswith("Random")]
    # evaluate on the validation split reproduces what training reported for the kept (best) epoch
    loss, accuracy = compiled(model, config).evaluate(val_dataset(run_dir, config), verbose=0)
    best = next(e for e in epochs if e["epoch"] == metrics["best_epoch"])
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-5) == pytest.approx(best["val_loss"], rel=1e-4)
    assert accuracy == pytest.approx(best["val_accuracy"]) == pytest.approx(metrics["val_accuracy"])


def test_phase_two_unfreezes_top_blocks_and_keeps_batchnorm_frozen(tiny_config):
    from tl_app.models.backbones import get_spec
    from tl_app.models.surgery import build_classifier, freeze_backbone, unfreeze_top
    from tl_app.training.finetune import check_settings

    spec = get_spec("resnet50")
    tiny_config.head.dropout = 0.0
    model = build_classifier(tiny_config, spec, 32, 3, weights="none")
    base = model.get_layer("resnet50")
    freeze_backbone(model, spec)
    assert {v.path.split("/")[0] for v in model.trainable_weights} == {"dense_0", "probabilities"}

    names = unfreeze_top(model, spec, blocks=1)
    assert names and all(n.startswith("conv5_") for n in names)
    batchnorms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert any(layer.name.startswith("conv5_") for layer in batchnorms)
    assert not any(layer.trainable for layer in batchnorms)
    assert not any(layer.trainable for layer in base.layers if layer.name.startswith("conv4_"))
    conv5 = [layer for layer in base.layers if layer.name.startswith("conv5_") and isinstance(layer, keras.layers.Conv2D)]
    assert len(model.trainable_weights) == 2 * len(conv5) + 4  # kernels + biases, and the head

    two = unfreeze_top(model, spec, blocks=2)
    assert any(n.startswith("conv4_") for n in two) and not any(layer.trainable for layer in batchnorms)
    top = unfreeze_top(model, spec, layers=4)
    assert top == [layer.name for layer in base.layers[-4:] if layer.weights and layer.trainable]

    # the backbone runs in inference mode even when the model trains: BatchNorm uses its moving statistics
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), rtol=1e-5, atol=1e-6)

    tiny_config.train.unfreeze_blocks = 6
    with pytest.raises(ConfigError, match="conv5, conv4, conv3, conv2, conv1"):
        check_settings(tiny_config, spec)


def test_training_pipeline_is_a_function_of_seed_and_epoch(tiny_config, sample_dir):
    from tl_app.data.augment import build_augmenter
    from tl_app.data.scan import scan
    from tl_app.training.finetune import training_dataset
    from tl_app.data.pipeline import make_dataset

    records = scan(sample_dir, tiny_config.data).split("train")
    table = np.array([1.0, 2.0, 3.0], np.float32)

    def batches(first, last, augment=True):
        augmenter = build_augmenter(tiny_config.augment, 32, seed=0) if augment else None
        ds = training_dataset(records, 32, "auto", 8, 3, table, augmenter, seed=0, phase=1,
                              first_epoch=first, last_epoch=last)
        return [tuple(np.asarray(t) for t in batch) for batch in ds]

    steps = -(-len(records) // 8)
    full, resumed = batches(0, 3), batches(1, 3)
    assert len(full) == 3 * steps and len(resumed) == 2 * steps
    for a, b in zip(full[steps:], resumed):  # a resumed run sees exactly the same augmented batches
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    plain = batches(0, 1, augment=False)
    assert not np.allclose(plain[0][0], full[0][0])  # augmentation is applied to training batches
    assert not np.allclose(full[0][0][:4], full[steps][0][:4])  # and differs between epochs
    for images, onehot, weights in plain:
        np.testing.assert_array_equal(weights, table[onehot.argmax(1)])  # class weights ride along
    # without augmentation, the pixels are the pipeline's own decode and resize
    reference = next(iter(make_dataset(records, 32, batch_size=len(records), num_classes=3)))
    ours = np.concatenate([b[0] for b in plain])  # shuffled: compare per-image fingerprints, order-free
    theirs = np.asarray(reference[0])
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.sort(ours.reshape(len(ours), -1).sum(1)),
                               np.sort(theirs.reshape(len(theirs), -1).sum(1)), rtol=1e-6)
    order = np.concatenate([b[1].argmax(1) for b in plain])
    assert sorted(order.tolist()) == sorted(np.asarray(reference[1]).argmax(1).tolist())


def test_augmenter_with_every_augmentation_off_is_the_identity():
    from tl_app.data.augment import build_augmenter
    from tl_app.core.config import AugmentConfig

    off = AugmentConfig(horizontal_flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0,
                        brightness=0.0)
    augmenter = build_augmenter(off, 16, seed=0)
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(augmenter(images, training=True)), images)


def test_nan_loss_stops_with_a_clear_message(tiny_config, cli, tmp_path):
    from tl_app.models.artifacts import read_run_info

    config = finetune_config(tiny_config)
    result = cli("train", config.data.root, "--strategy", "finetune", "--backbone", "vgg16", "--weights", "none",
                 "--input-size", 32, "--epochs", 2, "--finetune-epochs", 1, "--batch-size", 8, "--optimizer", "sgd",
                 "--lr", 1e30, "--set", "head.units=[16]", "--runs-dir", config.train.runs_dir, "--name", "nan")
    assert result.exit_code != 0
    assert "error: Training stopped: the loss became nan in phase 1, epoch 1" in result.output
    assert "Lower the learning rate" in result.output and "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "nan"
    assert read_run_info(run_dir)["status"] == "diverged" and not (run_dir / "model.keras").exists()


def test_augment_preview_writes_a_png_grid(cli, sample_dir, tmp_path):
    out = tmp_path / "preview" / "grid.png"
    result = cli("augment-preview", sample_dir, "--out", out, "--images", 3, "--views", 2, "--input-size", 32,
                 "--set", "augment.grayscale=0.5", "--set", f"features.cache_dir={tmp_path / 'cache' / 'f'}")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "RandomFlip" in result.output and "RandomGrayscale" in result.output
    with Image.open(out) as image:
        assert image.format == "PNG"
        grid = np.asarray(image.convert("RGB"))
    # 3 rows of 128px tiles (32px upscaled), original + 2 views: the views differ from the original
    assert grid.shape[0] >= 3 * 128 and grid.shape[1] >= 3 * 128
    tiles = [grid[22:150, 114 + c * 132:242 + c * 132] for c in range(3)]
    assert not np.array_equal(tiles[0], tiles[1]) or not np.array_equal(tiles[0], tiles[2])

    bad = cli("augment-preview", sample_dir, "--out", tmp_path / "grid.gif")
    assert bad.exit_code == 2 and "expected a .png or .jpg" in bad.output


def test_resume_refuses_what_it_cannot_continue(tiny_config, tmp_path):
    from factories import make_run_dir

    from tl_app.training.finetune import resume_finetune

    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resume_finetune(tmp_path / "nowhere", echo=None)
    bottleneck_run = make_run_dir(tiny_config)  # strategy "bottleneck"
    with pytest.raises(ConfigError, match="fine-tuning runs only"):
        resume_finetune(bottleneck_run, echo=None)


def test_resume_with_other_settings_is_refused_not_ignored(cli, tmp_path):
    # raised epoch counts continue a run (issue 21); every other setting is refused
    result = cli("train", "--resume", tmp_path, "--lr", 0.1, "--set", "train.seed=3")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "train.learning_rate" in result.output and "train.seed=3" in result.output \
        and "start a new run" in result.output
