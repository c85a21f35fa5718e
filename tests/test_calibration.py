"""Temperature calibration: fitted on validation, lowers held-out NLL/ECE, lives in every exported format."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tl_app.models.calibration import scale_probabilities
from tl_app.training.calibration import calibration_figures, calibration_record, fit_temperature, risk_coverage


def overconfident_model_and_data(seed: int = 0):
    """A real Keras softmax classifier on overlapping Gaussian classes whose logits are multiplied by 4.

    Its arg max is that of a well-fitted logistic model, but its confidences are far too high: the
    deliberately over-confident model a temperature must fix without changing any prediction.
    """
    import keras

    rng = np.random.default_rng(seed)
    classes, dim, n = 3, 4, 1200
    centres = rng.normal(0, 1.0, (classes, dim))
    labels = rng.integers(0, classes, n)
    x = (centres[labels] + rng.normal(0, 1.0, (n, dim))).astype(np.float32)
    # the Bayes logits of equal-covariance Gaussians, scaled by 4: right arg max, over-confident
    w = centres.T.astype(np.float32)
    b = (-0.5 * np.sum(centres ** 2, axis=1)).astype(np.float32)
    inputs = keras.Input((dim,))
    dense = keras.layers.Dense(classes, name="logits")
    outputs = keras.layers.Softmax()(keras.layers.Rescaling(4.0)(dense(inputs)))
    model = keras.Model(inputs, outputs)
    dense.set_weights([w, b])
    return model, x, labels


def test_temperature_fitted_on_validation_lowers_held_out_nll_and_ece_with_the_same_arg_max():
    from tl_app.models.calibration import temperature_of, with_temperature, without_temperature

    model, x, labels = overconfident_model_and_data()
    probs = model.predict(x, verbose=0)
    val, test = slice(0, 400), slice(400, None)
    record = calibration_record("temperature", probs[val], labels[val])
    temperature = record["temperature"]
    assert 2.5 < temperature < 6.0  # the logits were scaled by 4
    assert record["after"]["nll"] < record["before"]["nll"]

    calibrated = with_temperature(model, temperature)
    assert temperature_of(calibrated) == pytest.approx(temperature) and temperature_of(model) is None
    after = calibrated.predict(x[test], verbose=0)
    np.testing.assert_allclose(after, scale_probabilities(probs[test], temperature), atol=1e-5)
    before_fig, after_fig = calibration_figures(probs[test], labels[test]), calibration_figures(after, labels[test])
    assert after_fig["nll"] < before_fig["nll"] - 0.05
    assert after_fig["ece"] < before_fig["ece"] / 2
    assert after_fig["brier"] < before_fig["brier"]
    np.testing.assert_array_equal(after.argmax(1), probs[test].argmax(1))
    # a second wrap replaces the temperature; the inner model is the original
    assert temperature_of(with_temperature(calibrated, 2.0)) == 2.0
    np.testing.assert_array_equal(without_temperature(calibrated).predict(x[:8], verbose=0),
                                  model.predict(x[:8], verbose=0))


def test_a_calibrated_model_keeps_temperature_one_and_figures_are_right_on_a_hand_example():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (3000, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])  # labels drawn from the probabilities: calibrated
    assert fit_temperature(probs, labels) == pytest.approx(1.0, abs=0.1)
    # two images, confidence 0.9 (right) and 0.6 (wrong): ECE = (0.1 + 0.6) / 2, MCE = 0.6
    figures = calibration_figures(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]))
    assert figures["ece"] == pytest.approx(0.35) and figures["mce"] == pytest.approx(0.6)
    assert figures["brier"] == pytest.approx((0.02 + 0.72) / 2)
    assert calibration_record("temperature", probs[:1], labels[:1])["method"] == "none"  # too few to fit


@pytest.mark.slow
def test_trained_run_records_its_temperature_and_every_export_format_returns_calibrated_probabilities(
        tiny_config, tmp_path):
    """Both parts through real files: fine-tuning writes the record, export puts it in each graph."""
    from tl_app.export.converters import onnx_available, run_onnx, run_tflite
    from tl_app.export.exporter import export_run
    from tl_app.models.artifacts import read_card, read_run_info
    from tl_app.models.opener import load_run_model, open_model, savedmodel_function, open_savedmodel
    from tl_app.training.finetune import train_finetune
    from factories import reference_pixels

    tiny_config.backbone.name = "vgg16"
    tiny_config.train.epochs = tiny_config.train.finetune_epochs = 1
    run_dir = Path(train_finetune(tiny_config, echo=None)["run_dir"])
    record = read_run_info(run_dir)["calibration"]
    assert record["method"] == "temperature" and record["fitted_on"] == "val" and record["images"] > 0
    assert record["after"]["nll"] <= record["before"]["nll"]
    # a temperature far from 1 makes "applied" and "not applied" impossible to confuse
    info = read_run_info(run_dir)
    info["calibration"]["temperature"] = temperature = 3.0
    (run_dir / "run.json").write_text(json.dumps(info))

    pixels, _ = reference_pixels(run_dir)
    raw = load_run_model(run_dir).predict(pixels, verbose=0)
    expected = scale_probabilities(raw, temperature)
    assert np.max(np.abs(expected - raw)) > 1e-2
    np.testing.assert_allclose(open_model(run_dir).predict(pixels), expected, atol=1e-5)  # a run answers calibrated

    formats = "savedmodel,keras,tflite" + (",onnx" if onnx_available() else "")
    result = export_run(run_dir, root=tmp_path / "models", name="calibrated", formats=formats, echo=None)
    version = result["path"]
    assert read_card(version)["calibration"]["temperature"] == temperature
    outputs = {
        "savedmodel": savedmodel_function(open_savedmodel(version)[1]["predict_pixels"])(pixels),
        "keras": open_model(version, keras=True).predict(pixels),
        "tflite": run_tflite(version / "model.tflite", pixels),
    }
    if onnx_available():
        outputs["onnx"] = run_onnx(version / "model.onnx", pixels)
    for name, out in outputs.items():
        assert np.max(np.abs(out - expected)) <= 1e-4, name
    assert set(result["parity"]) >= set(outputs)  # the parity gate ran on every format and passed


def test_calibration_none_leaves_the_model_and_its_export_exactly_as_before(tiny_config, cli, tmp_path):
    from tl_app.export.exporter import export_run
    from tl_app.models.artifacts import read_card, read_run_info
    from tl_app.models.opener import load_run_model, open_model
    from factories import reference_pixels

    result = cli("train", tiny_config.data.root, "--backbone", "vgg16", "--weights", "none", "--input-size", 32,
                 "--epochs", 1, "--batch-size", 8, "--runs-dir", tmp_path / "runs", "--name", "raw",
                 "--calibration", "none", "--ood", "none",  # (an OOD score would change the export too)
                 "--set", f"features.cache_dir={tmp_path / 'cache'}", "--set",
                 "head.units=[16]")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "raw"
    assert read_run_info(run_dir)["calibration"] == {"method": "none"}
    pixels, _ = reference_pixels(run_dir)
    raw = load_run_model(run_dir).predict(pixels, verbose=0)
    np.testing.assert_array_equal(open_model(run_dir, keras=True).model.predict(pixels, verbose=0), raw)
    version = export_run(run_dir, root=tmp_path / "models", name="raw", formats="keras", echo=None)["path"]
    assert (version / "model.keras").read_bytes() == (run_dir / "model.keras").read_bytes()
    assert read_card(version)["calibration"] == {"method": "none"}

    bad = cli("train", tiny_config.data.root, "--calibration", "platt")
    assert bad.exit_code != 0 and "temperature" in bad.output and "Traceback" not in bad.output


def test_evaluate_reports_ece_mce_nll_brier_before_and_after_and_the_report_shows_the_diagram(tmp_path, sample_dir):
    from factories import make_run_dir, reference_pixels, small_config
    from tl_app.insight.evaluate import calibration_section, evaluate
    from tl_app.insight.report import calibration_body
    from tl_app.models.opener import load_run_model
    from tl_app.training.runs import write_run_info

    config = small_config(tmp_path, sample_dir, backbone="vgg16")
    run_dir = make_run_dir(config)
    pixels, records = reference_pixels(run_dir)
    classes = json.loads((run_dir / "run.json").read_text())["classes"]
    labels = np.array([classes.index(r.label) for r in records])
    raw = load_run_model(run_dir).predict(pixels, verbose=0)

    plain, curves = calibration_section(raw, labels, None)  # a model without temperature: one curve
    assert plain["method"] == "none" and plain["after"] is None and len(curves) == 1

    write_run_info(run_dir, calibration={"method": "temperature", "temperature": 0.25})  # sharpen: ECE moves
    metrics = evaluate(run_dir, split="all", out_dir=tmp_path / "calibrated", top_losses=2, echo=None)
    calibration = metrics["calibration"]
    expected_before = calibration_figures(raw, labels)
    expected_after = calibration_figures(scale_probabilities(raw, 0.25), labels)
    for key in ("ece", "mce", "nll", "brier", "accuracy"):
        assert calibration["before"][key] == pytest.approx(expected_before[key], abs=1e-4), key
        assert calibration["after"][key] == pytest.approx(expected_after[key], abs=1e-4), key
    assert calibration["after"]["nll"] != pytest.approx(calibration["before"]["nll"], abs=1e-3)
    assert calibration["after"]["accuracy"] == calibration["before"]["accuracy"]
    diagram = Path(metrics["files"]["reliability_diagram.png"])
    assert diagram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = calibration_body(metrics)
    assert "data:image/png;base64," in html and f"{calibration['after']['ece']:.4f}" in html
    assert f"{calibration['before']['ece']:.4f}" in html and "0.250" in html
    # selective prediction on the same probabilities: the figures and the curve's PNG, shown in the report
    expected = risk_coverage(scale_probabilities(raw, 0.25), labels)
    assert metrics["selective"]["aurc"] == pytest.approx(expected["aurc"], abs=1e-4)
    assert metrics["selective"]["accuracy_at_coverage"]["1.00"] == pytest.approx(expected_after["accuracy"])
    curve = Path(metrics["files"]["risk_coverage.png"])
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("data:image/png;base64,") == 2 and "AURC" in html


def test_risk_coverage_on_a_hand_example():
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong): kept most confident first
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 0])
    curve = risk_coverage(p, labels)
    assert curve["accuracy"] == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert curve["coverage"] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert curve["at"]["1.00"] == 0.5 and curve["at"]["0.50"] == 0.5 and curve["at"]["0.90"] == 0.5
    assert curve["aurc"] == pytest.approx(np.mean([0.0, 0.5, 1 / 3, 0.5]))
    # a ranking that rejects the wrong answers first keeps only right ones at half coverage
    oracle = risk_coverage(p, labels, scores=np.array([0.0, 1.0, 0.0, 1.0]))
    assert oracle["at"]["0.50"] == 1.0 and oracle["aurc"] < curve["aurc"]
    assert risk_coverage(np.zeros((0, 2)), np.zeros(0, int))["images"] == 0


def test_out_of_fold_probabilities_come_from_models_that_never_saw_the_row_and_fit_the_same_temperature():
    """The folds are stratified and seeded, each row is scored once by a model fitted without it, and a
    temperature fitted on those probabilities undoes the 4x over-confidence as one fitted on validation does."""
    from tl_app.training.calibration import out_of_fold_probabilities, stratified_folds, uses_out_of_fold

    _, x, labels = overconfident_model_and_data()
    x, labels = x[:300].astype(np.float64), labels[:300]
    seen = []

    def fit_predict(fit_rows, held_rows):  # class means from the fitted rows only: Bayes logits x 4
        seen.append((set(fit_rows.tolist()), set(held_rows.tolist())))
        centres = np.stack([x[fit_rows][labels[fit_rows] == c].mean(0) for c in range(3)])
        logits = 4.0 * (x[held_rows] @ centres.T - 0.5 * np.sum(centres ** 2, axis=1))
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    oof = out_of_fold_probabilities(fit_predict, labels, 3, seed=7)
    assert oof["folds"] == 5 and len(seen) == 5
    held = [h for _, h in seen]
    assert all(not (f & h) for f, h in seen) and sorted(i for h in held for i in h) == list(range(300))
    folds = stratified_folds(labels, 5, seed=7)
    for c in range(3):  # each class spread over the folds within one image
        counts = np.bincount(folds[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(folds, stratified_folds(labels, 5, seed=7))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=8))

    record = calibration_record("temperature", oof["probabilities"][:20], labels[:20], out_of_fold=oof)
    assert record["fitted_on"] == "oof" and record["folds"] == 5 and record["oof_images"] == 300
    assert record["temperature"] == pytest.approx(fit_temperature(oof["probabilities"], labels))
    assert 2.5 < record["temperature"] < 6.0  # the logits were scaled by 4
    assert record["oof"]["after"]["nll"] < record["oof"]["before"]["nll"] - 0.05
    assert record["images"] == 20 and record["before"]["images"] == 20  # the validation figures stay validation's
    # the switch: small validation and temperature only; 0 turns it off; too few images to fit stays "none"
    assert uses_out_of_fold("temperature", 38, 200) and not uses_out_of_fold("temperature", 200, 200)
    assert not uses_out_of_fold("temperature", 38, 0) and not uses_out_of_fold("none", 38, 200)
    assert not uses_out_of_fold("temperature", 1, 200)


@pytest.mark.slow
def test_a_bottleneck_run_with_small_validation_fits_its_temperature_out_of_fold_and_0_turns_it_off(tiny_config):
    from tl_app.core.config import Config
    from tl_app.core.errors import ConfigError
    from tl_app.models.artifacts import read_run_info
    from tl_app.training.bottleneck import train_bottleneck

    tiny_config.backbone.name = "vgg16"
    tiny_config.train.ood = "none"
    lines = []
    summary = train_bottleneck(tiny_config, echo=lines.append)
    record = read_run_info(Path(summary["run_dir"]))["calibration"]
    metrics = summary["metrics"]
    assert 0 < metrics["val_images"] < tiny_config.train.calibration_oof_below  # the sample's split is small
    assert record["fitted_on"] == "oof" and record["folds"] == 5
    assert record["oof_images"] == metrics["train_images"] + metrics["val_images"]
    assert record["oof"]["before"]["images"] == record["oof_images"]
    assert math.isfinite(record["temperature"]) and record["temperature"] > 0
    assert record["oof"]["after"]["nll"] <= record["oof"]["before"]["nll"]
    assert record["images"] == metrics["val_images"] == record["before"]["images"]  # evaluate's figures: val
    assert any("out-of-fold" in str(line) and "5 folds" in str(line) for line in lines)

    tiny_config.train.calibration_oof_below = 0
    tiny_config.train.name = "val-only"
    lines.clear()
    summary = train_bottleneck(tiny_config, echo=lines.append)
    record = read_run_info(Path(summary["run_dir"]))["calibration"]
    assert record["fitted_on"] == "val" and "oof" not in record and "folds" not in record
    assert record["images"] == summary["metrics"]["val_images"]
    assert any("fitted on" in str(line) and "validation images" in str(line) and "out-of-fold" not in str(line)
               for line in lines)
    with pytest.raises(ConfigError, match="calibration_oof_below"):
        Config().with_overrides({"train.calibration_oof_below": -1})
