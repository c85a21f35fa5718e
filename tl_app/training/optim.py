"""Optimisers and learning-rate schedules, shared by both training strategies.

Schedules are epoch-level (set at the start of each epoch, like Keras's
``LearningRateScheduler``) and kept in one stateful callback, so a resumed run
can put the exact learning rate and plateau counters back.
"""

from __future__ import annotations

import math

import keras

from tl_app.core.config import OPTIMIZERS, SCHEDULES, Config, TrainConfig
from tl_app.core.errors import ConfigError, unknown_choice


def train_section(config: Config | TrainConfig) -> TrainConfig:
    """Accept the whole Config or its [train] section."""
    return config.train if isinstance(config, Config) else config


def make_optimizer(config: Config | TrainConfig, learning_rate: float | None = None,
                   ema: bool = False) -> keras.optimizers.Optimizer:
    """The optimisers users expect, with their usual knobs from [train].

    momentum/nesterov apply to sgd; weight_decay to adamw (decoupled, as in the paper).
    ``ema``: the optimiser also keeps a moving average of the weights (train.ema_momentum),
    which ``finalize_variable_values`` (and ``EmaWeights``) put into the model.
    """
    t = train_section(config)
    lr = float(t.learning_rate if learning_rate is None else learning_rate)
    if not lr > 0:
        raise ConfigError(f"train.learning_rate must be positive, got {lr}.")
    extra = {"use_ema": True, "ema_momentum": float(t.ema_momentum)} if ema else {}
    name = t.optimizer
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=t.momentum, nesterov=t.nesterov, **extra)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr, **extra)
    if name == "adagrad":
        return keras.optimizers.Adagrad(lr, **extra)
    if name == "adadelta":
        return keras.optimizers.Adadelta(lr, **extra)
    if name == "adam":
        return keras.optimizers.Adam(lr, **extra)
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=t.weight_decay, **extra)
    if name == "nadam":
        return keras.optimizers.Nadam(lr, **extra)
    raise ConfigError(unknown_choice("optimizer", name, OPTIMIZERS))


_RATE_SCALED: dict[type, type] = {}


def with_rate_scales(optimizer: keras.optimizers.Optimizer, scales: dict[str, float]) -> keras.optimizers.Optimizer:
    """The same optimiser, with each variable's learning rate multiplied by ``scales[variable.path]`` (default 1).

    Discriminative learning rates need the step itself scaled: scaling gradients
    does nothing under Adam-like optimisers, which normalise them away. The
    schedule still sets one base rate; the optimiser's state and checkpoint are
    unchanged, so resuming works as before.
    """
    base = type(optimizer)
    cls = _RATE_SCALED.get(base)
    if cls is None:
        def build(self, variables):
            base.build(self, variables)
            self._rate_scale_list = [float(self._rate_scales.get(v.path, 1.0)) for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            scale = self._rate_scale_list[self._get_variable_index(variable)]
            if scale != 1.0:
                learning_rate = keras.ops.multiply(learning_rate, scale)
            return base.update_step(self, gradient, variable, learning_rate)

        cls = type(f"RateScaled{base.__name__}", (base,), {"build": build, "update_step": update_step})
        _RATE_SCALED[base] = cls
    if optimizer.built:
        raise ValueError("with_rate_scales needs an optimiser that has not been built yet")
    optimizer.__class__ = cls
    optimizer._rate_scales = dict(scales)
    return optimizer


def scheduled_rate(base: float, epoch: int, epochs: int, schedule: str = "constant", warmup_epochs: int = 0,
                   step_every: int = 10, step_factor: float = 0.5) -> float:
    """The learning rate of a (0-based) epoch for the epoch-level schedules.

    Warm-up ramps linearly to ``base`` over ``warmup_epochs``; "plateau" is flat
    here (its reductions depend on the monitored metric, see LearningRateController).
    """
    if epoch < warmup_epochs:
        return base * (epoch + 1) / (warmup_epochs + 1)
    after = epoch - warmup_epochs
    if schedule == "cosine":
        span = max(1, epochs - warmup_epochs)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(after, span) / span))
    if schedule == "step":
        return base * step_factor ** (after // max(1, step_every))
    if schedule in ("constant", "plateau"):
        return base
    raise ConfigError(unknown_choice("schedule", schedule, SCHEDULES))


class LearningRateController(keras.callbacks.Callback):
    """Sets the optimiser's learning rate every epoch; reduce-on-plateau keeps its counters here.

    ``get_state``/``set_state`` make a resumed run continue with the same rate.
    """

    def __init__(self, base: float, epochs: int, schedule: str = "constant", warmup_epochs: int = 0,
                 step_every: int = 10, step_factor: float = 0.5, monitor: str = "val_loss",
                 patience: int = 2, min_lr: float = 0.0, min_delta: float = 1e-4):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(unknown_choice("schedule", schedule, SCHEDULES))
        self.base, self.epochs, self.schedule = float(base), int(epochs), schedule
        self.warmup_epochs, self.step_every, self.step_factor = int(warmup_epochs), int(step_every), float(step_factor)
        self.monitor, self.patience, self.min_lr, self.min_delta = monitor, max(1, int(patience)), min_lr, min_delta
        self.plateau_lr = self.base  # the rate reduce-on-plateau has reached
        self.best = math.inf
        self.wait = 0
        self.current = self.base

    def rate(self, epoch: int) -> float:
        rate = scheduled_rate(self.base, epoch, self.epochs, self.schedule, self.warmup_epochs,
                              self.step_every, self.step_factor)
        if self.schedule == "plateau" and epoch >= self.warmup_epochs:
            rate = self.plateau_lr
        return float(rate)

    def on_epoch_begin(self, epoch, logs=None):
        self.current = self.rate(epoch)
        self.model.optimizer.learning_rate = self.current

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["learning_rate"] = self.current
        if self.schedule != "plateau" or epoch < self.warmup_epochs:
            return
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        if float(value) < self.best - self.min_delta:
            self.best, self.wait = float(value), 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.plateau_lr = max(self.min_lr, self.plateau_lr * self.step_factor)
            self.wait = 0

    def get_state(self) -> dict:
        return {"plateau_lr": self.plateau_lr, "best": self.best if math.isfinite(self.best) else None,
                "wait": self.wait, "current": self.current}

    def set_state(self, state: dict) -> None:
        self.plateau_lr = float(state.get("plateau_lr", self.base))
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.wait = int(state.get("wait", 0))
        self.current = float(state.get("current", self.base))


def make_schedule(config: Config | TrainConfig, base: float | None = None, epochs: int | None = None,
                  monitor: str = "val_loss") -> LearningRateController:
    """The configured schedule for one training phase of ``epochs`` epochs."""
    t = train_section(config)
    return LearningRateController(
        base=float(t.learning_rate if base is None else base),
        epochs=int(t.epochs if epochs is None else epochs),
        schedule=t.schedule, warmup_epochs=t.warmup_epochs, step_every=t.step_every, step_factor=t.step_factor,
        monitor=monitor, patience=max(1, t.early_stopping_patience // 2),
    )


def schedule_callbacks(config: Config | TrainConfig, has_val: bool) -> list:
    """The schedule as a callback list (the bottleneck trainer's calling convention)."""
    return [make_schedule(config, monitor="val_loss" if has_val else "loss")]
