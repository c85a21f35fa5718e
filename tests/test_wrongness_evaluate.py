"""Issue 13, items 4 and 11: evaluate scores what it says, on the run's own split membership."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from tl_app.insight.evaluate import classification_metrics, evaluate


def test_macro_means_skip_classes_absent_from_the_split_as_scikit_learn_does():
    """Six classes, the evaluated split holds two: macro F1 is theirs, not diluted by four zeros."""
    classes = [f"c{i}" for i in range(6)]
    y_true = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    y_pred = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    probs = np.eye(6)[y_pred] * 0.9 + 0.1 / 6
    ours = classification_metrics(y_true, probs, classes)
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (ours["macro"]["precision"], ours["macro"]["recall"], ours["macro"]["f1"]) == pytest.approx((p, r, f))
    assert ours["macro"]["f1"] == pytest.approx(0.75) and ours["macro"]["classes"] == 2


@pytest.fixture(scope="module")
def run_on_a_copy(tmp_path_factory, sample_dir):
    """A run trained (untrained head) on a private copy of the sample folder, so the test may change it."""
    from factories import make_run_dir, small_config

    base = tmp_path_factory.mktemp("changing")
    data = base / "data"
    shutil.copytree(sample_dir, data)
    config = small_config(base, data)
    config.data.val_fraction = 0.25
    return make_run_dir(config), data


def test_evaluate_uses_the_runs_split_and_reports_how_the_folder_changed(run_on_a_copy, tmp_path):
    from tl_app.data.manifest import Manifest

    run_dir, data = run_on_a_copy
    trained = Manifest.load(run_dir / "manifest.json")
    val = {r.relpath for r in trained.split("val")}
    train = sorted(r.relpath for r in trained.split("train"))
    # copies of training images under new names: a fresh scan could put them in val
    for k, relpath in enumerate(train[:10]):
        label, name = relpath.split("/")
        shutil.copy(data / relpath, data / label / f"aaa_copy_{k}_{name}")
    new_image = data / "circles" / "zz_brand_new.png"
    Image.new("RGB", (40, 30), (12, 34, 56)).save(new_image)
    (data / sorted(val)[0]).unlink()
    metrics = evaluate(run_dir, out_dir=tmp_path / "e", echo=None)
    assert metrics["split"] == "val" and metrics["splits_from"] == "the run's manifest"
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    scored = {row["path"][len(str(data)) + 1:] for row in rows}
    assert scored == val - {sorted(val)[0]}  # no training image, no copy of one, nothing new
    assert metrics["data_changes"] == {"new": 1, "gone": 1, "changed": 0}
    assert "nll" in metrics and "loss" not in metrics
