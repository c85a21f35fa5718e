"""k-NN and prototype heads for the bottleneck strategy, fitted in one pass over the cached features.

No epochs: their state is the features themselves (k-NN) or the class means
(prototype). Adding or removing a class later is training.class_edit.
"""

from __future__ import annotations

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import DataError
from tl_app.core.files import write_json
from tl_app.features.extract import extract_features
from tl_app.models.artifacts import MODEL_FILE
from tl_app.models.backbones import build_feature_model
from tl_app.models.fewshot_heads import knn_head, prototype_head
from tl_app.models.surgery import assemble
from tl_app.training.runs import fmt, write_run_info


def fit_head(config: Config, features: np.ndarray, labels: np.ndarray, num_classes: int):
    h = config.head
    if h.kind == "knn":
        return knn_head(features, labels, num_classes, h.neighbors, h.temperature)
    return prototype_head(features, labels, num_classes, h.temperature, h.shrinkage)


def head_metrics(head, features, labels, num_classes: int) -> tuple[float | None, float | None]:
    """(accuracy, nll) of a head on features; (None, None) without rows."""
    if len(features) == 0:
        return None, None
    probs = np.asarray(head.predict(np.asarray(features, np.float32), verbose=0, batch_size=256))
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))))
    return float(np.mean(probs.argmax(1) == labels)), nll


def train_fewshot_head(config: Config, prepared, echo=print) -> dict:
    """The k-NN/prototype head fitted on the prepared run's cached training features, then model.keras."""
    say = echo or (lambda *a, **k: None)
    run_dir = prepared.run_dir
    write_run_info(run_dir, status="training")
    feature_set = extract_features(config, manifest=prepared.manifest, echo=echo)
    labels = np.asarray(feature_set.labels)
    train_rows, val_rows = feature_set.rows("train"), feature_set.rows("val")
    if len(train_rows) == 0:
        raise DataError(f"No training images in {config.data.root}: every image is in val/test. "
                        f"Lower data.val_fraction/test_fraction or add images to train/.")
    num_classes = len(feature_set.classes)
    present = set(labels[train_rows].tolist())
    absent = [feature_set.classes[c] for c in range(num_classes) if c not in present]
    if absent:
        raise DataError(f"A {config.head.kind} head needs at least one training image per class; "
                        f"none in train for: {', '.join(absent)}. Add images or lower data.val_fraction.")
    features = np.asarray(feature_set.features, np.float32)
    head = fit_head(config, features[train_rows], labels[train_rows], num_classes)
    train_acc, train_loss = head_metrics(head, features[train_rows], labels[train_rows], num_classes)
    val_acc, val_loss = head_metrics(head, features[val_rows], labels[val_rows], num_classes)
    metrics = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
               "train_images": int(len(train_rows)), "val_images": int(len(val_rows)), "epochs_trained": 0,
               "best_epoch": 0}
    write_json(run_dir / "metrics.json", metrics)
    feature_model = feature_set.feature_model
    if feature_model is None:
        b = config.backbone
        feature_model = build_feature_model(prepared.spec, prepared.input_size, b.weights, b.seed, b.layer, b.pooling)
    model = assemble(feature_model, head)
    model.save(run_dir / MODEL_FILE)
    write_run_info(run_dir, status="finished", metrics=metrics, head=head_info(config),
                   features={k: feature_set.stats.get(k) for k in
                             ("used", "computed", "cached", "views_per_image", "dim")})
    say(f"head: {config.head.kind}, fitted on {len(train_rows)} training features (no epochs); "
        f"val_accuracy {fmt(val_acc)}, val_loss {fmt(val_loss)}")
    say(f"model: {run_dir / MODEL_FILE}")
    return {"run_dir": str(run_dir), "strategy": "bottleneck", "metrics": metrics,
            "features": dict(feature_set.stats), "model": str(run_dir / MODEL_FILE)}


def head_info(config: Config) -> dict:
    h = config.head
    return {"kind": h.kind, "units": [], "neighbors": h.neighbors, "shrinkage": h.shrinkage,
            "temperature": h.temperature}
