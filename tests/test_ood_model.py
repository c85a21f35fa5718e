"""The OOD scorer a model carries: fitted by training, exported in the graph, answered by predict and the server.

One tiny bottleneck run (VGG16, random weights, 32 px) trained with the default
``train.ood`` (knn), exported as SavedModel + .keras; noise images written
to disk at the input size (full-range pixels: a resize would smooth them into
the shapes' range, where neither random nor hed-vgg16 features at 32 px tell them
apart) must come back "unknown" through `tl-app predict` and a real server on
loopback, while the training shapes are mostly accepted.
"""

from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factories import small_config  # noqa: E402

NOISE_IMAGES = 12


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory, sample_dir, hed_vgg16_weights):
    """{run_dir, version_dir, noise: [paths], inside: [paths]}: trained with the default train.ood (knn), exported."""
    from PIL import Image

    from tl_app import api
    from tl_app.export.exporter import export_run

    base = tmp_path_factory.mktemp("ood-model")
    config = small_config(base, sample_dir, backbone="vgg16")
    config.backbone.weights = "hed-vgg16"  # pretrained features: what the k-NN scorer is for
    config.train.strategy, config.train.epochs, config.train.batch_size = "bottleneck", 2, 8
    assert config.train.ood == "knn"  # the default
    run_dir = Path(api.train(config, echo=None)["run_dir"])
    exported = export_run(run_dir, root=base / "saved_models", name="shapes", formats="savedmodel,keras", echo=None)
    noise_dir = base / "noise"
    noise_dir.mkdir()
    rng = np.random.default_rng(7)
    for k in range(NOISE_IMAGES):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise_dir / f"noise_{k}.png")
    inside = sorted(str(p) for p in Path(sample_dir).rglob("*.png"))
    return {"run_dir": run_dir, "version_dir": Path(exported["path"]), "root": base / "saved_models",
            "noise": sorted(str(p) for p in noise_dir.iterdir()), "inside": inside, "base": base,
            "parity": exported["parity"]}


def test_training_stores_the_scorer_and_a_threshold_accepting_95_percent_of_validation(ood_run):
    from tl_app.models.ood import OOD_FILE, load_scorer

    info = json.loads((ood_run["run_dir"] / "run.json").read_text())
    record = info["ood"]
    # the threshold comes from the validation images and the training images scored without themselves
    assert record["method"] == "knn" and record["threshold_on"] == "val+train (leave-one-out)"
    assert record["acceptance"] == 0.95 and record["threshold_images"] == record["train_images"] + 5
    assert record["accepted"] >= 0.95
    scorer = load_scorer(ood_run["run_dir"] / OOD_FILE)
    assert scorer.bank.shape == (record["train_images"], record["dim"]) and scorer.k == record["k"]
    assert np.allclose(np.linalg.norm(scorer.bank, axis=1), 1.0, atol=1e-5)  # unit rows: cosine by a product
    card = json.loads((ood_run["version_dir"] / "model_card.json").read_text())
    assert card["ood"]["threshold"] == pytest.approx(record["threshold"]) and "ood_score" in \
        card["signatures"]["outputs"]


def test_exported_ood_score_equals_the_keras_models_within_the_parity_tolerance(ood_run):
    import keras
    import tensorflow as tf

    from tl_app.export.parity import SCORE_TOLERANCE
    from tl_app.models.artifacts import PIXELS_SIGNATURE
    from tl_app.models.opener import open_model

    parity = ood_run["parity"]
    for key in ("savedmodel_ood_score", "savedmodel_bytes_ood_score", "keras_ood_score"):
        assert parity[key]["max_rel_diff"] <= SCORE_TOLERANCE, parity
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    reference = open_model(ood_run["run_dir"]).outputs(pixels)  # the run folder: Keras, scorer from ood.npz
    saved = tf.saved_model.load(str(ood_run["version_dir"]))
    got = saved.signatures[PIXELS_SIGNATURE](images=tf.constant(pixels))
    keras_file = keras.saving.load_model(ood_run["version_dir"] / "model.keras", compile=False)(pixels)
    for score in (got["ood_score"].numpy(), keras_file["ood_score"].numpy()):
        gap = np.abs(score - reference["ood_score"]) / np.maximum(1.0, np.abs(reference["ood_score"]))
        assert gap.max() <= SCORE_TOLERANCE
    np.testing.assert_allclose(got["probabilities"].numpy(), reference["probabilities"], atol=1e-4)
    threshold = json.loads((ood_run["run_dir"] / "run.json").read_text())["ood"]["threshold"]
    assert list(got["unknown"].numpy()) == list(reference["ood_score"] > threshold)


def test_tflite_and_onnx_answer_the_same_score_and_verdict_as_keras(ood_run, tmp_path):
    from PIL import Image

    from tl_app.export.converters import onnx_outputs, tflite_outputs
    from tl_app.export.exporter import export_run
    from tl_app.models.opener import open_model

    result = export_run(ood_run["run_dir"], root=tmp_path, name="converted", formats="tflite,onnx", echo=None)
    for fmt in ("tflite", "onnx"):  # the gate compared score and verdict before publishing
        assert result["parity"][f"{fmt}_ood_score"]["max_rel_diff"] <= 1e-4, result["parity"]
        assert result["parity"][f"{fmt}_unknown"]["agreement"] == 1.0, result["parity"]
    paths = ood_run["noise"] + ood_run["inside"][:12]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)), np.float32) for p in paths])
    reference = open_model(ood_run["run_dir"]).outputs(pixels)
    threshold = json.loads((ood_run["run_dir"] / "run.json").read_text())["ood"]["threshold"]
    expected = reference["ood_score"] > threshold
    assert expected[:NOISE_IMAGES].mean() >= 0.9  # noise is what the verdict must catch
    for out in (tflite_outputs(result["path"] / "model.tflite", pixels),
                onnx_outputs(result["path"] / "model.onnx", pixels)):
        np.testing.assert_allclose(out["probabilities"], reference["probabilities"], atol=1e-4)
        np.testing.assert_allclose(out["ood_score"], reference["ood_score"], rtol=1e-4, atol=1e-5)
        assert out["unknown"].dtype == bool and list(out["unknown"]) == list(expected)
    card = json.loads((result["path"] / "model_card.json").read_text())
    assert card["signatures"]["converted"]["outputs"] == ["probabilities", "ood_score", "unknown"]
    assert "cosine" in card["signatures"]["outputs"]["ood_score"]  # the knn scorer, in its own words


def test_the_parity_gate_refuses_a_converted_model_whose_verdict_or_score_is_wrong(ood_run):
    from tl_app.core.errors import ExportError
    from tl_app.export.converters import tflite_outputs
    from tl_app.export.exporter import export_run
    from tl_app.export.parity import golden_set, parity_gate, source_images
    from tl_app.models.calibration import recorded_temperature, with_temperature
    from tl_app.models.artifacts import read_run_info
    from tl_app.models.ood import recorded_ood, with_ood
    from tl_app.models.opener import load_run_model

    run_dir = ood_run["run_dir"]
    info = read_run_info(run_dir)
    model, temperature = load_run_model(run_dir), recorded_temperature(info)
    model = with_ood(model if temperature is None else with_temperature(model, temperature), *recorded_ood(info, run_dir))
    policy = info.get("resize_policy") or "center_crop"
    version = export_run(run_dir, root=ood_run["base"] / "gate", name="g", formats="tflite", echo=None)["path"]
    golden = golden_set(source_images(run_dir)[0])

    def flipped(pixels):  # a converter that lost the threshold: every verdict inverted
        out = tflite_outputs(version / "model.tflite", pixels)
        return {**out, "unknown": ~out["unknown"]}

    def unscored(pixels):  # a converter that dropped the scorer
        out = tflite_outputs(version / "model.tflite", pixels)
        return {"probabilities": out["probabilities"]}

    good = parity_gate(model, golden, 32, policy, (255, 255, 255),
                       runners={"tflite": lambda p: tflite_outputs(version / "model.tflite", p)})
    assert good["tflite_unknown"]["agreement"] == 1.0
    with pytest.raises(ExportError, match="tflite: unknown disagrees"):
        parity_gate(model, golden, 32, policy, (255, 255, 255), runners={"tflite": flipped})
    with pytest.raises(ExportError, match="tflite: no ood_score output"):
        parity_gate(model, golden, 32, policy, (255, 255, 255), runners={"tflite": unscored})


def test_mahalanobis_is_the_other_scorer_and_its_export_passes_the_same_gate(tmp_path, sample_dir):
    from tl_app import api
    from tl_app.export.exporter import export_run
    from tl_app.export.parity import SCORE_TOLERANCE
    from tl_app.models.ood import OOD_FILE, load_scorer

    config = small_config(tmp_path, sample_dir, backbone="vgg16")
    config.train.strategy, config.train.epochs, config.train.batch_size = "bottleneck", 1, 8
    config.train.ood = "mahalanobis"
    run_dir = Path(api.train(config, echo=None)["run_dir"])
    record = json.loads((run_dir / "run.json").read_text())["ood"]
    assert record["method"] == "mahalanobis" and 0 < record["shrinkage"] <= 1
    scorer = load_scorer(run_dir / OOD_FILE)
    assert scorer.means.shape == (3, record["dim"]) and scorer.precision.shape == (record["dim"], record["dim"])
    parity = export_run(run_dir, root=tmp_path / "saved_models", name="m", formats="savedmodel,keras",
                        echo=None)["parity"]
    for key in ("savedmodel_ood_score", "keras_ood_score"):
        assert parity[key]["max_rel_diff"] <= SCORE_TOLERANCE, parity


def test_predict_marks_noise_images_unknown_and_accepts_most_training_images(ood_run, cli, tmp_path):
    out = tmp_path / "preds.jsonl"
    result = cli("predict", ood_run["version_dir"], *ood_run["noise"], *ood_run["inside"], "--out", out, "-q")
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}
    noise = [rows[p] for p in ood_run["noise"]]
    inside = [rows[p] for p in ood_run["inside"]]
    assert all(r["label"] == "unknown" and r["top_class"] in ("circles", "squares", "triangles") for r in noise)
    assert np.mean([r["unknown"] for r in noise]) >= 0.9
    assert np.mean([not r["unknown"] for r in inside]) >= 0.8  # 95% of validation at the threshold
    accepted = next(r for r in inside if not r["unknown"])
    assert accepted["label"] == accepted["top_class"] == accepted["predictions"][0]["label"]

    # CSV: the same verdicts in three more columns; the run folder answers as its export
    csv_out = tmp_path / "preds.csv"
    assert cli("predict", ood_run["run_dir"], *ood_run["noise"], "--out", csv_out, "-q").exit_code == 0
    table = list(csv.DictReader(csv_out.open()))
    assert [r["unknown"] for r in table] == ["true"] * NOISE_IMAGES and all(r["label"] == "unknown" for r in table)
    for row in table:
        assert float(row["ood_score"]) == pytest.approx(rows[row["path"]]["ood_score"], rel=1e-4)


def test_evaluate_ood_folder_measures_the_models_own_scorer_at_its_threshold(ood_run, cli, tmp_path):
    from tl_app.insight.report import ood_body

    noise_dir = Path(ood_run["noise"][0]).parent
    result = cli("evaluate", ood_run["run_dir"], "--split", "all", "--top-losses", 1, "--out", tmp_path / "eval",
                 "--ood-folder", noise_dir, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{"):])["ood"]
    own = figures["model"]
    threshold = json.loads((ood_run["run_dir"] / "run.json").read_text())["ood"]["threshold"]
    assert own["method"] == "knn" and own["model_threshold"] == pytest.approx(threshold)
    assert own["ood_images"] == NOISE_IMAGES and own["auroc"] >= 0.95
    # what predict answers: every noise image unknown, most of the sample accepted
    assert own["ood_accepted_at_model_threshold"] == 0.0 and own["in_accepted_at_model_threshold"] >= 0.8
    assert "own (knn)" in ood_body(figures)


def test_the_server_answers_unknown_for_noise_over_rest_predict_and_upload(ood_run):
    import httpx

    from test_server import start

    server = start(ood_run["root"], log=ood_run["base"] / "server.log")
    try:
        images = ood_run["noise"][:4] + ood_run["inside"][:4]
        body = {"instances": [{"b64": base64.b64encode(Path(p).read_bytes()).decode()} for p in images]}
        rows = httpx.post(server.url + "/v1/models/shapes:predict", json=body, timeout=60).json()["predictions"]
        assert [r["unknown"] for r in rows[:4]] == [True] * 4 and all(r["label"] == "unknown" for r in rows[:4])
        assert all(r["class_name"] in ("circles", "squares", "triangles") for r in rows)
        assert all(r["label"] == ("unknown" if r["unknown"] else r["class_name"]) for r in rows)
        columns = httpx.post(server.url + "/v1/models/shapes:predict", json={"inputs": body["instances"]},
                             timeout=60).json()["outputs"]
        assert columns["ood_score"] == pytest.approx([r["ood_score"] for r in rows], rel=1e-5)
        upload = httpx.post(server.url + "/api/models/shapes/predict?top_k=2",
                            files={"file": ("n.png", Path(images[0]).read_bytes())}, timeout=60).json()
        result = upload["results"][0]
        assert result["unknown"] is True and result["label"] == "unknown"
        assert result["top_class"] == result["top_k"][0]["label"] and result["ood_score"] > 0
    finally:
        server.stop()


def test_ood_none_trains_and_predicts_as_before(tmp_path, sample_dir, cli):
    from tl_app import api
    from tl_app.models.ood import OOD_FILE

    config = small_config(tmp_path, sample_dir, backbone="vgg16")
    config.train.strategy, config.train.epochs, config.train.batch_size = "bottleneck", 1, 8
    config.train.ood = "none"
    run_dir = Path(api.train(config, echo=None)["run_dir"])
    assert json.loads((run_dir / "run.json").read_text())["ood"] == {"method": "none"}
    assert not (run_dir / OOD_FILE).exists()
    out = tmp_path / "preds.csv"
    image = next(Path(sample_dir).rglob("*.png"))
    assert cli("predict", run_dir, image, "--out", out, "-q", "-k", "2").exit_code == 0
    assert out.read_text().splitlines()[0] == "path,label_1,probability_1,label_2,probability_2,error"
    bad = cli("train", sample_dir, "--ood", "energy")
    assert bad.exit_code != 0 and "energy" in bad.output and "Traceback" not in bad.output


def test_the_report_shows_the_ood_folder_figures_when_evaluate_measured_them():
    from tl_app.insight.report import calibration_body, ood_body

    figures = {"acceptance": 0.95, "better": "mahalanobis",
               "mahalanobis": {"auroc": 0.9123, "fpr_at_95": 0.25, "ood_images": 12},
               "max_softmax": {"auroc": 0.4567, "fpr_at_95": 0.75, "ood_images": 12}}
    html = ood_body(figures)
    assert "12 images" in html and "0.9123" in html and "0.4567" in html and "0.2500" in html and "0.7500" in html
    assert ood_body(None) == "" and "no decodable" in ood_body({"error": "no decodable image in the OOD folder"})
    before = {"ece": 0.1, "mce": 0.2, "nll": 0.3, "brier": 0.4, "accuracy": 0.5, "bins": 15}
    assert "0.9123" in calibration_body({"calibration": {"before": before}, "ood": figures, "files": {}})
