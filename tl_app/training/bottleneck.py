"""The bottleneck strategy: a head trained on cached features, then assembled.

The backbone runs once per image (and per cached augmented view), never per
epoch: the head trains on the feature cache in seconds. The saved model is the
same ``image -> preprocess -> backbone -> pool -> head`` model fine-tuning
writes, so its predictions on images equal the head's on the cached features.
"""

from __future__ import annotations

import math

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import DataError
from tl_app.training.losses import class_weight_table, make_loss
from tl_app.training.callbacks import EpochRecorder, interactive
from tl_app.features.extract import extract_features
from tl_app.models.surgery import assemble
from tl_app.models.heads import build_head, fold_standardization
from tl_app.training.optim import make_optimizer, schedule_callbacks
from tl_app.models.artifacts import MODEL_FILE
from tl_app.training.runs import fmt, write_run_info, prepare_run, recording_failure
from tl_app.core.files import write_json
from tl_app.models.backbones import build_feature_model
from tl_app.core.config import FEWSHOT_HEADS
from tl_app.training.fewshot import train_fewshot_head
from tl_app.training.calibration import calibration_record, out_of_fold_probabilities, record_text, uses_out_of_fold
from tl_app.training.ood import fit_ood, ood_text


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def view_batches(features, views, labels, num_classes: int, class_weights: dict[int, float],
                 batch_size: int, seed: int):
    """A Keras PyDataset that, each epoch, takes every training image once as a random one of its views."""
    import keras


    class ViewSampler(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.weights = class_weight_table(class_weights, num_classes)
            self.on_epoch_end()

        def __len__(self):
            return math.ceil(len(features) / batch_size)

        def on_epoch_end(self):
            rng = np.random.default_rng([seed, self.epoch])
            self.order = rng.permutation(len(features))
            # 0: the image itself, 1..K: its cached augmented views
            self.choice = rng.integers(0, views.shape[1] + 1, len(features))
            self.epoch += 1

        def __getitem__(self, index):
            rows = self.order[index * batch_size:(index + 1) * batch_size]
            picks = self.choice[rows]
            x = features[rows]  # a copy (fancy indexing); augmented picks overwrite their rows
            augmented = picks > 0
            x[augmented] = views[rows[augmented], picks[augmented] - 1]
            y = labels[rows]
            return x, one_hot(y, num_classes), self.weights[y]

    return ViewSampler()


# ---- the strategy ------------------------------------------------------------
def train_bottleneck(config: Config, echo=print) -> dict:
    """prepare_run -> cached features -> head with early stopping -> assembled model.keras."""
    prepared = prepare_run(config, echo=echo)
    with recording_failure(prepared.run_dir):
        if config.head.kind in FEWSHOT_HEADS:  # k-NN / prototype: fitted on the features, no epochs
            return train_fewshot_head(config, prepared, echo)
        return train_head(config, prepared, echo)


def train_head(config: Config, prepared, echo=print) -> dict:
    """The head on the prepared run's cached features, then the assembled model.keras."""
    import keras
    import tensorflow as tf

    say = echo or (lambda *a, **k: None)
    run_dir = prepared.run_dir
    write_run_info(run_dir, status="training")
    feature_set = extract_features(config, manifest=prepared.manifest, echo=echo)
    labels = feature_set.labels
    train_rows, val_rows = feature_set.rows("train"), feature_set.rows("val")
    if len(train_rows) == 0:
        raise DataError(f"No training images in {config.data.root}: every image is in val/test. "
                        f"Lower data.val_fraction/test_fraction or add images to train/.")
    num_classes = len(feature_set.classes)
    features = np.asarray(feature_set.features, np.float32)
    x_train, y_train = features[train_rows], one_hot(labels[train_rows], num_classes)
    has_val = len(val_rows) > 0
    validation = (features[val_rows], one_hot(labels[val_rows], num_classes)) if has_val else None

    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.train.seed)
    monitor = "val_loss" if has_val else "loss"
    epochs: list[dict] = []
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=monitor, patience=max(1, config.train.early_stopping_patience),
                                      restore_best_weights=True),
        # history.json, log.csv, TensorBoard as fine-tuning writes them; a plain line per epoch in logs and pipes
        EpochRecorder(run_dir, epochs, phase=1, echo=say if echo and not interactive() else None,
                      epochs=config.train.epochs),
        *schedule_callbacks(config, has_val),
    ]
    views = views_of(feature_set, train_rows)
    head, history = fit_head(config, x_train, labels[train_rows], num_classes, prepared.class_weights, views,
                             config.train.epochs, validation, callbacks,
                             verbose=2 if echo and interactive() else 0)

    metrics = final_metrics(head, x_train, y_train, validation, history)
    write_json(run_dir / "metrics.json", metrics)
    head = fold_standardization(head, config.head)  # plain Dense weights for the model and every export

    feature_model = feature_set.feature_model
    if feature_model is None:
        b = config.backbone
        feature_model = build_feature_model(prepared.spec, prepared.input_size, b.weights, b.seed, b.layer,
                                            b.pooling)
    model = assemble(feature_model, head)
    model.save(run_dir / MODEL_FILE)
    # the head's probabilities on the cached features are the assembled model's on the images
    val_probs = head.predict(validation[0], verbose=0, batch_size=256) if has_val else np.zeros((0, num_classes))
    out_of_fold = None
    if uses_out_of_fold(config.train.calibration, len(val_rows), config.train.calibration_oof_below):
        out_of_fold = out_of_fold_head_probabilities(config, feature_set, np.concatenate([train_rows, val_rows]),
                                                     num_classes, prepared.class_weights,
                                                     max(1, metrics["best_epoch"]))
    calibration = calibration_record(config.train.calibration, val_probs, labels[val_rows], out_of_fold)
    write_run_info(run_dir, status="finished", metrics=metrics, head={"kind": config.head.kind, "units": list(config.head.units)},
                   calibration=calibration,
                   features={k: feature_set.stats.get(k) for k in
                             ("used", "computed", "cached", "views_per_image", "dim")})
    say(f"head: val_accuracy {fmt(metrics['val_accuracy'])}, val_loss {fmt(metrics['val_loss'])} "
        f"(best epoch {metrics['best_epoch']} of {metrics['epochs_trained']})")
    say(record_text(calibration))
    say(ood_text(fit_ood(config.train.ood, x_train, labels[train_rows], features[val_rows], run_dir)))
    say(f"model: {run_dir / MODEL_FILE}")
    return {"run_dir": str(run_dir), "strategy": "bottleneck", "metrics": metrics, "calibration": calibration,
            "features": dict(feature_set.stats), "model": str(run_dir / MODEL_FILE)}


def views_of(feature_set, rows) -> np.ndarray | None:
    """The cached augmented views of ``rows`` [n, K, dim]; a row without views (validation) repeats its own
    features, so the sampler always draws it plain. None when the cache holds no views."""
    if feature_set.views is None or feature_set.views.shape[1] == 0:
        return None
    view_rows = feature_set.view_rows[rows]
    if np.all(view_rows >= 0):
        return np.asarray(feature_set.views, np.float32)[view_rows]
    out = np.repeat(np.asarray(feature_set.features, np.float32)[rows][:, None, :], feature_set.views.shape[1], 1)
    has = view_rows >= 0
    out[has] = np.asarray(feature_set.views, np.float32)[view_rows[has]]
    return out


def fit_head(config: Config, x, y, num_classes: int, class_weights: dict, views, epochs: int,
             validation=None, callbacks=(), verbose: int = 0):
    """A fresh head of ``config.head`` compiled and fitted on features ``x`` (labels ``y``), with their cached
    views when given: the one recipe for the deployed head and the out-of-fold heads. (head, history)."""
    # standardised on the fitted rows' plain features only: held-out rows must not leak into the model
    head = build_head(num_classes, x.shape[1], config.head, standardize_on=x)
    head.compile(optimizer=make_optimizer(config), loss=make_loss(config), metrics=["accuracy"],
                 jit_compile=bool(config.train.jit_compile))
    batch_size = int(config.train.batch_size)
    if views is not None:
        data = view_batches(x, views, y, num_classes, class_weights, batch_size, config.train.seed)
        history = head.fit(data, validation_data=validation, epochs=epochs, callbacks=list(callbacks),
                           verbose=verbose)
    else:
        history = head.fit(x, one_hot(y, num_classes), batch_size=batch_size, epochs=epochs,
                           validation_data=validation, class_weight=class_weights, shuffle=True,
                           callbacks=list(callbacks), verbose=verbose)
    return head, history


def out_of_fold_head_probabilities(config: Config, feature_set, rows, num_classes: int, class_weights: dict,
                                   epochs: int) -> dict:
    """Probabilities of ``rows`` (train+val), each from a head trained without its fold.

    Each fold's head is trained as the deployed one (same head, loss, optimiser, schedule, class weights,
    views) for the deployed head's best epoch count: there is no validation split left to stop on.
    """
    import keras

    features = np.asarray(feature_set.features, np.float32)[rows]
    labels = np.asarray(feature_set.labels)[rows]
    views = views_of(feature_set, rows)

    def fit_predict(fit_rows, held_rows):
        keras.utils.set_random_seed(config.train.seed)
        head, _ = fit_head(config, features[fit_rows], labels[fit_rows], num_classes, class_weights,
                           None if views is None else views[fit_rows], epochs,
                           callbacks=schedule_callbacks(config, False))
        return head.predict(features[held_rows], verbose=0, batch_size=256)

    return out_of_fold_probabilities(fit_predict, labels, num_classes, seed=config.train.seed)


def final_metrics(head, x_train, y_train, validation, history) -> dict:
    """Metrics of the restored (best) head, unweighted, on train and validation features."""
    train_loss, train_acc = head.evaluate(x_train, y_train, verbose=0)
    out = {"train_loss": float(train_loss), "train_accuracy": float(train_acc), "val_loss": None,
           "val_accuracy": None, "train_images": int(len(x_train)),
           "val_images": int(len(validation[0])) if validation else 0,
           "epochs_trained": len(history.history.get("loss", []))}
    key = "val_loss" if validation else "loss"
    losses = history.history.get(key, [])
    out["best_epoch"] = int(np.argmin(losses)) + 1 if losses else 0
    if validation:
        val_loss, val_acc = head.evaluate(*validation, verbose=0)
        out["val_loss"], out["val_accuracy"] = float(val_loss), float(val_acc)
    return out


