"""tl-app evaluate: metrics that agree with scikit-learn, and every artifact on disk."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm


from tl_app.core.errors import TlAppError
from tl_app.insight.evaluate import classification_metrics, evaluate, most_confused
from tl_app.models.opener import open_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_dir):
    """One real run directory (untrained head) shared by this module's tests."""
    from factories import make_run_dir, small_config

    config = small_config(tmp_path_factory.mktemp("eval"), sample_dir)
    return make_run_dir(config)


def sklearn_check(y_true, probs, classes, top_k):
    ours = classification_metrics(y_true, probs, classes, top_k)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert ours["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y_true, probs, k=ours["top_k"],
                                                                            labels=labels))
    for i, name in enumerate(classes):
        row = ours["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    for average in ("macro", "weighted"):  # scikit-learn's default labels: the classes that occur
        ap, ar, af, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert (ours[average]["precision"], ours[average]["recall"], ours[average]["f1"]) == pytest.approx((ap, ar, af))
    assert ours["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return ours


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(6)]
    y_true = rng.integers(0, 5, 200)  # class c5 never occurs: zero support, zero division
    logits = rng.normal(size=(200, 6)) + 2.0 * np.eye(6)[y_true] * rng.uniform(size=(200, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ours = sklearn_check(y_true, probs, classes, top_k=3)
    assert ours["per_class"]["c5"]["support"] == 0


def test_most_confused_pairs_are_the_largest_off_diagonal_cells():
    matrix = np.array([[5, 3, 0], [1, 6, 4], [0, 0, 9]])
    pairs = most_confused(matrix, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("b", "c", 4), ("a", "b", 3), ("b", "a", 1)]
    assert pairs[1]["fraction_of_true"] == pytest.approx(3 / 8)


def test_evaluate_writes_every_artifact_and_agrees_with_scikit_learn(run_dir, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate(run_dir, split="all", out_dir=out, top_k=2, echo=None)
    assert metrics["count"] == 36 and metrics["split"] == "all"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["accuracy"] == metrics["accuracy"]
    # recompute from the per-image predictions with scikit-learn
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    classes = metrics["classes"]
    y_true = np.array([classes.index(r["true"]) for r in rows])
    y_pred = np.array([classes.index(r["predicted"]) for r in rows])
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert [metrics["per_class"][c]["f1"] for c in classes] == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=range(3), average=None, zero_division=0))
    assert metrics["nll"] == pytest.approx(np.mean([float(r["loss"]) for r in rows]), rel=1e-4)
    # confusion matrices: CSV raw and normalised, PNG both
    raw = list(csv.reader(open(out / "confusion_matrix.csv")))
    assert raw[0][1:] == classes and np.array(raw[1:])[:, 1:].astype(int).sum() == 36
    normalised = np.array(list(csv.reader(open(out / "confusion_matrix_normalized.csv")))[1:])[:, 1:].astype(float)
    assert normalised.sum(axis=1) == pytest.approx(np.ones(3))
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "top_losses.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    assert len(metrics["top_losses"]) == 16
    losses = [t["loss"] for t in metrics["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    assert isinstance(metrics["most_confused"], list)


def test_default_split_is_validation_for_the_training_folder(run_dir, tmp_path):
    from tl_app.data.manifest import Manifest

    metrics = evaluate(run_dir, out_dir=tmp_path / "e", echo=None)
    val = Manifest.load(run_dir / "manifest.json").split("val")
    assert metrics["split"] == "val" and metrics["count"] == len(val)


def test_bad_files_are_reported_not_fatal(run_dir, sample_dir, tmp_path):
    data = tmp_path / "holdout"
    for label in ("circles", "squares"):
        (data / label).mkdir(parents=True)
        for path in sorted((sample_dir / label).iterdir())[:3]:
            shutil.copy(path, data / label / path.name)
    (data / "circles" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (data / "squares" / "empty.png").write_bytes(b"")
    (data / "unknown_class").mkdir()
    shutil.copy(next((sample_dir / "triangles").iterdir()), data / "unknown_class" / "t.jpg")
    metrics = evaluate(run_dir, data, out_dir=tmp_path / "e", echo=None)
    assert metrics["split"] == "all" and metrics["count"] == 6  # a new folder: every image
    reasons = {Path(s["path"]).name: s["reason"] for s in metrics["skipped"]}
    assert set(reasons) == {"broken.jpg", "empty.png", "t.jpg"}
    assert "not a class of the model" in reasons["t.jpg"]
    skipped_csv = list(csv.DictReader(open(tmp_path / "e" / "skipped.csv")))
    assert len(skipped_csv) == 3


def test_an_exported_model_folder_can_be_evaluated(run_dir, tmp_path):
    version = tmp_path / "saved_models" / "shapes" / "3"
    version.mkdir(parents=True)
    shutil.copy(run_dir / "model.keras", version / "model.keras")
    info = json.loads((run_dir / "run.json").read_text())
    (version / "model_card.json").write_text(json.dumps({
        "classes": info["classes"], "input_size": 32, "resize_policy": "center_crop", "backbone": "resnet50"}))
    loaded = open_model(tmp_path / "saved_models" / "shapes")  # newest version found
    assert loaded.source == version and loaded.classes == info["classes"]
    metrics = evaluate(tmp_path / "saved_models" / "shapes", info["data_root"], split="all",
                       out_dir=tmp_path / "e", echo=None)
    assert metrics["count"] == 36


def test_an_export_is_evaluated_with_the_data_settings_of_its_run(run_dir, tmp_path):
    """The card carries the run's config: its split fractions decide which images are 'val'."""
    from tl_app.core.config import Config, DataConfig
    from tl_app.data.scan import scan

    info = json.loads((run_dir / "run.json").read_text())
    config = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    config.data.val_fraction = 0.5
    version = tmp_path / "saved_models" / "shapes" / "1"
    version.mkdir(parents=True)
    shutil.copy(run_dir / "model.keras", version / "model.keras")
    (version / "model_card.json").write_text(json.dumps({
        "classes": info["classes"], "input_size": 32, "resize_policy": "center_crop", "backbone": "resnet50",
        "data_root": info["data_root"], "config": config.to_dict()}))
    metrics = evaluate(version, info["data_root"], out_dir=tmp_path / "e", echo=None)
    wide = scan(info["data_root"], DataConfig(val_fraction=0.5)).split("val")
    narrow = scan(info["data_root"], DataConfig()).split("val")
    assert metrics["split"] == "val" and metrics["count"] == len(wide) > len(narrow)


def test_user_mistakes_are_clear_errors(run_dir, tmp_path, sample_dir):
    with pytest.raises(TlAppError, match="does not exist"):
        evaluate(tmp_path / "nope", sample_dir, echo=None)
    other = tmp_path / "other" / "dogs"
    other.mkdir(parents=True)
    shutil.copy(next((sample_dir / "circles").iterdir()), other / "a.jpg")
    with pytest.raises(TlAppError, match="None of the classes"):
        evaluate(run_dir, tmp_path / "other", echo=None)
    with pytest.raises(TlAppError, match="No images in split 'test'"):
        evaluate(run_dir, split="test", out_dir=tmp_path / "e", echo=None)


def test_cli_evaluate_prints_the_table_and_json(run_dir, cli, tmp_path):
    result = cli("evaluate", run_dir, "--split", "all", "--out", tmp_path / "c", "--top-k", "2")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "precision" in result.output and "circles" in result.output
    result = cli("evaluate", run_dir, "--split", "all", "--out", tmp_path / "c", "--json")
    assert json.loads(result.output)["count"] == 36
