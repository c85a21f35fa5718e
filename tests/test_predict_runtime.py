"""Issue 17: `tl-app predict --runtime onnxruntime` runs a conversion made once beside the model, checked against
Keras, and writes the rows the Keras runtime writes; a conversion that does not match is refused."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from factories import small_config  # noqa: E402


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, sample_dir):
    """A tiny bottleneck run (VGG16, random weights, 32 px) with the default k-NN OOD scorer, and noise images."""
    from tl_app import api

    base = tmp_path_factory.mktemp("predict-runtime")
    config = small_config(base, sample_dir, backbone="vgg16")
    config.train.strategy, config.train.epochs, config.train.batch_size = "bottleneck", 1, 8
    run_dir = Path(api.train(config, echo=None)["run_dir"])
    assert json.loads((run_dir / "run.json").read_text())["ood"]["method"] == "knn"
    noise = base / "noise"
    noise.mkdir()
    rng = np.random.default_rng(3)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / f"noise_{k}.png")
    return {"run_dir": run_dir, "inputs": [str(sample_dir), str(noise)], "base": base}


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def keras_and(cli, run_dir: Path, inputs: list, tmp_path: Path, *options) -> tuple[list[dict], list[dict]]:
    """The rows of `tl-app predict` over ``inputs`` with the Keras runtime, and with ``options``."""
    rows = []
    for k, extra in enumerate(((), options)):
        out = tmp_path / f"rows-{k}.csv"
        result = cli("predict", run_dir, *inputs, "--out", out, "-q", *extra)
        assert result.exit_code == 0, result.output
        rows.append(read_rows(out))
    return rows[0], rows[1]


def assert_same_rows(expected: list[dict], got: list[dict]) -> None:
    """Path, classes in order, label and verdict equal; probabilities and OOD score within 1e-4."""
    assert len(got) == len(expected) == 36 + 6 and "ood_score" in got[0]
    assert {r["unknown"] for r in expected} == {"true", "false"}  # both verdicts are exercised
    numbers = [k for k in got[0] if k.startswith("probability_")] + ["ood_score"]
    for want, have in zip(expected, got):
        assert {k: v for k, v in have.items() if k not in numbers} == {k: v for k, v in want.items()
                                                                       if k not in numbers}
        for k in numbers:
            assert float(have[k]) == pytest.approx(float(want[k]), rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_onnxruntime_rows_equal_the_keras_rows(scored_run, cli, tmp_path):
    from tl_app.export.predict_runtime import FOLDER

    run_dir = scored_run["run_dir"]
    onnx_out = tmp_path / "onnx.csv"
    expected, got = keras_and(cli, run_dir, scored_run["inputs"], tmp_path, "--runtime", "onnxruntime")
    converted = sorted((run_dir / FOLDER).glob("classifier-*-onnx.*"))  # key-onnx.onnx, key-onnx.parity.json
    assert [p.name.split(".", 1)[1] for p in converted] == ["onnx", "parity.json"]
    record = json.loads(converted[1].read_text())
    assert record["ok"] and record["top1_agreement"] == 1.0 and record["ood_score"]["ok"]

    assert_same_rows(expected, got)

    # the second run reuses the conversion (nothing rewritten)
    stamp = converted[0].stat().st_mtime_ns
    assert cli("predict", run_dir, *scored_run["inputs"], "--out", onnx_out, "-q", "--runtime",
               "onnxruntime").exit_code == 0
    assert converted[0].stat().st_mtime_ns == stamp


def test_a_changed_model_gets_another_conversion_key(scored_run, tmp_path):
    import shutil

    from tl_app.export.predict_runtime import conversion_key, model_target
    from tl_app.models.opener import read_model_info

    copy = tmp_path / "run"
    shutil.copytree(scored_run["run_dir"], copy, ignore=shutil.ignore_patterns(".runtime"))
    info = read_model_info(copy)
    key = conversion_key(info, model_target(info))
    assert key == conversion_key(read_model_info(scored_run["run_dir"]), model_target(info))  # same files

    record = json.loads((copy / "run.json").read_text())
    record["ood"]["threshold"] = float(record["ood"]["threshold"]) * 0.5  # a recalibrated scorer
    (copy / "run.json").write_text(json.dumps(record))
    assert conversion_key(read_model_info(copy), model_target(info)) != key
    (copy / "run.json").write_text(json.dumps({**record, "ood": info.card["ood"]}))
    assert conversion_key(read_model_info(copy), model_target(info)) == key
    with open(copy / "model.keras", "ab") as handle:  # other model bytes
        handle.write(b"\0")
    assert conversion_key(read_model_info(copy), model_target(info)) != key


def other_network(run_dir: Path, size: int):
    """A small network with the run's classes and an OOD score, which is not the run's model."""
    import keras

    images = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    probabilities = keras.layers.Dense(len(json.loads((run_dir / "run.json").read_text())["classes"]),
                                       activation="softmax")(pooled)
    return keras.Model(images, {"probabilities": probabilities, "ood_score": keras.ops.mean(pooled, axis=-1)})


@pytest.mark.slow
def test_a_conversion_that_does_not_match_keras_is_refused(scored_run, tmp_path):
    from tl_app.core.errors import TlAppError
    from tl_app.export.predict_runtime import FOLDER, open_predictor, tf2onnx_classifier
    from tl_app.models.ood import without_ood

    run_dir = scored_run["run_dir"]
    for earlier in (run_dir / FOLDER).glob("classifier-*"):  # a checked conversion would be reused
        earlier.unlink()

    def wrong_network(model, path, size):  # a small other network in place of the model
        tf2onnx_classifier(other_network(run_dir, size), path, size)

    def unscored(model, path, size):  # a converter that dropped the OOD scorer
        import keras

        images = keras.Input((size, size, 3))
        tf2onnx_classifier(keras.Model(images, without_ood(model)(images)), path, size)

    for converter, reason in ((wrong_network, "probabilities differ"), (unscored, "no ood_score output")):
        with pytest.raises(TlAppError, match=f"does not match Keras.*{reason}"):
            open_predictor(run_dir, "onnxruntime", converter=converter)
        assert not list((run_dir / FOLDER).glob("*classifier-*"))  # nothing kept, no temporary left


@pytest.mark.slow
def test_tflite_rows_equal_the_keras_rows_and_a_wrong_conversion_is_refused(scored_run, cli, tmp_path):
    """--runtime tflite: the classifier with its OOD scorer as a float32 .tflite beside the model, the same gate."""
    from tl_app.core.errors import TlAppError
    from tl_app.export.predict_runtime import FOLDER, open_predictor
    from tl_app.features.runtime import tflite_convert

    run_dir = scored_run["run_dir"]
    expected, got = keras_and(cli, run_dir, scored_run["inputs"], tmp_path, "--runtime", "tflite")
    converted = sorted((run_dir / FOLDER).glob("classifier-*-tflite.*"))
    assert [p.name.split(".", 1)[1] for p in converted] == ["parity.json", "tflite"]
    record = json.loads(converted[0].read_text())
    assert record["ok"] and record["top1_agreement"] == 1.0 and record["ood_score"]["ok"]
    assert_same_rows(expected, got)

    for earlier in converted:
        earlier.unlink()

    def wrong_network(model, path, size):  # a small other network in place of the model
        tflite_convert(other_network(run_dir, size), path, size)

    with pytest.raises(TlAppError, match="tflite conversion .* does not match Keras.*probabilities differ"):
        open_predictor(run_dir, "tflite", converter=wrong_network)
    assert not list((run_dir / FOLDER).glob("*classifier-*-tflite*"))  # nothing kept, no temporary left


def write_tinted(folder: Path, seed: int, each: int = 24) -> Path:
    """Red and blue noise images (48 px PNGs): classes a pretrained head separates with wide margins."""
    rng = np.random.default_rng(seed)
    for label, tint in (("red", (200, 40, 40)), ("blue", (40, 60, 200))):
        (folder / label).mkdir(parents=True)
        for k in range(each):
            pixels = np.clip(np.array(tint) + rng.normal(0, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{k}.png")
    return folder


@pytest.mark.slow
def test_int8_predict_is_calibrated_and_gated_on_the_users_images(scored_run, cli, tmp_path, hed_vgg16_weights):
    """--precision int8: a static ONNX Runtime quantisation of the convolutions whose activation ranges come from
    the first of the images being predicted, used only if it agrees with float32 on >= 99% of top-1 classes and
    unknown verdicts of the rest. A confident model (hed-vgg16 features, new images) passes; the random-weight
    run's near-tie answers flip under int8 and it is refused with the measured agreement, nothing kept."""
    from tl_app import api
    from tl_app.export.predict_runtime import FOLDER

    config = small_config(tmp_path, write_tinted(tmp_path / "data", seed=0), backbone="vgg16")
    config.backbone.weights = "hed-vgg16"
    config.train.strategy, config.train.epochs, config.train.batch_size = "bottleneck", 10, 8
    run_dir = Path(api.train(config, echo=None)["run_dir"])
    expected, got = keras_and(cli, run_dir, [write_tinted(tmp_path / "new", seed=1)], tmp_path, "--precision", "int8")
    record = json.loads(next((run_dir / FOLDER).glob("classifier-*-int8.gate.json")).read_text())
    assert record["ok"] and record["top1_agreement"] >= 0.99 and record["verdict_agreement"] >= 0.99
    assert record["calibration_images"] == 16 and record["images"] == 48 - 16  # the rest of the user's images
    assert [r["path"] for r in got] == [r["path"] for r in expected] and len(got) == 48
    assert np.mean([(a["label"], a["unknown"]) == (b["label"], b["unknown"]) for a, b in zip(expected, got)]) >= 0.99

    refused = cli("predict", scored_run["run_dir"], *scored_run["inputs"], "--out", tmp_path / "no.csv", "-q",
                  "--precision", "int8")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "--precision int8 is refused" in refused.output and "of your images; the gate is 99%" in refused.output
    assert not list((scored_run["run_dir"] / FOLDER).glob("*-int8*"))  # nothing kept, no temporary left
