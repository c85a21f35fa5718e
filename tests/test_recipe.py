"""Fine-tuning recipe options: EMA of weights, mixup/CutMix, discriminative learning rates.

Real VGG16 at 32x32 with random weights; each run is one or two short epochs.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest


def recipe_config(tiny_config, **train):
    config = tiny_config
    config.train.strategy = "finetune"
    config.backbone.name = "vgg16"
    config.train.epochs = 1
    config.train.finetune_epochs = 0
    config.train.calibration = "none"
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


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
