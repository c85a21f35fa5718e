"""Reading a finished run's history: underfitting, overfitting or healthy, with remedies.

Pure numbers (no plotting): the curves are drawn by tl_app.insight.curves.
"""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np
from tl_app.core.errors import ModelNotFoundError


HISTORY_FILE = "history.json"


DIAGNOSIS_FILE = "diagnosis.json"


# thresholds on the mean of the last few epochs
UNDERFIT_TRAIN_ACCURACY = 0.70


OVERFIT_GAP = 0.10


OVERFIT_VAL_LOSS_RISE = 1.25


TAIL_EPOCHS = 3


REMEDIES = {
    "over-fitting": [
        "more training data, or stronger augmentation (augment.* settings, features.augment_views for bottleneck)",
        "more regularisation: head.dropout, head.l2, train.weight_decay, train.label_smoothing",
        "a smaller head (head.units) or fewer unfrozen blocks (train.unfreeze_blocks)",
        "stop earlier (train.early_stopping_patience) or lower the learning rate",
    ],
    "under-fitting": [
        "train longer (train.epochs / train.finetune_epochs) or raise the learning rate",
        "a bigger head (head.units) or a bigger backbone (e.g. resnet101)",
        "unfreeze more blocks (--strategy finetune, train.unfreeze_blocks)",
        "less regularisation or augmentation; check the labels for mistakes",
    ],
    "healthy": [
        "nothing urgent; if validation accuracy was still rising, a few more epochs may help",
    ],
    "unknown": [
        "hold out a validation split (data.val_fraction > 0) so training can be judged",
    ],
}


def read_history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist: the run has not finished an epoch yet.")
    data = json.loads(path.read_text())
    return list(data if isinstance(data, list) else data.get("epochs", []))


def series(epochs: list[dict], key: str) -> np.ndarray:
    return np.array([e.get(key) if e.get(key) is not None else np.nan for e in epochs], float)


def tail_mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values[-TAIL_EPOCHS:].mean()) if len(values) else float("nan")


def gap_limit(val_accuracy: float, val_images: int | None) -> float:
    """The train/val gap that counts as over-fitting: OVERFIT_GAP, or two standard errors of the
    validation accuracy when the validation set is too small to resolve OVERFIT_GAP."""
    if not val_images:
        return OVERFIT_GAP
    p = min(max(val_accuracy, 0.0), 1.0)
    return max(OVERFIT_GAP, 2.0 * float(np.sqrt(p * (1.0 - p) / val_images)))


def diagnose(epochs: list[dict], val_images: int | None = None) -> dict:
    """over-fitting (train/val gap or rising val loss), under-fitting (low train accuracy) or healthy."""
    acc, val_acc = series(epochs, "accuracy"), series(epochs, "val_accuracy")
    loss, val_loss = series(epochs, "loss"), series(epochs, "val_loss")
    train_acc, valid_acc = tail_mean(acc), tail_mean(val_acc)
    evidence = {"train_accuracy": train_acc, "val_accuracy": valid_acc, "epochs": len(epochs)}
    if not epochs or np.isnan(valid_acc) or np.isnan(train_acc):
        kind, line = "unknown", "no validation metrics: cannot tell over-fitting from under-fitting"
    else:
        gap = train_acc - valid_acc
        limit = gap_limit(valid_acc, val_images)
        evidence.update(gap=gap, gap_limit=limit, val_images=val_images)
        rising = False
        measured = np.flatnonzero(~np.isnan(val_loss))  # epochs (0-based) that have a validation loss
        finite = val_loss[measured]
        if len(finite) >= 3:
            best = int(np.argmin(finite))
            best_epoch = int(measured[best]) + 1
            rising = best <= len(finite) - 3 and finite[-1] > OVERFIT_VAL_LOSS_RISE * max(finite[best], 1e-8)
            rising = rising and tail_mean(loss) <= float(np.nanmin(loss[:best_epoch]))
            evidence["best_val_loss_epoch"] = best_epoch
        tail = min(TAIL_EPOCHS, int(np.count_nonzero(~np.isnan(val_acc))))
        # the headline metric is the restored epoch's; these are averages, and say so
        means = "mean of the last epoch" if tail == 1 else f"means of the last {tail} epochs"
        evidence["averaged_epochs"] = tail
        if train_acc < UNDERFIT_TRAIN_ACCURACY:
            kind = "under-fitting"
            line = (f"under-fitting: training accuracy is only {train_acc:.2f} (validation {valid_acc:.2f}; "
                    f"{means})")
        elif gap > limit:
            kind = "over-fitting"
            line = (f"over-fitting: training accuracy {train_acc:.2f} vs validation {valid_acc:.2f} "
                    f"({means}; gap {gap:.2f} > {limit:.2f})")
        elif rising:
            kind = "over-fitting"
            line = (f"over-fitting: validation loss rose from {finite.min():.3f} (epoch {best_epoch}) to "
                    f"{finite[-1]:.3f} while training loss kept falling")
        else:
            kind = "healthy"
            line = (f"healthy: training accuracy {train_acc:.2f}, validation {valid_acc:.2f} ({means}; "
                    f"gap {gap:+.2f})")
            if gap > OVERFIT_GAP:
                line += f", within the noise of {val_images} validation images"
    remedies = REMEDIES[kind]
    return {"diagnosis": kind, "line": f"{line}; try: {remedies[0]}" if kind != "healthy" else line,
            "remedies": list(remedies), "evidence": evidence}


def read_records(run_dir: Path) -> dict:
    """metrics.json and run.json of a run ({} for a missing or unreadable file)."""
    out = {}
    for name in ("metrics.json", "run.json"):
        try:
            data = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            data = {}
        out[name] = data if isinstance(data, dict) else {}
    return out


def validation_size(records: dict) -> int | None:
    """How many validation images the run had (metrics.json or run.json's metrics), when recorded."""
    for data in (records["metrics.json"], records["run.json"].get("metrics") or {}):
        if isinstance(data, dict) and data.get("val_images"):
            return int(data["val_images"])
    return None


RANDOM_WEIGHTS_REMEDY = ("the backbone has random weights (backbone.weights = none), so its features carry little "
                         "information: use ImageNet weights (tl-app weights status / tl-app weights import FILE)")
