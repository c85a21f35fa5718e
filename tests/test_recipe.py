"""Fine-tuning recipe options: EMA of weights, mixup/CutMix, discriminative learning rates.

Real VGG16 at 32x32 with random weights; each run is one or two short epochs.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from test_finetune import finetune_config


def recipe_config(tiny_config, **train):
    """test_finetune's configuration, one phase and no calibration unless ``train`` says otherwise."""
    return finetune_config(tiny_config, **{"finetune_epochs": 0, "calibration": "none", **train})


class WeightsAtEpochEnd(keras.callbacks.Callback):
    """The raw trainable weights and the optimiser's averages after each epoch, by variable path."""

    def __init__(self):
        super().__init__()
        self.raw, self.average = {}, {}

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        variables = self.model.trainable_variables
        self.raw[epoch + 1] = {v.path: np.asarray(v.numpy()) for v in variables}
        self.average[epoch + 1] = {v.path: np.asarray(a.numpy())
                                   for v, a in zip(variables, optimizer._model_variables_moving_average)}


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_ema_run_saves_and_evaluates_the_optimizers_averaged_weights(tiny_config):
    from tl_app.models.opener import load_run_model
    from tl_app.training.finetune import FineTuneRun
    from tl_app.training.runs import prepare_run

    config = recipe_config(tiny_config, ema=True, ema_momentum=0.5, epochs=2, learning_rate=1e-2)
    seen = WeightsAtEpochEnd()
    run = FineTuneRun(prepare_run(config, echo=None), None, [seen])
    summary = run.run(None)
    best = summary["metrics"]["best_epoch"]
    assert best in (1, 2)
    assert json.loads((run.run_dir / "run.json").read_text())["finetune"]["ema"] is True

    saved = load_run_model(run.run_dir)
    trained_head, saved_head = run.model.get_layer("head"), saved.get_layer("head")
    pairs = list(zip(trained_head.weights, saved_head.weights))
    assert pairs and len(trained_head.weights) == len(saved_head.weights)
    for trained, kept in pairs:
        value = np.asarray(kept.numpy())
        assert np.allclose(value, seen.average[best][trained.path], atol=1e-6), trained.path
        assert not np.allclose(value, seen.raw[best][trained.path], atol=1e-4), trained.path
    # the reported validation metrics are those of the averaged weights the file holds
    from tl_app.training.losses import make_loss

    saved.compile(loss=make_loss(config.train), metrics=["accuracy"])
    loss, _ = saved.evaluate(run.val_ds, verbose=0)
    assert loss == pytest.approx(summary["metrics"]["val_loss"], rel=1e-4)
    history = json.loads((run.run_dir / "history.json").read_text())["epochs"]
    assert loss == pytest.approx(history[best - 1]["val_loss"], rel=1e-4)


# ---- mixup and CutMix ---------------------------------------------------------------
def two_tone_batch(size: int = 16):
    """Image 0 all black (class 0), image 1 all white (class 1): a mixed pixel's brightness tells its source."""
    images = np.stack([np.zeros((size, size, 3), np.float32), np.full((size, size, 3), 255.0, np.float32)])
    labels = np.eye(2, dtype=np.float32)
    return images, labels


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_labels_sum_to_one_and_match_the_pixel_proportion(kind):
    import tensorflow as tf

    from tl_app.data.augment import mix_batch

    images, labels = two_tone_batch()
    mixed_any = False
    for s in range(12):
        mixed, soft = mix_batch(tf.constant(images), tf.constant(labels), tf.constant([s, 7], tf.int64),
                                **{kind: 1.0})
        mixed, soft = mixed.numpy(), soft.numpy()
        assert np.allclose(soft.sum(axis=1), 1.0, atol=1e-6)
        for i in range(2):
            white = mixed[i].mean() / 255.0  # mixup: the blend weight; CutMix: the pasted box's area
            assert soft[i, 1] == pytest.approx(white, abs=1e-5), (s, i)
            if kind == "cutmix":  # pixels are copied whole, never blended
                assert set(np.unique(mixed[i])) <= {0.0, 255.0}
        mixed_any |= bool(0.01 < soft[0, 1] < 0.99 or 0.01 < soft[1, 0] < 0.99)
    assert mixed_any


def test_mixed_sample_weights_follow_the_mixed_labels():
    from tl_app.training.losses import mixed_sample_weights

    table = np.array([1.0, 3.0, 0.5], np.float32)
    soft = np.array([[1, 0, 0], [0.7, 0.3, 0], [0, 0.25, 0.75]], np.float32)
    weights = np.asarray(mixed_sample_weights(soft, table))
    assert np.allclose(weights, [1.0, 0.7 + 0.9, 0.75 + 0.375])


def test_training_batches_are_mixed_with_weights_of_their_soft_labels(tiny_config, sample_dir):
    from tl_app.data.augment import build_augmenter
    from tl_app.core.config import AugmentConfig
    from tl_app.data.scan import scan
    from tl_app.training.finetune import training_dataset

    records = scan(sample_dir, tiny_config.data).split("train")[:16]
    table = np.array([1.0, 2.0, 4.0], np.float32)
    augmenter = build_augmenter(AugmentConfig(), 32, seed=0)
    plain = list(training_dataset(records, 32, "auto", 8, 3, table, augmenter, seed=0, phase=1,
                                  first_epoch=0, last_epoch=1))
    mixed = list(training_dataset(records, 32, "auto", 8, 3, table, augmenter, seed=0, phase=1,
                                  first_epoch=0, last_epoch=1, mixup=0.4, cutmix=1.0))
    assert len(plain) == len(mixed) == 2
    for (_, onehot, w0), (_, soft, w1) in zip(plain, mixed):
        onehot, soft = onehot.numpy(), soft.numpy()
        assert set(np.unique(onehot)) <= {0.0, 1.0}
        assert np.allclose(soft.sum(axis=1), 1.0, atol=1e-6)
        assert np.allclose(w0.numpy(), onehot @ table) and np.allclose(w1.numpy(), soft @ table, atol=1e-5)
    assert any(not set(np.unique(b[1].numpy())) <= {0.0, 1.0} for b in mixed)
    # the same seed gives the same mixed batches (resume relies on it)
    again = list(training_dataset(records, 32, "auto", 8, 3, table, augmenter, seed=0, phase=1,
                                  first_epoch=0, last_epoch=1, mixup=0.4, cutmix=1.0))
    for a, b in zip(mixed, again):
        assert np.array_equal(a[0].numpy(), b[0].numpy()) and np.array_equal(a[1].numpy(), b[1].numpy())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_finetune_with_mixup_and_cutmix_runs_end_to_end_and_exports(tiny_config, cli, tmp_path):
    from tl_app.data.manifest import Manifest
    from tl_app.data.pipeline import make_dataset
    from tl_app.export.exporter import export_run
    from tl_app.models.opener import load_run_model
    from tl_app.training.losses import make_loss

    config = recipe_config(tiny_config)
    result = cli("train", config.data.root, "--strategy", "finetune", "--backbone", "vgg16", "--weights", "none",
                 "--input-size", 32, "--epochs", 1, "--finetune-epochs", 1, "--batch-size", 8,
                 "--set", "head.units=[16]", "--set", "train.mixup=0.4", "--set", "train.cutmix=1.0",
                 "--set", "train.label_smoothing=0.1", "--runs-dir", config.train.runs_dir, "--name", "mixed")
    assert result.exit_code == 0, result.output
    assert "recipe: mixup 0.4, CutMix 1" in result.output
    run_dir = tmp_path / "runs" / "mixed"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["finetune"]["mixup"] == 0.4 and info["finetune"]["cutmix"] == 1.0
    assert json.loads((run_dir / "config.json").read_text())["train"]["cutmix"] == 1.0

    # validation is never mixed: the one-hot validation split reproduces the reported figures
    manifest = Manifest.load(run_dir / "manifest.json")
    val = make_dataset(manifest.split("val"), 32, config.data.resize_policy, 8, num_classes=manifest.num_classes)
    model = load_run_model(run_dir)
    model.compile(loss=make_loss(json_train(run_dir)), metrics=["accuracy"])
    loss, accuracy = model.evaluate(val, verbose=0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-4) and accuracy == pytest.approx(metrics["val_accuracy"])
    assert loss == pytest.approx(metrics["reported_val_loss"], rel=1e-3)

    exported = export_run(run_dir, root=tmp_path / "models", name="mixed", formats="keras", echo=None)
    assert (tmp_path / "models" / "mixed").is_dir() and exported["path"]


def json_train(run_dir):
    from tl_app.core.config import Config

    return Config.from_dict(json.loads((run_dir / "config.json").read_text())).train


# ---- discriminative learning rates -------------------------------------------------------
class BlockMovement(keras.callbacks.Callback):
    """Mean absolute change of each VGG16 block's conv kernels over phase 2."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks, self.start, self.moved = blocks, {}, {}

    def kernels(self):
        base = self.model.get_layer("vgg16")
        return {block: [np.asarray(layer.kernel.numpy()) for layer in base.layers
                        if layer.name.startswith(block + "_conv")] for block in self.blocks}

    def on_train_begin(self, logs=None):
        self.start = self.kernels()

    def on_train_end(self, logs=None):
        end = self.kernels()
        self.moved = {block: float(np.mean([np.abs(b - a).mean() for a, b in zip(self.start[block], end[block])]))
                      for block in self.blocks}


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_deeper_unfrozen_blocks_move_less_with_lr_decay_per_block(tiny_config):
    from tl_app.training.finetune import FineTuneRun
    from tl_app.training.runs import prepare_run

    config = recipe_config(tiny_config, epochs=0, finetune_epochs=1, unfreeze_blocks=2, lr_decay_per_block=0.1,
                           learning_rate=1e-2, finetune_lr_factor=0.5)
    movement = BlockMovement(["block5", "block4"])
    messages = []
    FineTuneRun(prepare_run(config, echo=None), messages.append, [movement]).run(None)
    assert any("each deeper block learns 0.1x slower" in m for m in messages)
    top, deeper = movement.moved["block5"], movement.moved["block4"]
    assert top > 0 and deeper > 0
    # Adam's steps are about the learning rate per element, so the ratio is about the decay
    assert 0.03 < deeper / top < 0.3, (top, deeper)
