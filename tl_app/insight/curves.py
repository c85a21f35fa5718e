"""Training curves and a one-line diagnosis, written after every training run.

Reads ``run_dir/history.json`` ({"epochs": [{"epoch", "phase", "loss", "accuracy",
"val_loss", "val_accuracy"}, ...]}) and writes ``curves.png`` and ``diagnosis.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tl_app.training.diagnosis import DIAGNOSIS_FILE, RANDOM_WEIGHTS_REMEDY, diagnose, read_history, read_records, series, validation_size
from tl_app.insight.plots import plt, save_figure


CURVES_FILE = "curves.png"


def phase_boundaries(epochs: list[dict]) -> list[float]:
    """x positions (between epochs) where the phase changes."""
    phases = [e.get("phase", 1) for e in epochs]
    return [i + 0.5 for i in range(1, len(phases)) if phases[i] != phases[i - 1]]


def plot_curves(epochs: list[dict], path: str | Path, title: str = "", restored: int | None = None) -> Path:
    """Loss and accuracy, train vs validation, with the phase boundary and the restored epoch marked.

    ``restored``: the epoch (1-based, across phases) whose weights the saved model holds.
    """
    from matplotlib.ticker import MaxNLocator

    x = np.arange(1, len(epochs) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        for prefix, style, name in (("", "-o", "train"), ("val_", "-s", "validation")):
            values = series(epochs, prefix + key)
            if np.isfinite(values).any():
                ax.plot(x, values, style, markersize=3, label=name)
        for boundary in phase_boundaries(epochs):
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=1)
            ax.text(boundary, 0.98, " fine-tuning", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="grey")
        if restored and 1 <= restored <= len(epochs):
            ax.axvline(restored, color="#1a7f37", linestyle=":", linewidth=1.5,
                       label=f"restored weights (epoch {restored})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if len(x):
            ax.set_xlim(0.5, len(x) + 0.5)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def restored_epoch(records: dict) -> int | None:
    """The epoch whose weights the run saved (early stopping's best), from metrics.json or run.json."""
    for data in (records["metrics.json"], records["run.json"].get("metrics") or {}):
        if isinstance(data, dict) and isinstance(data.get("best_epoch"), int) and data["best_epoch"] > 0:
            return data["best_epoch"]
    return None


def write_training_report(run_dir: str | Path) -> dict:
    """curves.png + diagnosis.json for a run; returns {"diagnosis", "line", "remedies", "curves", ...}."""
    run_dir = Path(run_dir)
    epochs = read_history(run_dir)
    records = read_records(run_dir)
    result = diagnose(epochs, validation_size(records))
    if result["diagnosis"] == "under-fitting" and records["run.json"].get("weights") == "none":
        result["remedies"].insert(0, RANDOM_WEIGHTS_REMEDY)
        result["line"] = result["line"].split("; try:")[0] + f"; try: {RANDOM_WEIGHTS_REMEDY}"
    curves = plot_curves(epochs, run_dir / CURVES_FILE, title=result["line"] if len(result["line"]) < 150 else
                         result["line"].split(";")[0], restored=restored_epoch(records))
    result["restored_epoch"] = restored_epoch(records)
    result["curves"] = str(curves)
    (run_dir / DIAGNOSIS_FILE).write_text(json.dumps(result, indent=2))
    return result
