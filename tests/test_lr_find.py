"""The learning-rate range test: tl-app lr-find, and train --lr auto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tl_app.training.lr_finder import ramp, smooth, suggest


def test_the_suggestion_is_the_steepest_fall_before_the_minimum():
    rates = ramp(1e-6, 1.0, 61)
    x = np.log10(rates)
    # flat, then a fall steepest at 1e-3, a minimum near 1e-1.5, then divergence
    loss = 2.0 - np.tanh((x + 3) * 2) + np.where(x > -1.5, (x + 1.5) ** 2 * 8, 0)
    picked = suggest(rates, loss)
    assert 10 ** -3.25 < picked < 10 ** -2.75, picked
    # a curve whose loss never falls gives no suggestion instead of a made-up one
    assert suggest(rates, np.linspace(2.0, 5.0, 61)) is None


def test_the_smoothing_is_bias_corrected():
    values = smooth([3.0] * 5)
    np.testing.assert_allclose(values, 3.0)  # not pulled towards 0 at the start


def test_lr_find_writes_its_plot_and_suggests_a_rate_that_trains(tiny_config, cli, tmp_path):
    out = tmp_path / "lr.png"
    config = tiny_config
    result = cli("lr-find", config.data.root, "--backbone", "vgg16", "--weights", "none", "--input-size", 32,
                 "--cache-dir", config.features.cache_dir, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output[result.output.index("{"):])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rates, smoothed = np.asarray(found["rates"]), np.asarray(found["smoothed"])
    assert found["suggested"] is not None, found
    at = int(np.argmin(np.abs(rates - found["suggested"])))
    assert 1e-7 < found["suggested"] < 10 and at < int(np.argmin(smoothed))
    assert smoothed[at] < smoothed[0], "the suggested rate must be one where the loss was already falling"

    # the suggested rate trains the head: lower training loss than the ramp's starting rate, same epochs
    from tl_app.training.bottleneck import train_bottleneck

    def train_loss(rate, name):
        run = config.with_overrides({"backbone.name": "vgg16", "train.learning_rate": rate, "train.epochs": 5,
                                     "train.early_stopping_patience": 5, "train.name": name,
                                     "train.calibration": "none"})
        return train_bottleneck(run, echo=None)["metrics"]["train_loss"]

    assert train_loss(found["suggested"], "suggested") < train_loss(1e-6, "tiny") - 0.01


def test_train_with_lr_auto_trains_at_the_suggestion_and_says_why(tiny_config, cli):
    config = tiny_config
    result = cli("train", config.data.root, "--backbone", "vgg16", "--weights", "none", "--input-size", 32,
                 "--lr", "auto", "--epochs", 2, "--runs-dir", config.train.runs_dir, "--name", "auto-lr",
                 "--set", f"features.cache_dir={json.dumps(config.features.cache_dir)}")
    assert result.exit_code == 0, result.output
    run_dir = Path(config.train.runs_dir) / "auto-lr"
    run = json.loads((run_dir / "run.json").read_text())
    record = run["lr_find"]
    assert record["suggested"] and record["used"] == record["suggested"] and "steepest" in record["why"]
    assert (run_dir / record["plot"]).is_file()
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    assert saved["lr_find"] is True and saved["learning_rate"] == record["suggested"]
    from tl_app.insight.report import build_report

    page = build_report(run_dir, evaluate_missing=False, echo=None).read_text()
    assert "steepest fall of the smoothed training loss" in page and 'alt="learning-rate range test"' in page


def test_a_bad_learning_rate_is_a_clear_error(tiny_config, cli):
    result = cli("train", tiny_config.data.root, "--lr", "fast")
    assert result.exit_code == 2 and "expected a positive number such as 1e-3, or auto" in result.output
    result = cli("train", tiny_config.data.root, "--lr", "-1")  # the configuration's range check
    assert result.exit_code != 0 and "train.learning_rate = -1.0 is out of range" in result.output
    assert "Traceback" not in result.output
