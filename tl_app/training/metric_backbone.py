"""Phase 2 of the metric strategy: the top backbone blocks learn with the contrastive loss too.

With ``train.metric_backbone = true``, after the projection has learned on the
cached features, the model ``image -> backbone -> pool -> projection`` trains
end to end on augmented images for ``train.finetune_epochs`` epochs at
``learning_rate x finetune_lr_factor``: the top ``unfreeze_blocks`` blocks (or
``unfreeze_layers`` layers) and the projection change, everything else stays
frozen, and BatchNormalization stays frozen in inference mode, as in
fine-tuning (training.finetune's augmentation and data order are reused).
Validation images, un-augmented, in one batch, give the loss that early
stopping watches (best weights restored).

The backbone's weights change, so its features are no longer the cached ones:
the images of the training and validation splits are run again through the
trained backbone, and the head, the unknown-scorer and the retrieval figures
are fitted on those.
"""

from __future__ import annotations

import numpy as np

from tl_app.core.config import Config
from tl_app.data.augment import build_augmenter, seed_generators
from tl_app.data.pipeline import make_dataset
from tl_app.models.surgery import check_unfreeze, count_params, unfreeze_top
from tl_app.training.callbacks import EpochRecorder, interactive
from tl_app.training.finetune import steps_per_epoch, training_dataset
from tl_app.training.optim import make_optimizer


def backbone_features(feature_model, records, input_size: int, policy: str, background) -> np.ndarray:
    """The (pooled) features of ``records``, in their order, through ``feature_model`` as it is now."""
    if not records:
        return np.zeros((0, int(feature_model.output.shape[-1])), np.float32)
    out = np.zeros((len(records), int(feature_model.output.shape[-1])), np.float32)
    seen = np.zeros(len(records), bool)
    for images, index in make_dataset(records, input_size, policy, 32, with_index=True, background=background):
        rows = index.numpy()
        out[rows] = np.asarray(feature_model(images, training=False), np.float32)
        seen[rows] = True
    if not seen.all():  # the scan read them all: a file changed or vanished during training
        missing = [records[i].path for i in np.flatnonzero(~seen)[:3]]
        raise FileNotFoundError(f"{int((~seen).sum())} images could not be read again after training "
                                f"(changed or removed since the scan), e.g. {', '.join(missing)}")
    return out


def train_backbone(config: Config, prepared, feature_model, projection, train_records, val_records, loss,
                   min_batch: int, run_dir, epochs_log: list, echo=print) -> dict:
    """Phase 2 in place on ``feature_model`` and ``projection``; returns what run.json records of it."""
    import keras

    t = config.train
    say = echo or (lambda *a, **k: None)
    spec, size, policy = prepared.spec, prepared.input_size, prepared.resize_policy
    background = config.data.background
    num_classes = prepared.manifest.num_classes
    check_unfreeze(feature_model, spec, config)
    keras.utils.set_random_seed(t.seed + 1)
    unfrozen = unfreeze_top(feature_model, spec, t.unfreeze_blocks, t.unfreeze_layers)
    projection.trainable = True
    model = keras.Model(feature_model.input, projection(feature_model.output), name="metric_backbone")
    model.compile(optimizer=make_optimizer(config, t.learning_rate * t.finetune_lr_factor), loss=loss,
                  jit_compile=bool(t.jit_compile))
    augmenter = build_augmenter(config.augment, size, seed=t.seed)
    augmenter = augmenter if seed_generators(augmenter) else None
    batch_size = min(len(train_records), max(int(t.batch_size), min_batch))
    data = training_dataset(train_records, size, policy, batch_size, num_classes, np.ones(num_classes, np.float32),
                            augmenter, t.seed, 2, 0, t.finetune_epochs, background)
    data = data.map(lambda images, onehot, _weights: (images, keras.ops.argmax(onehot, axis=-1)))
    validation = None
    if len(val_records) > 1:
        validation = make_dataset(val_records, size, policy, len(val_records), num_classes=num_classes,
                                  background=background)
        validation = validation.map(lambda images, onehot: (images, keras.ops.argmax(onehot, axis=-1)))
    monitor = "val_loss" if validation is not None else "loss"
    first = len(epochs_log)
    callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, patience=max(1, t.early_stopping_patience),
                                               restore_best_weights=True),
                 EpochRecorder(run_dir, epochs_log, phase=2, epoch_offset=first, echo=say if echo and not interactive() else None,
                               epochs=t.finetune_epochs)]
    say(f"phase 2: the top of {spec.name} learns with the contrastive loss ({len(unfrozen)} layers, "
        f"{count_params(model.trainable_weights):,} trainable weights; BatchNorm frozen), "
        f"{t.finetune_epochs} epochs at learning rate {t.learning_rate * t.finetune_lr_factor:g}")
    history = model.fit(data, steps_per_epoch=steps_per_epoch(len(train_records), batch_size),
                        validation_data=validation, epochs=t.finetune_epochs, callbacks=callbacks,
                        verbose=2 if echo and interactive() else 0)
    losses = history.history.get(monitor, [])
    feature_model.trainable = False
    projection.trainable = False
    return {"epochs": t.finetune_epochs, "epochs_trained": len(history.history.get("loss", [])),
            "best_epoch": int(np.argmin(losses)) + 1 if losses else 0,
            "contrastive_loss": float(min(losses)) if losses else None, "unfrozen_layers": unfrozen,
            "batch_size": batch_size, "augmented": augmenter is not None, "batchnorm": "frozen (inference mode)"}
