"""The learning-rate range test (Smith 2015; fastai's lr_find) on the cached features.

The head is trained for a few hundred steps while the rate grows exponentially
from ``start`` to ``end``; the loss, smoothed by an exponential moving average
with bias correction, first falls and then diverges. The suggested rate is
where the smoothed loss falls fastest against log(rate), before its minimum.

It runs on the training split's bottleneck features (from the feature cache),
so it costs one extraction, which the training run then reuses. For fine-tuning
that is exactly phase 1 (the head on the frozen backbone), the phase whose rate
``train.learning_rate`` sets; phase 2 runs at that rate x finetune_lr_factor.
"""

from __future__ import annotations

import math

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import DataError
from tl_app.data.edits import apply_edits
from tl_app.data.scan import scan_dataset
from tl_app.data.splits import class_weights
from tl_app.features.extract import extract_features
from tl_app.models.heads import build_head
from tl_app.training.losses import class_weight_table, make_loss
from tl_app.training.optim import make_optimizer

START, END, STEPS = 1e-7, 10.0, 100
SMOOTHING = 0.9  # EMA factor of the loss (fastai uses 0.98 over longer ramps)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


def ramp(start: float, end: float, steps: int) -> np.ndarray:
    """Exponentially spaced rates from start to end."""
    return start * (end / start) ** (np.arange(steps) / max(1, steps - 1))


def smooth(losses, beta: float = SMOOTHING) -> np.ndarray:
    """Bias-corrected exponential moving average (so the first values are not pulled to 0)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out)


def suggest(rates, smoothed, skip_fraction: float = 0.1) -> float | None:
    """The rate of steepest descent of the smoothed loss against log10(rate), before the loss minimum.

    The first ``skip_fraction`` of the steps are left out: the average is still settling there.
    None when the loss never fell (no rate to recommend).
    """
    rates, smoothed = np.asarray(rates, float), np.asarray(smoothed, float)
    lowest = int(np.argmin(smoothed))
    first = int(len(rates) * skip_fraction)
    if lowest - first < 2 or not smoothed[lowest] < smoothed[first]:
        return None
    slope = np.gradient(smoothed[first:lowest + 1], np.log10(rates[first:lowest + 1]))
    return float(rates[first + int(np.argmin(slope))])


def lr_range_test(config: Config, echo=print, start: float = START, end: float = END,
                  steps: int = STEPS) -> dict:
    """Run the range test on config's data; returns rates, raw and smoothed losses and the suggestion."""
    import keras

    say = echo or (lambda *a, **k: None)
    if not 0 < start < end:
        raise DataError(f"The range test needs 0 < start < end, got start={start}, end={end}.")
    manifest = scan_dataset(config)
    apply_edits(manifest, config.data.exclude, config.data.relabel)
    features = extract_features(config, manifest=manifest, echo=echo)
    rows = features.rows("train")
    if len(rows) == 0:
        raise DataError(f"No training images in {config.data.root}: the range test trains on the train split.")
    num_classes = len(features.classes)
    x = np.asarray(features.features, np.float32)[rows]
    y = np.asarray(features.labels)[rows]
    weights = class_weight_table(class_weights(manifest, config.data.class_weights), num_classes)

    keras.utils.set_random_seed(config.train.seed)
    head = build_head(num_classes, x.shape[1], config.head, standardize_on=x)  # as training builds it
    optimizer = make_optimizer(config, learning_rate=start)
    head.compile(optimizer=optimizer, loss=make_loss(config))
    rng = np.random.default_rng(config.train.seed)
    batch = min(int(config.train.batch_size), len(x))
    order, cursor = rng.permutation(len(x)), 0
    rates, losses, best = ramp(start, end, steps), [], math.inf
    for rate in rates:
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(x)), 0
        picked = order[cursor:cursor + batch]
        cursor += batch
        optimizer.learning_rate.assign(float(rate))
        loss = float(head.train_on_batch(x[picked], np.eye(num_classes, dtype=np.float32)[y[picked]],
                                         sample_weight=weights[y[picked]]))
        losses.append(loss)
        current = smooth(losses)[-1]
        best = min(best, current)
        if not math.isfinite(loss) or current > DIVERGED * best:
            break
    rates = rates[:len(losses)]
    smoothed = smooth(np.nan_to_num(losses, nan=np.inf, posinf=np.inf))
    suggested = suggest(rates, smoothed)
    say(f"lr-find: {len(losses)} steps from {start:.1e} to {rates[-1]:.1e}; "
        + (f"suggested learning rate {suggested:.2e} (steepest fall of the smoothed loss)" if suggested
           else "the loss never fell: no rate suggested (check the data and features)"))
    return {"rates": rates.tolist(), "losses": losses, "smoothed": smoothed.tolist(), "suggested": suggested,
            "steps": len(losses), "diverged": len(losses) < steps, "train_images": int(len(x)),
            "backbone": config.backbone.name, "weights": config.backbone.weights}
