"""Test-time augmentation (predict/evaluate/export --tta N), and the warning for fine-tuning-only settings.

One real run (VGG16, random weights, 32 px, a trained dense head with its
temperature and k-NN OOD scorer) serves every test; views are rebuilt by hand
with numpy and tf.image, independently of tl_app.models.tta.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from factories import reference_pixels


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sample_dir):
    """A bottleneck run with everything a served model carries: head, temperature, OOD scorer."""
    from factories import small_config
    from tl_app.training.bottleneck import train_bottleneck

    base = tmp_path_factory.mktemp("tta")
    config = small_config(base, sample_dir, backbone="vgg16")
    config.train.name = "tta"
    config.train.epochs = 3
    config.train.batch_size = 8
    config.data.batch_size = 8
    config.train.calibration_oof_below = 0  # the temperature on validation alone: one head, seconds sooner
    summary = train_bottleneck(config, echo=None)
    return {"run_dir": Path(summary["run_dir"]), "base": base, "config": config}


def read_rows(path) -> dict:
    """path -> ({class: probability}, label, ood_score) from predict's CSV."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            probs, k = {}, 1
            while f"label_{k}" in row:
                if row[f"label_{k}"]:
                    probs[row[f"label_{k}"]] = float(row[f"probability_{k}"])
                k += 1
            rows[row["path"]] = (probs, row.get("label"), float(row["ood_score"]) if row.get("ood_score") else None)
    return rows


def by_hand_views(images: np.ndarray, count: int) -> list[np.ndarray]:
    """The documented order, built with numpy and tf.image: image, flip, centre crop, corner crops, flipped crops."""
    import tensorflow as tf

    size = images.shape[1]
    side = int(round(0.875 * size))
    far = size - side
    boxes = [(far // 2, far // 2), (0, 0), (0, far), (far, 0), (far, far)]  # centre, TL, TR, BL, BR (top, left)
    crops = [tf.image.resize(images[:, t:t + side, l:l + side, :], (size, size), method="bilinear").numpy()
             for t, l in boxes]
    views = [images, images[:, :, ::-1, :]] + crops + [c[:, :, ::-1, :] for c in crops]
    return views[:count]


def test_predict_and_evaluate_tta_are_the_mean_of_the_model_over_the_views_built_by_hand(trained_run, tmp_path):
    from tl_app.inference import predict_paths
    from tl_app.insight.evaluate import evaluate
    from tl_app.models.opener import open_model

    run_dir = trained_run["run_dir"]
    pixels, records = reference_pixels(run_dir, "val")
    paths = [r.path for r in records]
    out = tmp_path / "tta5.csv"
    predict_paths(run_dir, paths, out=out, top_k=3, tta=5, echo=None, progress=False)
    rows = read_rows(out)

    single = open_model(run_dir)  # today's single pass: temperature and OOD score included
    classes = single.classes
    views = [single.outputs(v) for v in by_hand_views(pixels, 5)]
    expected = np.mean([v["probabilities"] for v in views], axis=0)
    plain = views[0]["probabilities"]
    assert np.max(np.abs(expected - plain)) > 1e-3  # the views change the answer: the test can tell them apart
    for i, path in enumerate(paths):
        probs, label, score = rows[path]
        got = np.array([probs[c] for c in classes])
        np.testing.assert_allclose(got, expected[i], atol=2e-6)
        # the OOD score is the image's own (first view), as training's threshold measured it
        assert score == pytest.approx(float(views[0]["ood_score"][i]), rel=1e-5, abs=1e-6)
        assert label in classes + ["unknown"]

    metrics = evaluate(run_dir, split="val", out_dir=tmp_path / "evaluation", echo=None, tta=5)
    assert metrics["tta"] == {"views": 5, "order": ["image", "flip", "crop-centre", "crop-top-left", "crop-top-right"]}
    with open(tmp_path / "evaluation" / "predictions.csv", newline="", encoding="utf-8") as handle:
        p_true = {row["path"]: float(row["p_true"]) for row in csv.DictReader(handle)}
    for i, record in enumerate(records):
        assert p_true[record.path] == pytest.approx(expected[i][classes.index(record.label)], abs=2e-6)


def test_tta_1_answers_exactly_as_before(trained_run, tmp_path, cli):
    from tl_app.inference import predict_paths
    from tl_app.models.tta import tta_function

    run_dir = trained_run["run_dir"]
    paths = [r.path for r in reference_pixels(run_dir, "val")[1]]
    plain, one = tmp_path / "plain.csv", tmp_path / "one.csv"
    predict_paths(run_dir, paths, out=plain, echo=None, progress=False)  # as predict was called before --tta
    assert cli("predict", run_dir, *paths, "--out", one, "-q", "--tta", "1").exit_code == 0
    assert plain.read_bytes() == one.read_bytes()
    run = lambda images: images  # noqa: E731
    assert tta_function(run, 1) is run  # one view is the very function, not an average of one


def test_exported_tta_answers_as_predict_tta_and_records_it(trained_run, tmp_path):
    import tensorflow as tf

    from tl_app.core.errors import ConfigError, TlAppError
    from tl_app.export.exporter import export_run
    from tl_app.inference import predict_paths
    from tl_app.models.artifacts import PIXELS_SIGNATURE
    from tl_app.training.class_edit import edit_classes

    run_dir = trained_run["run_dir"]
    result = export_run(run_dir, root=tmp_path / "models", name="tta", formats="savedmodel,keras", echo=None, tta=5)
    version = result["path"]
    card = json.loads((version / "model_card.json").read_text())
    assert card["tta"]["views"] == 5 and card["tta"]["order"][:3] == ["image", "flip", "crop-centre"]
    assert {"savedmodel", "savedmodel_bytes", "keras", "savedmodel_ood_score"} <= set(card["parity"])

    pixels, records = reference_pixels(run_dir, "val")
    paths = [r.path for r in records]
    predict_paths(run_dir, paths, out=tmp_path / "python.csv", top_k=3, tta=5, echo=None, progress=False)
    predict_paths(version, paths, out=tmp_path / "graph.csv", top_k=3, echo=None, progress=False)  # SavedModel
    python_rows, graph_rows = read_rows(tmp_path / "python.csv"), read_rows(tmp_path / "graph.csv")
    for path in paths:
        (p1, label1, score1), (p2, label2, score2) = python_rows[path], graph_rows[path]
        assert p1.keys() == p2.keys() and label1 == label2
        np.testing.assert_allclose([p1[c] for c in p1], [p2[c] for c in p1], atol=1e-5)
        assert score1 == pytest.approx(score2, rel=1e-4, abs=1e-5)

    # what a TF Serving client gets from the signature equals the Python path's average
    served = tf.saved_model.load(str(version)).signatures[PIXELS_SIGNATURE](images=tf.constant(pixels))
    for i, path in enumerate(paths):
        np.testing.assert_allclose(served["probabilities"].numpy()[i],
                                   [python_rows[path][0][c] for c in card["classes"]], atol=1e-5)

    with pytest.raises(ConfigError, match="already averages 5 views"):
        predict_paths(version, paths, out=tmp_path / "twice.csv", tta=3, echo=None, progress=False)
    with pytest.raises(TlAppError, match="exported with --tta 5"):  # classes edits would drop the views unsaid
        edit_classes(version, remove="circles", echo=None, extractor_class=None)


@pytest.mark.parametrize("args, key", [
    (("predict", "{run}", "{data}", "--tta", "0"), "predict.tta = 0"),
    (("predict", "{run}", "{data}", "--set", "predict.tta=13"), "predict.tta = 13"),
    (("evaluate", "{run}", "--tta", "20"), "predict.tta = 20"),
    (("export", "{run}", "--tta", "-1"), "export.tta = -1"),
])
def test_a_number_of_views_out_of_range_is_a_clear_usage_error(trained_run, cli, args, key):
    args = [a.format(run=trained_run["run_dir"], data=trained_run["config"].data.root) for a in args]
    result = cli(*args)
    assert result.exit_code != 0
    assert key in result.output and "allowed: [1, 12]" in result.output and "flip" in result.output
    assert "Traceback" not in result.output


def test_tta_in_a_pipeline_file(tmp_path):
    from tl_app.core.config import load_config
    from tl_app.core.errors import ConfigError

    good = tmp_path / "good.toml"
    good.write_text("[predict]\ntta = 7\n\n[export]\ntta = 2\n")
    config = load_config(good)
    assert (config.predict.tta, config.export.tta) == (7, 2)
    bad = tmp_path / "bad.toml"
    bad.write_text("[predict]\ntta = 2.5\n")
    with pytest.raises(ConfigError, match="predict.tta must be int"):
        load_config(bad)


def test_bottleneck_training_warns_that_fine_tuning_options_are_ignored(sample_dir, tmp_path, cli):
    from tl_app.core.config import Config, ignored_by_strategy

    result = cli("train", sample_dir, "--strategy", "bottleneck", "--backbone", "vgg16", "--weights", "none",
                 "--input-size", "32", "--epochs", "1", "--name", "warned",
                 "--set", f"train.runs_dir={tmp_path / 'runs'}", "--set", f"features.cache_dir={tmp_path / 'cache'}",
                 "--set", "head.units=[8]", "--set", "train.calibration=none", "--set", "train.ood=none",
                 "--set", "train.mixup=0.2", "--set", "train.ema=true")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: train.")]
    assert warnings == ["warning: train.ema = True, train.mixup = 0.2 apply only to --strategy finetune; ignored "
                        "with --strategy bottleneck"]
    finetune = Config.from_dict({"train": {"strategy": "finetune", "mixup": 0.2, "ema": True}})
    assert ignored_by_strategy(finetune) == [] and ignored_by_strategy(Config()) == []
    assert ignored_by_strategy(Config.from_dict({"train": {"strategy": "metric", "lr_decay_per_block": 0.5}})) == [
        "train.lr_decay_per_block = 0.5"]
