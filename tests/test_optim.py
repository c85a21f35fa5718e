"""Optimisers, schedules and losses shared by both strategies: each one constructs and takes real steps."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tl_app.core.config import OPTIMIZERS, SCHEDULES, TrainConfig
from tl_app.core.errors import ConfigError
from tl_app.training.losses import class_weight_table, make_loss
from tl_app.training.optim import LearningRateController, make_optimizer, make_schedule, schedule_callbacks, scheduled_rate


def tiny_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[(x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int)]
    return x, y


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(3, activation="softmax")])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_constructs_and_steps(name):
    train = TrainConfig(optimizer=name, learning_rate=0.05, momentum=0.9, nesterov=True)
    optimizer = make_optimizer(train)
    assert math.isclose(float(optimizer.learning_rate), 0.05, rel_tol=1e-6)
    x, y = tiny_problem()
    model = tiny_model()
    model.compile(optimizer=optimizer, loss=make_loss(train), run_eagerly=True)  # tiny: skip tracing
    before = [w.copy() for w in model.get_weights()]
    losses = [float(model.train_on_batch(x, y)) for _ in range(5)]
    assert all(np.isfinite(losses))
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    if name != "adadelta":  # adadelta's effective step is tiny by design
        assert losses[-1] < losses[0]
    assert int(optimizer.iterations) == 5


def test_optimizer_knobs_reach_keras():
    sgd = make_optimizer(TrainConfig(optimizer="sgd", momentum=0.8, nesterov=True))
    assert sgd.momentum == pytest.approx(0.8) and sgd.nesterov
    adamw = make_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.01))
    assert adamw.weight_decay == pytest.approx(0.01)
    assert math.isclose(float(make_optimizer(TrainConfig(), learning_rate=0.02).learning_rate), 0.02, rel_tol=1e-6)
    with pytest.raises(ConfigError, match="learning_rate"):
        make_optimizer(TrainConfig(learning_rate=0.0))
    with pytest.raises(ConfigError, match="Did you mean 'adam'"):
        make_optimizer(TrainConfig(optimizer="adma"))


def test_schedule_rates():
    base = 0.1
    assert [scheduled_rate(base, e, 10) for e in range(3)] == [base] * 3
    cosine = [scheduled_rate(base, e, 10, "cosine") for e in range(10)]
    assert cosine[0] == pytest.approx(base) and all(a > b for a, b in zip(cosine, cosine[1:]))
    assert cosine[5] == pytest.approx(base / 2)
    step = [scheduled_rate(base, e, 10, "step", step_every=3, step_factor=0.5) for e in range(7)]
    assert step == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    warm = [scheduled_rate(base, e, 10, "cosine", warmup_epochs=3) for e in range(5)]
    assert warm[:3] == pytest.approx([0.025, 0.05, 0.075]) and warm[3] == pytest.approx(base)
    with pytest.raises(ConfigError, match="schedule"):
        scheduled_rate(base, 0, 10, "exponential")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_sets_the_rate_during_fit(schedule):
    train = TrainConfig(schedule=schedule, learning_rate=0.1, warmup_epochs=1, step_every=1, step_factor=0.5,
                        early_stopping_patience=2)
    controller = make_schedule(train, epochs=4, monitor="loss")
    x, y = tiny_problem()
    model = tiny_model()
    model.compile(optimizer=make_optimizer(train), loss="categorical_crossentropy", run_eagerly=True)
    history = model.fit(x, y, epochs=4, batch_size=8, callbacks=[controller], verbose=0)
    rates = history.history["learning_rate"]
    assert rates[0] == pytest.approx(0.05)  # warm-up
    expected = {"constant": [0.1, 0.1, 0.1], "plateau": [0.1, 0.1, 0.1], "step": [0.1, 0.05, 0.025],
                "cosine": [scheduled_rate(0.1, e, 4, "cosine", 1) for e in (1, 2, 3)]}[schedule]
    assert rates[1:] == pytest.approx(expected, rel=1e-5)
    assert float(model.optimizer.learning_rate) == pytest.approx(rates[-1], rel=1e-5)


def test_plateau_reduces_after_patience_and_its_state_round_trips():
    controller = LearningRateController(1.0, 10, "plateau", monitor="val_loss", patience=2, step_factor=0.5)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="categorical_crossentropy")
    controller.set_model(model)
    for epoch, value in enumerate([1.0, 0.9, 0.95, 0.96, 0.97, 0.98]):
        controller.on_epoch_begin(epoch)
        controller.on_epoch_end(epoch, {"val_loss": value})
    assert controller.plateau_lr == pytest.approx(0.25)  # two reductions: after epochs 4 and 6
    state = controller.get_state()
    other = LearningRateController(1.0, 10, "plateau", monitor="val_loss", patience=2, step_factor=0.5)
    other.set_state(state)
    assert other.get_state() == state and other.rate(6) == pytest.approx(0.25)


def test_plateau_lowers_the_rate_inside_fit_when_the_loss_stalls():
    x, y = tiny_problem()
    model = tiny_model()
    for layer in model.layers:
        layer.trainable = False  # nothing can improve: val_loss stays put, so the plateau rule must fire
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy", run_eagerly=True)
    controller = LearningRateController(0.1, 6, "plateau", monitor="val_loss", patience=2, step_factor=0.5)
    history = model.fit(x, y, validation_data=(x, y), epochs=6, batch_size=8, callbacks=[controller], verbose=0)
    rates = history.history["learning_rate"]
    # epoch 1 sets the best; epochs 2-3 stall -> halved from epoch 4; epochs 4-5 stall -> halved again at 6
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025])
    assert float(model.optimizer.learning_rate) == pytest.approx(0.025)


def test_bottleneck_calling_convention():
    callbacks = schedule_callbacks(TrainConfig(schedule="cosine", epochs=7), has_val=False)
    assert len(callbacks) == 1 and callbacks[0].monitor == "loss" and callbacks[0].epochs == 7


def test_losses_smoothing_focal_and_two_classes():
    y = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    p = np.array([[0.9, 0.1], [0.4, 0.6]], "float32")
    plain = float(make_loss(TrainConfig())(y, p))
    assert plain == pytest.approx(-(math.log(0.9) + math.log(0.6)) / 2, rel=1e-5)
    smooth = float(make_loss(TrainConfig(label_smoothing=0.2))(y, p))
    smoothed_y = y * 0.8 + 0.1
    assert smooth == pytest.approx(float(np.mean(-(smoothed_y * np.log(p)).sum(1))), rel=1e-5)
    focal = make_loss(TrainConfig(focal_gamma=2.0))
    assert isinstance(focal, keras.losses.CategoricalFocalCrossentropy)
    # focal down-weights the easy example far more than the hard one
    easy, hard = (float(focal(y[i:i + 1], p[i:i + 1])) for i in (0, 1))
    assert easy / -math.log(0.9) < hard / -math.log(0.6)
    with pytest.raises(ConfigError, match="label_smoothing"):
        make_loss(TrainConfig(label_smoothing=1.0))


def test_class_weight_table():
    assert class_weight_table({0: 0.5, 2: 3.0}, 3).tolist() == [0.5, 1.0, 3.0]
    assert class_weight_table(None, 2).tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match="finite"):
        class_weight_table({0: float("nan")}, 2)
