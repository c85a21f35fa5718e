"""tl-app export: TF Serving layout, atomic versions, signatures with preprocessing inside, parity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


from factories import reference_pixels

from tl_app.core.errors import ConfigError, ModelNotFoundError
from tl_app.core.files import TEMP_PREFIX

REPO = Path(__file__).resolve().parents[1]


# ---- layout and card ------------------------------------------------------------
def test_export_writes_the_tf_serving_layout_with_a_model_card(exported):
    version_dir = exported["version_dir"]
    assert version_dir.parent == exported["root"] / "shapes" and version_dir.name == "1"
    for name in ("saved_model.pb", "variables", "model.keras", "model.tflite", "model_card.json"):
        assert (version_dir / name).exists(), name
    card = json.loads((version_dir / "model_card.json").read_text())
    info = json.loads((exported["run_dir"] / "run.json").read_text())
    assert card["classes"] == info["classes"] == ["circles", "squares", "triangles"]
    assert card["backbone"] == "vgg16" and card["weights"] == "none"
    assert card["weights_fingerprint"] == info["weights_fingerprint"]
    assert card["input_size"] == 32 and card["resize_policy"] == "center_crop"
    assert card["preprocessing"]["mode"] == "caffe" and "inside the model" in card["preprocessing"]["description"]
    assert card["strategy"] == info["strategy"]
    assert card["metrics"] == {"val_accuracy": 0.5, "val_loss": 1.1}
    assert card["config"]["backbone"]["name"] == "vgg16"
    assert card["dataset_fingerprint"] == info["dataset_fingerprint"]
    assert card["created"] and card["version"] == 1
    assert {"tl_app", "tensorflow", "keras"} <= set(card["versions"])
    assert card["parity"]["savedmodel"]["max_abs_diff"] <= 1e-5
    assert card["parity"]["tflite"]["max_abs_diff"] <= 1e-3


def test_each_export_gets_the_next_version_and_no_temporary_stays_visible(exported, tmp_path):
    from tl_app.export.exporter import export_run
    from tl_app.models.artifacts import list_versions

    root = tmp_path / "models"
    first = export_run(exported["run_dir"], root=root, name="shapes", formats="keras", echo=None)
    second = export_run(exported["run_dir"], root=root, name="shapes", formats=["keras"], echo=None)
    assert (first["version"], second["version"]) == (1, 2)
    assert list_versions(root / "shapes") == [1, 2]
    assert [p.name for p in (root / "shapes").iterdir() if p.name.startswith(TEMP_PREFIX)] == []
    assert json.loads((second["path"] / "model_card.json").read_text())["version"] == 2


# ---- the SavedModel signatures ----------------------------------------------------
def test_serving_default_decodes_resizes_and_matches_the_keras_model(exported, keras_model):
    import tensorflow as tf

    pixels, records = reference_pixels(exported["run_dir"])
    expected = keras_model.predict(pixels, verbose=0)
    loaded = tf.saved_model.load(str(exported["version_dir"]))
    data = tf.constant([Path(r.path).read_bytes() for r in records])
    out = loaded.signatures["serving_default"](image_bytes=data)
    assert {r.format for r in records} == {"JPEG", "PNG"}
    assert np.max(np.abs(out["probabilities"].numpy() - expected)) <= 1e-5
    assert np.array_equal(out["class_index"].numpy(), expected.argmax(axis=1))
    names = [b.decode() for b in out["class_name"].numpy()]
    assert names == [["circles", "squares", "triangles"][i] for i in expected.argmax(axis=1)]
    assert out["class_names"].shape == (len(records), 3)


def test_predict_pixels_takes_any_size_and_resizes_in_the_graph(exported, keras_model):
    import tensorflow as tf

    from tl_app.data.pipeline import resize_images

    rng = np.random.default_rng(1)
    raw = rng.uniform(0, 255, (4, 50, 41, 3)).astype(np.float32)
    loaded = tf.saved_model.load(str(exported["version_dir"]))
    out = loaded.signatures["predict_pixels"](images=tf.constant(raw))["probabilities"].numpy()
    expected = keras_model.predict(resize_images(raw, 32, "center_crop").numpy(), verbose=0)
    assert np.max(np.abs(out - expected)) <= 1e-5
    exact = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    out = loaded.signatures["predict_pixels"](images=tf.constant(exact))["probabilities"].numpy()
    assert np.max(np.abs(out - keras_model.predict(exact, verbose=0))) <= 1e-5


def test_keras_copy_loads_in_safe_mode_and_agrees(exported, keras_model):
    import keras

    import tl_app.models.backbones  # noqa: F401

    copy = keras.saving.load_model(exported["version_dir"] / "model.keras", safe_mode=True, compile=False)
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    assert np.max(np.abs(copy.predict(x, verbose=0) - keras_model.predict(x, verbose=0))) <= 1e-6


def test_tflite_agrees_with_keras_to_1e3(exported, keras_model):
    from tl_app.export.converters import run_tflite

    pixels, _ = reference_pixels(exported["run_dir"])
    out = run_tflite(exported["version_dir"] / "model.tflite", pixels[:8])
    assert np.max(np.abs(out - keras_model.predict(pixels[:8], verbose=0))) <= 1e-3


@pytest.mark.slow
def test_quantized_tflite_is_smaller_and_reports_its_parity(exported, tmp_path):
    from tl_app.export.exporter import export_run

    result = export_run(exported["run_dir"], root=tmp_path, name="q", formats="tflite", quantize=True, echo=None)
    size = (result["path"] / "model.tflite").stat().st_size
    assert size < 0.4 * (exported["version_dir"] / "model.tflite").stat().st_size
    card = json.loads((result["path"] / "model_card.json").read_text())
    assert card["quantized"] is True and card["parity"]["tflite"]["top1_agreement"] >= 0.5


@pytest.mark.slow
def test_onnx_export_agrees_with_keras(exported, tmp_path):
    from tl_app.export.exporter import export_run
    from tl_app.export.converters import onnx_available

    assert onnx_available(), "tf2onnx/onnxruntime are missing: make test installs them (the onnx extra)"
    result = export_run(exported["run_dir"], root=tmp_path, name="o", formats="onnx", echo=None)
    assert result["parity"]["onnx"]["max_abs_diff"] <= 1e-3
    assert (result["path"] / "model.onnx").stat().st_size > 1000


def test_onnx_without_the_converter_names_the_extra(exported, tmp_path, monkeypatch):
    import tl_app.export.converters as converters
    from tl_app.core.errors import ExportError
    from tl_app.export.exporter import export_run
    from tl_app.models.artifacts import list_versions

    monkeypatch.setattr(converters, "onnx_available", lambda: False)
    with pytest.raises(ExportError, match=r"tl-app\[onnx\]"):
        export_run(exported["run_dir"], root=tmp_path, name="o", formats="onnx", echo=None)
    assert list_versions(tmp_path / "o") == []  # nothing published, nothing half-written
    assert [p.name for p in (tmp_path / "o").iterdir() if p.name != ".lock"] == []


# ---- user mistakes -----------------------------------------------------------------
def test_unknown_format_bad_name_and_missing_run_fail_clearly(exported, tmp_path):
    from tl_app.export.exporter import export_run

    with pytest.raises(ConfigError, match="Did you mean 'tflite'"):
        export_run(exported["run_dir"], root=tmp_path, formats="tflit", echo=None)
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(ConfigError, match="not valid"):
            export_run(exported["run_dir"], root=tmp_path, name=bad or "..", echo=None)
    with pytest.raises(ModelNotFoundError, match="not a tl-app run directory"):
        export_run(tmp_path, root=tmp_path / "out", echo=None)


def test_cli_export_prints_the_version_and_parity(exported, tmp_path, cli):
    result = cli("export", exported["run_dir"], "--root", tmp_path, "--name", "cli", "--format", "keras", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["version"] == 1 and Path(data["path"]).is_dir()
    bad = cli("export", tmp_path / "nope", "--root", tmp_path)
    assert bad.exit_code != 0 and "not a tl-app run directory" in bad.output


# ---- atomicity under a real kill ------------------------------------------------------
@pytest.mark.slow
def test_a_killed_export_leaves_previous_versions_intact_and_nothing_half_written(exported, tmp_path):
    """SIGKILL a real `tl-app export` while it writes; version 1 must stay servable, no version 2 appears."""
    import tensorflow as tf

    from tl_app.export.exporter import export_run
    from tl_app.models.artifacts import list_versions

    root = tmp_path / "models"
    shutil.copytree(exported["version_dir"], root / "shapes" / "1")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "tl_app", "export", str(exported["run_dir"]), "--root",
                             str(root), "--name", "shapes", "--format", "savedmodel,keras,tflite"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        temp = None
        while time.time() < deadline and proc.poll() is None:  # kill once the SavedModel is being written
            temps = [p for p in (root / "shapes").iterdir() if p.name.startswith(TEMP_PREFIX)]
            if temps and any(temps[0].iterdir()):
                temp = temps[0]
                break
            time.sleep(0.05)
        assert temp is not None, "the export never started writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list_versions(root / "shapes") == [1]
    loaded = tf.saved_model.load(str(root / "shapes" / "1"))
    probs = loaded.signatures["predict_pixels"](images=tf.zeros([1, 32, 32, 3]))["probabilities"].numpy()
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5
    assert temp.exists()  # hidden, so no reader takes it for a version
    result = export_run(exported["run_dir"], root=root, name="shapes", formats="keras", echo=None)
    assert result["version"] == 2 and not temp.exists()  # the next export clears the dead one's folder
