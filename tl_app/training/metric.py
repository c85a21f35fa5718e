"""The metric strategy: a projection head trained with a supervised contrastive loss on cached features.

Similarity learning. Phase 1: the backbone stays frozen and runs once per
image (and per cached augmented view), exactly as for the bottleneck route;
a projection (Dense 256 -> ReLU -> Dense 128 -> unit length) learns an
embedding where images of a class gather, by the supervised contrastive loss
of Khosla et al. 2020 (temperature 0.1). With train.metric_backbone = true a second
phase also trains the top backbone blocks with the loss (training.metric_backbone). The projection is also saved
as numpy arrays (projection.npz) so that ``tl-app index``/``embed`` pointed at
the run work in its embedding space (models.embedding_space).

No maintained Keras 3 implementation exists (tensorflow-addons' triplet loss
and tensorflow-similarity are Keras 2 only and unmaintained), so the loss is
written here in keras.ops.

The saved model is ``image -> backbone -> pool -> head`` where ``head`` is the
projection followed by a prototype head (or a k-NN head with head.kind = knn)
fitted on the training embeddings with no gradient step, so predict, export,
the server and the parity gate treat it as any other run. run.json records
the retrieval quality (training.retrieval) of the plain features and of the
embeddings.
"""

from __future__ import annotations

import math

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import ConfigError, DataError
from tl_app.core.files import write_json
from tl_app.features.extract import extract_features
from tl_app.models.artifacts import MODEL_FILE
from tl_app.models.backbones import build_feature_model
from tl_app.models.embedding_space import BACKBONE_FILE, PROJECTION_FILE, Projection
from tl_app.models.fewshot_heads import knn_head, prototype_head
from tl_app.models.projection import attach_head, build_projection, fold_input_standardization
from tl_app.models.surgery import assemble, find_backbone
from tl_app.training.bottleneck import views_of
from tl_app.training.callbacks import EpochRecorder, interactive
from tl_app.training.fewshot import head_metrics
from tl_app.training.metric_backbone import backbone_features, train_backbone
from tl_app.training.ood import fit_ood, ood_text
from tl_app.training.optim import make_optimizer
from tl_app.training.retrieval import retrieval_metrics, retrieval_text
from tl_app.training.runs import fmt, prepare_run, recording_failure, write_run_info

TEMPERATURE = 0.1  # SupCon's temperature (Khosla et al. use 0.1 for their main results)
MIN_BATCH = 128  # contrastive batches need same-class partners: at least this many images per batch


def supervised_contrastive_loss(labels, embeddings, temperature: float = TEMPERATURE):
    """SupCon (Khosla et al. 2020, L_out): for each anchor, -mean over its positives of
    log softmax(similarity / T) over all other images of the batch; anchors without a positive are skipped.
    ``embeddings`` must be unit length."""
    from keras import ops

    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    z = ops.cast(embeddings, "float32")
    logits = ops.matmul(z, ops.transpose(z)) / temperature
    n = ops.shape(z)[0]
    self_mask = ops.eye(n, dtype="float32")
    logits = logits - 1e9 * self_mask  # an anchor is never its own candidate
    log_prob = logits - ops.logsumexp(logits, axis=1, keepdims=True)
    positives = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32") * (1.0 - self_mask)
    counts = ops.sum(positives, axis=1)
    per_anchor = -ops.sum(positives * log_prob, axis=1) / ops.maximum(counts, 1.0)
    has = ops.cast(counts > 0, "float32")
    return ops.sum(per_anchor * has) / ops.maximum(ops.sum(has), 1.0)


def contrastive_batches(features, views, labels, batch_size: int, seed: int):
    """Each epoch, every training image once as a random one of its cached views (0: itself), in shuffled
    batches of ``batch_size``; (x, labels) pairs for model.fit."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.on_epoch_end()

        def __len__(self):
            return math.ceil(len(features) / batch_size)

        def on_epoch_end(self):
            rng = np.random.default_rng([seed, self.epoch])
            self.order = rng.permutation(len(features))
            self.choice = rng.integers(0, 1 + (0 if views is None else views.shape[1]), len(features))
            self.epoch += 1

        def __getitem__(self, index):
            rows = self.order[index * batch_size:(index + 1) * batch_size]
            x = features[rows]
            picks = self.choice[rows]
            augmented = picks > 0
            if views is not None and augmented.any():
                x[augmented] = views[rows[augmented], picks[augmented] - 1]
            return x, labels[rows].astype(np.int32)

    return Batches()


def prototype_accuracy(train, train_labels, query, query_labels, num_classes: int) -> float | None:
    """Accuracy of the nearest class mean (centred on the training mean, cosine) on ``query``; numpy."""
    if len(query) == 0:
        return None
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    center = train.mean(0)
    z = unit(train - center)
    means = unit(np.stack([z[train_labels == c].mean(0) for c in range(num_classes)]))
    return float(np.mean((unit(query - center) @ means.T).argmax(1) == query_labels))


def accuracy_logger(x_train, y_train, x_val, y_val, num_classes: int):
    """A callback adding the prototype accuracy of the current embeddings to each epoch's logs (accuracy,
    val_accuracy), so history.json, the curves and the over/under-fitting diagnosis read them as for other runs.
    It must come before the callbacks that read the logs."""
    import keras

    class PrototypeAccuracy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            e_train = embed(self.model, x_train)
            logs["accuracy"] = prototype_accuracy(e_train, y_train, e_train, y_train, num_classes)
            if len(x_val):
                logs["val_accuracy"] = prototype_accuracy(e_train, y_train, embed(self.model, x_val), y_val,
                                                          num_classes)

    return PrototypeAccuracy()


def embed(projection, features: np.ndarray) -> np.ndarray:
    if len(features) == 0:
        return np.zeros((0, int(projection.output.shape[-1])), np.float32)
    return np.asarray(projection.predict(np.asarray(features, np.float32), verbose=0, batch_size=256))


def train_metric(config: Config, echo=print) -> dict:
    """prepare_run -> cached features -> projection trained by SupCon -> prototype/k-NN head -> model.keras."""
    prepared = prepare_run(config, echo=echo)
    with recording_failure(prepared.run_dir):
        return train_projection(config, prepared, echo)


def train_projection(config: Config, prepared, echo=print) -> dict:
    import keras
    import tensorflow as tf

    say = echo or (lambda *a, **k: None)
    run_dir = prepared.run_dir
    write_run_info(run_dir, status="training")
    feature_set = extract_features(config, manifest=prepared.manifest, echo=echo)
    labels = np.asarray(feature_set.labels)
    train_rows, val_rows = feature_set.rows("train"), feature_set.rows("val")
    num_classes = len(feature_set.classes)
    absent = [feature_set.classes[c] for c in range(num_classes) if c not in set(labels[train_rows].tolist())]
    if len(train_rows) == 0 or absent:
        raise DataError(f"The metric strategy needs training images of every class (it fits a prototype or k-NN "
                        f"head on the embeddings); none in train for: {', '.join(absent or feature_set.classes)}. "
                        f"Add images or lower data.val_fraction.")
    if config.train.metric_backbone and config.backbone.layer:
        raise ConfigError(f"train.metric_backbone trains the top of the whole backbone; it cannot be combined with "
                          f"backbone.layer = {config.backbone.layer!r}. Remove one of the two.")
    features = np.asarray(feature_set.features, np.float32)
    x_train, y_train = features[train_rows], labels[train_rows]
    x_val, y_val = features[val_rows], labels[val_rows]
    # standardised inputs while training (training split only), folded into the first Dense layer afterwards
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = np.maximum(std, max(float(np.median(std)), 1e-6) / 100.0)
    views = views_of(feature_set, train_rows)
    standard = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731

    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.train.seed)
    projection = build_projection(x_train.shape[1])
    projection.compile(optimizer=make_optimizer(config), loss=supervised_contrastive_loss,
                       jit_compile=bool(config.train.jit_compile))
    batch_size = min(len(train_rows), max(int(config.train.batch_size), MIN_BATCH))
    data = contrastive_batches(standard(x_train), None if views is None else standard(views), y_train, batch_size,
                               config.train.seed)
    epochs: list[dict] = []
    monitor = "val_loss" if len(val_rows) > 1 else "loss"
    callbacks = [
        accuracy_logger(standard(x_train), y_train, standard(x_val), y_val, num_classes),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=max(1, config.train.early_stopping_patience),
                                      restore_best_weights=True),
        EpochRecorder(run_dir, epochs, phase=1, echo=say if echo and not interactive() else None,
                      epochs=config.train.epochs),
    ]
    validation = (standard(x_val), y_val.astype(np.int32)) if monitor == "val_loss" else None
    history = projection.fit(data, validation_data=validation, validation_batch_size=max(1, len(val_rows)),
                             epochs=config.train.epochs, callbacks=callbacks,
                             verbose=2 if echo and interactive() else 0)
    trained, projection = projection, build_projection(x_train.shape[1])  # uncompiled: the model saves no loss
    projection.set_weights(trained.get_weights())
    fold_input_standardization(projection, mean, std)
    plain_train, plain_val = x_train, x_val  # the cached backbone features: retrieval's "before"
    feature_model, phase2 = feature_set.feature_model, None
    if feature_model is None:
        b = config.backbone
        feature_model = build_feature_model(prepared.spec, prepared.input_size, b.weights, b.seed, b.layer, b.pooling)
    if config.train.metric_backbone and config.train.finetune_epochs > 0:
        train_records = [feature_set.records[i] for i in train_rows]
        val_records = [feature_set.records[i] for i in val_rows]
        phase2 = train_backbone(config, prepared, feature_model, projection, train_records, val_records,
                                supervised_contrastive_loss, MIN_BATCH, run_dir, epochs, echo)
        # the backbone changed: its features are no longer the cached ones; index/embed load these weights
        find_backbone(feature_model, prepared.spec).save_weights(run_dir / BACKBONE_FILE)
        phase2["backbone_weights"] = BACKBONE_FILE
        x_train, x_val = (backbone_features(feature_model, records, prepared.input_size, prepared.resize_policy,
                                            config.data.background) for records in (train_records, val_records))
    # the same projection as numpy arrays: index, embed and their queries apply it without TensorFlow
    hidden, embedding = projection.get_layer("hidden"), projection.get_layer("embedding")
    Projection(*(np.asarray(w, np.float32) for w in hidden.get_weights() + embedding.get_weights())).save(
        run_dir / PROJECTION_FILE)

    e_train, e_val = embed(projection, x_train), embed(projection, x_val)
    retrieval = {"protocol": "val queries vs train gallery, cosine",
                 "features": retrieval_metrics(plain_val, y_val, plain_train, y_train),
                 "embeddings": retrieval_metrics(e_val, y_val, e_train, y_train)}
    h = config.head
    kind = "knn" if h.kind == "knn" else "prototype"
    if kind == "knn":
        classes_head = knn_head(e_train, y_train, num_classes, h.neighbors, h.temperature, name="classes")
    else:
        classes_head = prototype_head(e_train, y_train, num_classes, h.temperature, h.shrinkage, name="classes")
    head = attach_head(projection, classes_head)
    train_acc, train_loss = head_metrics(head, x_train, y_train, num_classes)
    val_acc, val_loss = head_metrics(head, x_val, y_val, num_classes)
    losses = history.history.get(monitor, [])
    metrics = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
               "train_images": int(len(train_rows)), "val_images": int(len(val_rows)),
               "epochs_trained": len(history.history.get("loss", [])),
               "best_epoch": int(np.argmin(losses)) + 1 if losses else 0,
               "contrastive_loss": float(min(losses)) if losses else None}
    write_json(run_dir / "metrics.json", metrics)

    model = assemble(feature_model, head)
    model.save(run_dir / MODEL_FILE)
    write_run_info(run_dir, status="finished", metrics=metrics, retrieval=retrieval,
                   head={"kind": kind, "units": [], "neighbors": h.neighbors, "shrinkage": h.shrinkage,
                         "temperature": h.temperature},
                   metric={"loss": "supervised_contrastive", "temperature": TEMPERATURE,
                           "projection": [int(projection.get_layer("hidden").units),
                                          int(projection.get_layer("embedding").units)],
                           "batch_size": batch_size, "backbone_trained": phase2 is not None, "phase2": phase2,
                           "projection_file": PROJECTION_FILE},
                   features={k: feature_set.stats.get(k) for k in
                             ("used", "computed", "cached", "views_per_image", "dim")})
    say(f"projection: supervised contrastive loss {fmt(metrics['contrastive_loss'])} "
        f"(best epoch {metrics['best_epoch']} of {metrics['epochs_trained']}); {kind} head on the embeddings: "
        f"val_accuracy {fmt(val_acc)}, val_loss {fmt(val_loss)}")
    # the unknown-scorer reads the backbone features (the input of the model's head), as on the bottleneck route
    say(ood_text(fit_ood(config.train.ood, x_train, y_train, x_val, run_dir)))
    say(retrieval_text(retrieval["features"], retrieval["embeddings"]))
    say(f"model: {run_dir / MODEL_FILE}")
    return {"run_dir": str(run_dir), "strategy": "metric", "metrics": metrics, "retrieval": retrieval,
            "features": dict(feature_set.stats), "model": str(run_dir / MODEL_FILE)}
