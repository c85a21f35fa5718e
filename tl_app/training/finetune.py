"""The fine-tuning strategy: two phases, safe BatchNorm, class-weighted loss, resumable.

Phase 1 trains the head on the frozen backbone; phase 2 unfreezes the top
blocks (or layers) of the backbone and recompiles at a lower learning rate.
The backbone is always called with ``training=False`` and its BatchNormalization
layers stay frozen, so their statistics are the ones the weights were trained
with and ``evaluate`` agrees with what ``fit`` reported.

Augmentation runs in the tf.data training pipeline only, never inside the saved
model. All randomness (batch order, augmentation, dropout) is a function of the
seed and the epoch, or lives in variables that the per-epoch checkpoint saves,
so ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import ConfigError, DataError, ModelNotFoundError, TlAppError
from tl_app.core.files import temporary_sibling
from tl_app.models.surgery import build_classifier, check_unfreeze, count_params, find_backbone, freeze_backbone, unfreeze_top
from tl_app.training.devices import is_chief, make_strategy, precision_policy, scope
from tl_app.data.augment import mix_batch, seed_generators, build_augmenter
from tl_app.data.pipeline import load_image, make_dataset
from tl_app.training.callbacks import CheckpointStore, EarlyStopping, EmaWeights, assign_in_order, EpochRecorder, interactive, StopOnNaN, TrainingCheckpoint, TrainingDivergedError, write_history
from tl_app.training.losses import class_weight_table, make_loss, mixed_sample_weights
from tl_app.training.runs import write_run_info, fmt, prepare_run, PreparedRun, recording_failure
from tl_app.training.calibration import calibration_record, dataset_probabilities, record_text
from tl_app.training.ood import fit_ood_on_datasets, ood_text
from tl_app.training.optim import make_optimizer, make_schedule, with_rate_scales
from tl_app.models.artifacts import MODEL_FILE, read_run_info
from tl_app.core.files import write_json
from tl_app.models.backbones import get_spec, resolve_input_size
from tl_app.data.manifest import Manifest
from tl_app.data.splits import class_weights
from tl_app.models.weights import fingerprint

STATE_VERSION = 1


# ---- settings checks ------------------------------------------------------------
def check_settings(config: Config, spec) -> None:
    """Values that only fine-tuning cares about, checked before any work."""
    t = config.train
    if t.epochs < 0 or t.finetune_epochs < 0:
        raise ConfigError(f"train.epochs and train.finetune_epochs must be >= 0, got {t.epochs} and "
                          f"{t.finetune_epochs}.")
    if t.epochs + t.finetune_epochs == 0:
        raise ConfigError("Nothing to train: train.epochs (phase 1) and train.finetune_epochs (phase 2) are both 0.")
    if not t.learning_rate > 0 or not t.finetune_lr_factor > 0:
        raise ConfigError(f"train.learning_rate and train.finetune_lr_factor must be positive, got "
                          f"{t.learning_rate} and {t.finetune_lr_factor}.")
    if not 0 <= t.unfreeze_blocks <= len(spec.blocks):
        raise ConfigError(f"train.unfreeze_blocks = {t.unfreeze_blocks}: {spec.name} has {len(spec.blocks)} "
                          f"blocks ({', '.join(spec.blocks)}, top first); use 0..{len(spec.blocks)}.")
    if t.unfreeze_layers < 0:
        raise ConfigError(f"train.unfreeze_layers must be >= 0 (0: unfreeze blocks instead), got {t.unfreeze_layers}.")
    if t.warmup_epochs < 0 or t.step_every < 1:
        raise ConfigError("train.warmup_epochs must be >= 0 and train.step_every >= 1.")
    if t.early_stopping_patience < 1:
        raise ConfigError(f"train.early_stopping_patience must be >= 1, got {t.early_stopping_patience}.")


# ---- data -------------------------------------------------------------------------------
def augmenter_seed_variables(augmenter) -> list:

    return [generator.state for generator in seed_generators(augmenter)]


def training_dataset(records, input_size: int, policy: str, batch_size: int, num_classes: int,
                     weight_table: np.ndarray, augmenter, seed: int, phase: int, first_epoch: int,
                     last_epoch: int, background=(255, 255, 255), mixup: float = 0.0, cutmix: float = 0.0):
    """Batches (images, one-hot labels, class weights) for epochs [first_epoch, last_epoch), augmented.

    Use with ``steps_per_epoch = steps_per_epoch(len(records), batch_size)``:
    batches never straddle epochs. Each epoch's order and each batch's
    augmentation come from stateless random ops seeded by (seed, phase, epoch),
    so a resumed run sees exactly the images an uninterrupted one would.
    ``mixup``/``cutmix`` (Beta alphas, 0 = off) mix each augmented batch: the labels
    become soft and each sample's weight is its mixed label's class weight.
    """
    import tensorflow as tf


    n = len(records)
    steps = steps_per_epoch(n, batch_size)
    seed_vars = augmenter_seed_variables(augmenter) if augmenter is not None else []
    paths = tf.constant([r.path for r in records])
    fast = tf.constant([bool(r.fast) for r in records])
    labels = tf.constant([r.label_index for r in records], tf.int32)
    table = tf.constant(weight_table, tf.float32)
    background = tuple(int(v) for v in background)

    def load(index):
        image = load_image(tf.gather(paths, index), tf.gather(fast, index), input_size, policy, background)
        label = tf.gather(labels, index)
        return image, tf.one_hot(label, num_classes), tf.gather(table, label)

    def one_epoch(epoch):
        key = tf.cast(phase, tf.int64) * 1_000_003 + epoch
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int32),
                                                         seed=tf.stack([tf.constant(seed, tf.int64), key]))
        layer_seeds = tf.random.stateless_uniform([steps, max(len(seed_vars), 1), 2],
                                                  seed=tf.stack([tf.constant(seed + 1, tf.int64), key]),
                                                  minval=1, maxval=2**31 - 2, dtype=tf.int64)
        mix_seeds = tf.random.stateless_uniform([steps, 2], seed=tf.stack([tf.constant(seed + 2, tf.int64), key]),
                                                minval=1, maxval=2**31 - 2, dtype=tf.int64)
        batches = (tf.data.Dataset.from_tensor_slices(order)
                   .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   .batch(batch_size))
        return tf.data.Dataset.zip((batches, tf.data.Dataset.from_tensor_slices(layer_seeds),
                                    tf.data.Dataset.from_tensor_slices(mix_seeds)))

    ds = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(one_epoch)
    if seed_vars:
        def augment(batch, layer_seeds, mix_seed):
            images, onehot, weights = batch
            for i, variable in enumerate(seed_vars):
                variable.assign(tf.cast(layer_seeds[i], variable.dtype))
            return (augmenter(images, training=True), onehot, weights), mix_seed

        # sequential on purpose: the generators' state is set per batch, then used
        ds = ds.map(augment, num_parallel_calls=None)
    else:
        ds = ds.map(lambda batch, _seeds, mix_seed: (batch, mix_seed))
    if mixup > 0 or cutmix > 0:
        def mix(batch, mix_seed):
            images, soft = mix_batch(batch[0], batch[1], mix_seed, mixup=mixup, cutmix=cutmix)
            return images, soft, mixed_sample_weights(soft, table)

        ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda batch, _mix_seed: batch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def recipe_text(t) -> str:
    """The recipe options a run uses beyond the plain two phases (empty: none)."""
    parts = []
    if t.ema:
        parts.append(f"EMA of weights (momentum {t.ema_momentum:g})")
    if t.mixup > 0:
        parts.append(f"mixup {t.mixup:g}")
    if t.cutmix > 0:
        parts.append(f"CutMix {t.cutmix:g}")
    if t.lr_decay_per_block < 1.0:
        parts.append(f"phase 2 rate x{t.lr_decay_per_block:g} per deeper block")
    return ", ".join(parts)


def block_rate_scales(model, spec, decay: float) -> dict[str, float]:
    """Discriminative rates (fastai): the backbone's k-th block from the top learns at decay**k of the rate.

    Keyed by variable path; the head and layers in no registry block keep the full rate.
    """
    base = find_backbone(model, spec)
    scales = {}
    for depth, block in enumerate(spec.blocks):  # top block first
        for layer in spec.block_layers(base, block):
            for variable in layer.weights:
                scales[variable.path] = float(decay) ** depth
    return scales


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


# ---- one run --------------------------------------------------------------------------
@dataclass
class Phase:
    number: int
    epochs: int
    learning_rate: float


@dataclass
class FineTuneRun:
    """Everything one fine-tuning run holds while it trains; ``run(state)`` does the work."""

    prepared: object  # tl_app.train.PreparedRun
    echo: object = print
    extra_callbacks: list = field(default_factory=list)

    def __post_init__(self):
        self.config: Config = self.prepared.config
        self.run_dir = Path(self.prepared.run_dir)
        self.say = self.echo or (lambda *a, **k: None)
        self.history: list[dict] = []

    # -- the plan --
    def phases(self) -> list[Phase]:
        t = self.config.train
        plan = []
        if t.epochs > 0:
            plan.append(Phase(1, t.epochs, t.learning_rate))
        if t.finetune_epochs > 0 and (t.unfreeze_blocks > 0 or t.unfreeze_layers > 0):
            plan.append(Phase(2, t.finetune_epochs, t.learning_rate * t.finetune_lr_factor))
        elif t.finetune_epochs > 0:
            self.say("phase 2 skipped: train.unfreeze_blocks and train.unfreeze_layers are both 0")
        return plan

    def set_phase(self, number: int) -> list[str]:
        """Trainability of phase 1 (frozen backbone) or 2 (top unfrozen); returns the unfrozen layer names."""
        t, spec = self.config.train, self.prepared.spec
        if number == 1:
            freeze_backbone(self.model, spec)
            return []
        return unfreeze_top(self.model, spec, t.unfreeze_blocks, t.unfreeze_layers)

    def changeable(self) -> list:
        """Variables training may have changed so far: head, seed states, and what the phase unfroze.

        Everything else still holds the pretrained (or seeded) values, which
        ``--resume`` rebuilds, so checkpoints stay small.
        """
        base = find_backbone(self.model, self.prepared.spec)
        frozen = {id(v) for v in base.variables}
        trainable = {id(v) for v in self.model.trainable_variables}
        return [v for v in self.model.variables if id(v) not in frozen or id(v) in trainable]

    def changeable_weights(self) -> list:
        weights = {id(v) for v in self.model.weights}
        return [v for v in self.changeable() if id(v) in weights]

    # -- main loop --
    def run(self, state=None) -> dict:
        import keras
        import tensorflow as tf


        config, prepared = self.config, self.prepared
        t = config.train
        check_settings(config, prepared.spec)
        if t.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.strategy = make_strategy(t.distribute)
        self.chief = config.train.distribute != "multi-worker" or is_chief()  # only the chief writes the run folder
        self.store = CheckpointStore(self.run_dir, enabled=self.chief)
        manifest = prepared.manifest
        self.train_records, self.val_records = manifest.split("train"), manifest.split("val")
        if not self.train_records:
            raise DataError(f"No training images in {manifest.root}: every image is in val/test. "
                            f"Lower data.val_fraction/test_fraction or add images.")
        self.has_val = bool(self.val_records)
        self.monitor = "val_loss" if self.has_val else "loss"
        if not self.has_val:
            self.say("warning: no validation images; early stopping and the schedule watch the training loss")
        self.num_classes = manifest.num_classes
        self.weight_table = class_weight_table(prepared.class_weights, self.num_classes)
        self.batch_size = int(t.batch_size)
        self.steps = steps_per_epoch(len(self.train_records), self.batch_size)
        self.policy = precision_policy(t.mixed_precision)

        keras.utils.set_random_seed(t.seed)
        augmenter = build_augmenter(config.augment, prepared.input_size, seed=t.seed)
        self.augmenter = augmenter if seed_generators(augmenter) else None  # None: nothing random configured
        recipe = recipe_text(t)
        if recipe:
            self.say(f"recipe: {recipe}")
        with scope(self.strategy):
            self.model = build_classifier(config, prepared.spec, prepared.input_size, self.num_classes,
                                          policy=self.policy)
        check_unfreeze(self.model, prepared.spec, config)
        self.val_ds = (make_dataset(self.val_records, prepared.input_size, prepared.resize_policy, self.batch_size,
                                    num_classes=self.num_classes, background=config.data.background)
                       if self.has_val else None)
        self.early = EarlyStopping(self.monitor, t.early_stopping_patience, tracked=self.changeable_weights)

        meta = None
        if state is not None:  # (meta, model arrays, optimizer arrays) of the latest completed epoch
            meta = state[0]
            self.history = list(meta["history"])
            best_file = meta["early_stopping"].get("best_file")
            with scope(self.strategy):
                self.set_phase(meta["phase"])
                best = None
                if best_file:
                    best_state = state if best_file == self.store.latest() else self.store.load(best_file)
                    weights = {v.path for v in self.model.weights}
                    best = {path: value for path, value in best_state[1] if path in weights}
                self.early.set_state(meta["early_stopping"], best)
                # weights the best epoch's file leaves out were never trained then: their values now
                self.early.extend_best(self.changeable_weights())
                assign_in_order(self.changeable(), state[1])
            self.say(resume_line(self.run_dir, meta, self.phases()))
        if self.chief:
            write_run_info(self.run_dir, status="training")

        for phase in self.phases():
            if meta and phase.number < meta["phase"]:
                continue
            resume = meta if meta and phase.number == meta["phase"] else None
            self.train_phase(phase, resume, state[2] if resume else None)
            meta = None
        return self.finish()

    def compile(self, learning_rate: float, phase: int = 1):
        import keras


        t = self.config.train
        optimizer = make_optimizer(t, learning_rate, ema=bool(t.ema))
        if phase == 2 and t.lr_decay_per_block < 1.0:
            optimizer = with_rate_scales(optimizer, block_rate_scales(self.model, self.prepared.spec,
                                                                      t.lr_decay_per_block))
        if t.mixed_precision == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        self.model.compile(optimizer=optimizer, loss=make_loss(t), metrics=["accuracy"],
                           jit_compile=bool(t.jit_compile))
        if t.jit_compile and not self.model.jit_compile:
            self.say("note: XLA (--jit-compile) is off: TensorFlow disables it with deterministic ops")

    def train_phase(self, phase: Phase, resume: dict | None, optimizer_arrays) -> None:
        import tensorflow as tf


        config, spec = self.config, self.prepared.spec
        t = config.train
        with scope(self.strategy):
            names = self.set_phase(phase.number)
            if phase.number == 1:
                what = f"head on the frozen {spec.name}"
            else:
                unfrozen = (f"top {t.unfreeze_layers} layers" if t.unfreeze_layers > 0
                            else ", ".join(spec.blocks[:t.unfreeze_blocks]))
                what = f"{unfrozen} of {spec.name} unfrozen ({len(names)} layers; BatchNormalization frozen)"
                if t.lr_decay_per_block < 1.0:
                    what += f"; each deeper block learns {t.lr_decay_per_block:g}x slower"
                # best weights from phase 1 still hold these layers' values of that epoch: record them
                self.early.extend_best(self.changeable_weights())
            self.compile(phase.learning_rate, phase.number)
        trainable = count_params(self.model.trainable_weights)
        done = int(resume["epoch"]) if resume else 0
        offset = sum(1 for e in self.history if e["phase"] < phase.number)
        self.say(f"phase {phase.number}: {what}; {trainable:,} trainable parameters, "
                 f"learning rate {phase.learning_rate:g}, {phase.epochs} epoch(s)")

        schedule = make_schedule(t, base=phase.learning_rate, epochs=phase.epochs, monitor=self.monitor)
        self.nan_guard = StopOnNaN()
        self.early.nan_guard = self.nan_guard
        if resume:
            schedule.set_state(resume["schedule"])
            with scope(self.strategy):
                self.model.optimizer.build(self.model.trainable_variables)
                variables = self.model.optimizer.variables
                if len(variables) != len(optimizer_arrays):
                    raise TlAppError("The checkpoint's optimiser state does not match this configuration. "
                                     "Start a new run instead of --resume.")
                for variable, value in zip(variables, optimizer_arrays):
                    variable.assign(value)
            self.early.epoch_offset = offset
        else:
            self.early.start_phase(offset)
        complete = resume is not None and (resume.get("phase_complete") or done >= phase.epochs)

        if not complete:
            plain = self.echo is not None and not interactive()
            recorder = EpochRecorder(self.run_dir, self.history, phase.number, offset, self.nan_guard,
                                     write=self.chief, echo=self.say if plain else None, epochs=phase.epochs,
                                     label=f"phase {phase.number} ")

            def describe(epoch: int, stopping: bool) -> dict:
                return self.describe(phase, epoch, offset + epoch, stopping or epoch >= phase.epochs, schedule)

            checkpoint = TrainingCheckpoint(self.store, describe, self.changeable, self.nan_guard)
            # train.ema: validation, early stopping and the checkpoint see the averaged weights,
            # training goes on from the raw ones (so a resumed EMA run restarts from the averages)
            ema = [EmaWeights()] if t.ema else []
            callbacks = [schedule, self.nan_guard, *ema, self.early, recorder, checkpoint,
                         *(e.restorer() for e in ema), *self.extra_callbacks]
            data = training_dataset(self.train_records, self.prepared.input_size, self.prepared.resize_policy,
                                    self.batch_size, self.num_classes, self.weight_table, self.augmenter,
                                    t.seed, phase.number, done, phase.epochs, config.data.background,
                                    mixup=float(t.mixup), cutmix=float(t.cutmix))
            try:
                with warnings.catch_warnings():
                    # the validation set's length is unknown until it has been read once
                    warnings.filterwarnings("ignore", message=".*ran out of data.*")
                    self.model.fit(data, epochs=phase.epochs, initial_epoch=done, steps_per_epoch=self.steps,
                                   validation_data=self.val_ds, callbacks=callbacks, shuffle=False,
                                   verbose=1 if self.echo and not plain else 0)
            except tf.errors.InvalidArgumentError as exc:
                if "decode" not in str(exc).lower() and "image" not in str(exc).lower():
                    raise
                raise DataError(f"An image could not be decoded during training ({exc.message.splitlines()[0]}). "
                                f"Did files change since the scan? Check with 'tl-app datasets inspect "
                                f"{self.prepared.manifest.root}' and start a new run; --resume continues "
                                f"from the last completed epoch.") from None
            finally:
                self.store.flush()
            if self.nan_guard.bad is not None:
                bad = self.nan_guard.bad
                kept = (f"keeps the checkpoint of the last good epoch ({len(self.history)} done)" if self.history
                        else "has no checkpoint: no epoch completed")
                if self.chief:
                    write_run_info(self.run_dir, status="diverged")
                raise TrainingDivergedError(
                    f"Training stopped: the loss became {bad['loss']} in phase {phase.number}, epoch "
                    f"{bad['epoch'] + 1}, batch {bad['batch'] + 1}. The run directory {self.run_dir} {kept}. "
                    f"Lower the learning rate "
                    f"(train.learning_rate = {t.learning_rate:g} now, e.g. --lr {t.learning_rate / 10:g})"
                    + (", or use --mixed-precision bfloat16/none instead of float16" if t.mixed_precision == "float16"
                       else "")
                    + ", and check the images and class weights."
                )
        if self.early.restore(self.model):
            self.say(f"phase {phase.number} done: restored the weights of epoch {self.early.best_epoch}, "
                     f"the best {self.monitor} so far ({self.early.best:.4f})")

    def describe(self, phase: Phase, epoch: int, global_epoch: int, complete: bool, schedule) -> dict:
        """The JSON half of the per-epoch checkpoint."""
        es = self.early.get_state()
        es["best_file"] = CheckpointStore.name(self.early.best_epoch) if self.early.best_epoch else None
        return {"version": STATE_VERSION, "phase": phase.number, "epoch": epoch, "global_epoch": global_epoch,
                "phase_complete": complete, "history": list(self.history), "early_stopping": es,
                "schedule": schedule.get_state(), "seed": self.config.train.seed}

    # -- the end --
    def finish(self) -> dict:
        """model.keras, metrics and run.json. The temperature is fitted on validation (``fitted_on: "val"``)
        whatever its size: out-of-fold probabilities, as the bottleneck route uses for a small validation
        split, would need a backbone fine-tuned per fold."""
        self.store.flush()
        # a fresh float32 copy: no optimiser state in the file, float32 whatever precision trained it
        model = build_classifier(self.config, self.prepared.spec, self.prepared.input_size, self.num_classes,
                                 weights="none")
        model.set_weights(self.model.get_weights())
        saved = model
        path = self.run_dir / MODEL_FILE
        if self.chief:
            tmp = temporary_sibling(path)  # ends in .keras, as Keras requires
            model.save(tmp)
            os.replace(tmp, path)
        if self.policy != "float32":
            model.compile(loss=make_loss(self.config.train), metrics=["accuracy"])
        else:  # the same weights, and its evaluation step is already compiled
            model = self.model
        calibration = calibration_record(self.config.train.calibration,
                                         *dataset_probabilities(saved, self.val_ds, self.num_classes))
        metrics = self.final_metrics(model)
        if not self.chief:
            return {"run_dir": str(self.run_dir), "strategy": "finetune", "metrics": metrics}
        write_json(self.run_dir / "metrics.json", metrics)
        write_history(self.run_dir, self.history)
        t = self.config.train
        write_run_info(self.run_dir, status="finished", metrics=metrics, calibration=calibration,
                       head={"kind": self.config.head.kind, "units": list(self.config.head.units)},
                       finetune={"epochs": t.epochs, "finetune_epochs": t.finetune_epochs,
                                 "unfreeze_blocks": t.unfreeze_blocks, "unfreeze_layers": t.unfreeze_layers,
                                 "learning_rate": t.learning_rate, "finetune_lr_factor": t.finetune_lr_factor,
                                 "optimizer": t.optimizer, "schedule": t.schedule,
                                 "mixed_precision": t.mixed_precision, "distribute": t.distribute,
                                 "seed": t.seed, "ema": t.ema, "mixup": t.mixup, "cutmix": t.cutmix,
                                 "lr_decay_per_block": t.lr_decay_per_block})
        self.say(f"fine-tuned: val_accuracy {fmt(metrics['val_accuracy'])}, val_loss {fmt(metrics['val_loss'])} "
                 f"(best epoch {metrics['best_epoch']} of {metrics['epochs_trained']})")
        self.say(record_text(calibration))
        self.say(ood_text(fit_ood_on_datasets(t.ood, saved, self.plain_train_dataset, self.val_ds, self.run_dir)))
        self.say(f"model: {path}")
        return {"run_dir": str(self.run_dir), "strategy": "finetune", "metrics": metrics, "calibration": calibration,
                "model": str(path)}

    def plain_train_dataset(self):
        """The training images as validation sees them (no augmentation, no shuffle): for the OOD scorer."""
        return make_dataset(self.train_records, self.prepared.input_size, self.prepared.resize_policy,
                            self.batch_size, num_classes=self.num_classes, background=self.config.data.background)

    def final_metrics(self, model) -> dict:
        """Validation metrics of the saved (best) weights, measured again with ``evaluate``."""
        best = self.early.best_epoch or (self.history[-1]["epoch"] if self.history else 0)
        row = next((e for e in self.history if e["epoch"] == best), {})
        out = {"val_loss": None, "val_accuracy": None, "best_epoch": best, "best_phase": row.get("phase"),
               "epochs_trained": len(self.history),
               "phase_epochs": {str(p): sum(1 for e in self.history if e["phase"] == p) for p in (1, 2)},
               "train_loss": row.get("loss"), "train_accuracy": row.get("accuracy"),
               "reported_val_loss": row.get("val_loss"), "reported_val_accuracy": row.get("val_accuracy"),
               "train_images": len(self.train_records), "val_images": len(self.val_records),
               "monitor": self.monitor}
        if self.has_val:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ran out of data.*")
                loss, accuracy = model.evaluate(self.val_ds, verbose=0)
            out["val_loss"], out["val_accuracy"] = float(loss), float(accuracy)
        return out


# ---- entry points --------------------------------------------------------------------------
def train_finetune(config: Config, echo=print, callbacks: list | None = None) -> dict:
    """prepare_run -> phase 1 (head) -> phase 2 (top blocks) -> model.keras; returns a summary.

    ``callbacks`` are extra Keras callbacks for notebook users (run after tl-app's own).
    """
    check_settings(config, get_spec(config.backbone.name))
    if config.train.distribute == "multi-worker":
        make_strategy("multi-worker")  # must exist before TensorFlow does anything else
    prepared = prepare_run(config, echo=echo)
    if echo:
        echo(f"run directory: {prepared.run_dir}")
    with recording_failure(prepared.run_dir, enabled=config.train.distribute != "multi-worker" or is_chief()):
        return FineTuneRun(prepared, echo, list(callbacks or [])).run(None)


def load_prepared(run_dir: str | Path):
    """The PreparedRun of an existing run directory, from its own files (no rescan)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelNotFoundError(f"--resume {run_dir}: no such folder. Pass the run directory 'tl-app train' "
                                 f"printed (runs/<name>).")
    info = read_run_info(run_dir)
    if info.get("strategy") != "finetune":
        raise ConfigError(f"{run_dir} is a {info.get('strategy')!r} run; --resume continues fine-tuning runs only. "
                          f"Train it again instead.")
    for name in ("config.json", "manifest.json"):
        if not (run_dir / name).is_file():
            raise ModelNotFoundError(f"{run_dir / name} is missing: the run stopped before it started training. "
                                     f"Start a new run.")
    config = Config.from_dict(json.loads((run_dir / "config.json").read_text()), source=str(run_dir / "config.json"))
    manifest = Manifest.load(run_dir / "manifest.json")
    missing = [r.path for r in manifest.records if r.split in ("train", "val") and not os.path.exists(r.path)]
    if missing:
        raise DataError(f"{len(missing)} image(s) of this run are gone (first: {missing[0]}). --resume needs the "
                        f"same data; restore it or start a new run.")
    spec = get_spec(config.backbone.name)
    size = resolve_input_size(spec, config.backbone.input_size)
    weights = class_weights(manifest, config.data.class_weights)
    policy = info.get("resize_policy") or config.data.resize_policy
    return PreparedRun(config, run_dir, manifest, spec, size, policy, weights, info.get("weights_fingerprint", ""))


def resume_line(run_dir: Path, meta: dict, phases: list[Phase]) -> str:
    """``resuming phase 2 at epoch 3 of 4 (runs/x, 5 epochs done in all)``."""
    lengths = {p.number: p.epochs for p in phases}
    number, done = int(meta["phase"]), int(meta["epoch"])
    done_in_all = len(meta.get("history", []))
    if meta.get("phase_complete") or done >= lengths.get(number, 0):
        later = [p for p in phases if p.number > number]
        where = (f"phase {number} is done; starting phase {later[0].number} at epoch 1 of {later[0].epochs}"
                 if later else f"phase {number} is done")
    else:
        where = f"phase {number} at epoch {done + 1} of {lengths[number]}"
    return f"resuming {where} ({run_dir}, {done_in_all} epoch(s) done in all)"


def extend_epochs(prepared: PreparedRun, info: dict, state, epochs: int | None, finetune_epochs: int | None) -> bool:
    """Raise a run's epoch counts for --resume (only raise, and only phases not yet over).

    The new counts go into config.json and the change into run.json's ``continuations``;
    the checkpoint's phase is reopened so training goes on from its last epoch.
    Returns whether anything changed.
    """
    t = prepared.config.train
    wanted = {"epochs": t.epochs if epochs is None else int(epochs),
              "finetune_epochs": t.finetune_epochs if finetune_epochs is None else int(finetune_epochs)}
    old = {"epochs": t.epochs, "finetune_epochs": t.finetune_epochs}
    lower = [f"--{k.replace('_', '-')} {wanted[k]} (it has {old[k]})" for k in old if wanted[k] < old[k]]
    if lower:
        raise ConfigError(f"--resume can only raise a run's epoch counts, not lower them: {', '.join(lower)}. "
                          f"Start a new run for fewer epochs.")
    if wanted == old:
        return False
    meta = state[0] if state is not None else None
    reached = int(meta["phase"]) if meta else 1
    if wanted["epochs"] > old["epochs"] and reached > 1:
        raise ConfigError(f"{prepared.run_dir} is already in phase 2, so phase 1 cannot get more epochs "
                          f"(--epochs). Raise --finetune-epochs (now {old['finetune_epochs']}) instead.")
    if wanted["finetune_epochs"] > old["finetune_epochs"] and t.unfreeze_blocks == 0 and t.unfreeze_layers == 0:
        raise ConfigError(f"{prepared.run_dir} unfreezes nothing (train.unfreeze_blocks and unfreeze_layers are 0), "
                          f"so it has no phase 2 to extend; raise --epochs instead.")
    t.epochs, t.finetune_epochs = wanted["epochs"], wanted["finetune_epochs"]
    prepared.config.write(prepared.run_dir)
    if meta is not None:
        phase_epochs = t.epochs if reached == 1 else t.finetune_epochs
        if int(meta["epoch"]) < phase_epochs:
            meta["phase_complete"] = False  # reopened: it goes on from its last epoch
            meta["early_stopping"]["wait"] = 0  # asked for more epochs: patience starts again
    history = list(info.get("continuations", []))
    history.append({"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "after_epochs": len(meta.get("history", [])) if meta else 0,
                    "previous_status": info.get("status"), "from": old, "to": wanted})
    write_run_info(prepared.run_dir, continuations=history)
    return True


def resume_finetune(run_dir: str | Path, echo=print, callbacks: list | None = None, epochs: int | None = None,
                    finetune_epochs: int | None = None) -> dict:
    """Continue a killed run from its last completed epoch (same phase, optimiser state, learning rate).

    ``epochs`` / ``finetune_epochs`` raise the run's epoch counts (a finished run too): training
    continues from the last checkpoint, recorded in run.json's ``continuations``.
    """
    prepared = load_prepared(run_dir)
    info = read_run_info(prepared.run_dir)
    say = echo or (lambda *a, **k: None)
    state = CheckpointStore(prepared.run_dir).load()
    if state is not None and state[0].get("version") != STATE_VERSION:
        raise TlAppError(f"{prepared.run_dir} has a checkpoint from another tl-app version; start a new run.")
    finished = info.get("status") == "finished" and (prepared.run_dir / MODEL_FILE).is_file()
    b = prepared.config.backbone
    current = fingerprint(prepared.spec, b.weights, b.seed, memo_dir=prepared.config.features.cache_dir)
    if prepared.weights_fingerprint and current != prepared.weights_fingerprint:
        raise TlAppError(f"The pretrained weights {b.weights!r} changed since {prepared.run_dir} started: "
                         f"resuming would mix two backbones. Start a new run.")
    if (epochs is not None or finetune_epochs is not None) and finished and state is None:
        raise TlAppError(f"{prepared.run_dir} kept no checkpoint to continue from; start a new run.")
    extended = extend_epochs(prepared, info, state, epochs, finetune_epochs)
    if finished and not extended:
        t = prepared.config.train
        say(f"{prepared.run_dir} already finished training; nothing to resume. To train it longer, raise its "
            f"epochs: --finetune-epochs N (more than {t.finetune_epochs})"
            + (f" or --epochs N (more than {t.epochs})" if state is None or state[0]["phase"] == 1 else "") + ".")
        return {"run_dir": str(prepared.run_dir), "strategy": "finetune", "metrics": info.get("metrics", {}),
                "model": str(prepared.run_dir / MODEL_FILE), "resumed": False}
    if state is None:
        say(f"{prepared.run_dir}: no completed epoch yet; starting its training from the beginning")
    if prepared.config.train.distribute == "multi-worker":
        make_strategy("multi-worker")
    if echo:
        echo(f"run directory: {prepared.run_dir}")
    with recording_failure(prepared.run_dir, enabled=prepared.config.train.distribute != "multi-worker" or is_chief()):
        summary = FineTuneRun(prepared, echo, list(callbacks or [])).run(state)
    summary["resumed"] = True
    return summary
