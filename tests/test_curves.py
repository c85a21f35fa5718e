"""Training curves and the over-/under-fitting diagnosis, from history.json files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tl_app.training.diagnosis import diagnose
from tl_app.insight.curves import phase_boundaries, write_training_report
from tl_app.core.errors import TlAppError


def history(train_acc, val_acc, phases=None, train_loss=None, val_loss=None):
    phases = phases or [1] * len(train_acc)
    train_loss = train_loss or [1.0 - a * 0.9 for a in train_acc]
    val_loss = val_loss or [1.0 - a * 0.9 for a in val_acc]
    return [{"epoch": i + 1, "phase": p, "loss": tl, "accuracy": ta, "val_loss": vl, "val_accuracy": va}
            for i, (p, ta, va, tl, vl) in enumerate(zip(phases, train_acc, val_acc, train_loss, val_loss))]


def write_history(run_dir, epochs):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "history.json").write_text(json.dumps({"epochs": epochs}))


def test_large_train_val_gap_is_over_fitting():
    result = diagnose(history([0.7, 0.9, 0.99, 1.0, 1.0], [0.6, 0.7, 0.72, 0.7, 0.71]))
    assert result["diagnosis"] == "over-fitting"
    assert "gap" in result["line"]
    assert any("augmentation" in r for r in result["remedies"])
    assert any("regularisation" in r for r in result["remedies"])


def test_a_gap_within_the_noise_of_a_tiny_validation_set_is_not_over_fitting():
    epochs = history([0.7, 0.8, 0.85, 0.85], [0.6, 0.7, 0.72, 0.72])
    assert diagnose(epochs)["diagnosis"] == "over-fitting"
    small = diagnose(epochs, val_images=25)  # two standard errors ~ 0.18
    assert small["diagnosis"] == "healthy" and "noise of 25 validation images" in small["line"]
    assert diagnose(epochs, val_images=2000)["diagnosis"] == "over-fitting"


def test_rising_validation_loss_is_over_fitting_even_with_small_gap():
    result = diagnose(history([0.8, 0.85, 0.88, 0.9, 0.9, 0.9], [0.8, 0.84, 0.86, 0.85, 0.84, 0.84],
                              train_loss=[0.6, 0.5, 0.4, 0.3, 0.25, 0.2],
                              val_loss=[0.6, 0.5, 0.55, 0.7, 0.8, 0.9]))
    assert result["diagnosis"] == "over-fitting"
    assert "validation loss rose" in result["line"]


def test_low_training_accuracy_is_under_fitting():
    result = diagnose(history([0.3, 0.4, 0.45, 0.5], [0.3, 0.4, 0.42, 0.48]))
    assert result["diagnosis"] == "under-fitting"
    assert any("unfreeze more blocks" in r for r in result["remedies"])
    assert any("bigger" in r for r in result["remedies"])


def test_close_high_curves_are_healthy():
    result = diagnose(history([0.6, 0.8, 0.9, 0.93], [0.6, 0.78, 0.88, 0.9]))
    assert result["diagnosis"] == "healthy"


def test_missing_validation_metrics_give_unknown():
    epochs = [{"epoch": 1, "phase": 1, "loss": 0.5, "accuracy": 0.8}]
    assert diagnose(epochs)["diagnosis"] == "unknown"


def test_phase_boundary_sits_between_the_phases():
    epochs = history([0.5] * 5, [0.5] * 5, phases=[1, 1, 1, 2, 2])
    assert phase_boundaries(epochs) == [3.5]


def test_write_training_report_writes_curves_png_and_diagnosis(tmp_path):
    run = tmp_path / "run"
    write_history(run, history([0.5, 0.8, 0.95, 0.99, 1.0], [0.5, 0.7, 0.75, 0.74, 0.75], phases=[1, 1, 1, 2, 2]))
    result = write_training_report(run)
    assert result["diagnosis"] == "over-fitting"
    assert result["remedies"]
    with Image.open(result["curves"]) as image:
        assert image.format == "PNG" and image.width > 600
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    saved = json.loads((run / "diagnosis.json").read_text())
    assert saved["diagnosis"] == "over-fitting" and saved["curves"].endswith("curves.png")


def test_missing_history_is_a_clear_error(tmp_path):
    with pytest.raises(TlAppError, match="history.json"):
        write_training_report(tmp_path)


def test_under_fitting_with_random_backbone_weights_names_the_weights_first(tmp_path):
    epochs = history([0.3, 0.4, 0.45, 0.5], [0.3, 0.4, 0.42, 0.48])
    random_run, imagenet_run = tmp_path / "random", tmp_path / "imagenet"
    for run, weights in ((random_run, "none"), (imagenet_run, "imagenet")):
        write_history(run, epochs)
        (run / "run.json").write_text(json.dumps({"weights": weights}))
    random_result = write_training_report(random_run)
    assert "random weights" in random_result["remedies"][0] and "random weights" in random_result["line"]
    assert not any("random weights" in r for r in write_training_report(imagenet_run)["remedies"])
