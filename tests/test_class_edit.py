"""Editing a few-shot head inside a saved .keras file: the same model as the Keras route, without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_fewshot import draw_checks, prototype_run  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def assembled(head_of, tmp_path: Path) -> Path:
    """image [8, 8, 3] -> flatten -> dense (a stand-in backbone) -> the few-shot 'head' model, saved as .keras."""
    import keras

    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (30, 12)).astype(np.float32)
    labels = np.arange(30) % 3
    head = head_of(features, labels)
    image = keras.Input((8, 8, 3))
    x = keras.layers.Dense(12, name="pooled")(keras.layers.Flatten()(image))
    model = keras.Model(image, head(x), name="classifier")
    path = tmp_path / "model.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("kind", ["prototype", "prototype-whitened", "knn"])
def test_archive_edit_gives_the_model_the_keras_route_gives(kind, tmp_path):
    from tl_app.models.fewshot_heads import fewshot_layer, knn_head, prototype_head, with_class, without_class
    from tl_app.models.head_state import added, removed
    from tl_app.models.keras_archive import read_head, write_with_head
    from tl_app.models.opener import load_model_file

    head_of = {"prototype": lambda f, y: prototype_head(f, y, 3),
               "prototype-whitened": lambda f, y: prototype_head(f, y, 3, shrinkage=0.2),
               "knn": lambda f, y: knn_head(f, y, 3, neighbors=3)}[kind]
    path = assembled(head_of, tmp_path)
    original = load_model_file(path)
    layer = fewshot_layer(original.get_layer("head"))
    new = np.random.default_rng(1).normal(0.5, 1, (5, 12)).astype(np.float32)
    probe = np.random.default_rng(2).normal(0, 1, (9, 12)).astype(np.float32)

    state = read_head(path)
    assert state.num_classes == 3
    for edit, keras_route in ((added(state, new), with_class(layer, new)), (removed(state, 1), without_class(layer, 1))):
        target = tmp_path / f"edited-{edit.num_classes}.keras"
        write_with_head(path, target, edit)
        edited = load_model_file(target)
        expected = np.asarray(keras_route(probe))
        assert np.asarray(edited.get_layer("head")(probe)) == pytest.approx(expected, abs=1e-6)
        assert edited.output.shape[-1] == edit.num_classes
        images = np.random.default_rng(3).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
        assert np.asarray(edited(images)).shape == (2, edit.num_classes)
    # the backbone's weights are copied unchanged
    assert np.array_equal(edited.get_layer("pooled").get_weights()[0], original.get_layer("pooled").get_weights()[0])


def test_a_dense_head_reads_as_none(tmp_path):
    import keras

    from tl_app.models.keras_archive import read_head

    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs)).save(tmp_path / "dense.keras")
    assert read_head(tmp_path / "dense.keras") is None


def test_cli_classes_add_on_a_run_with_cached_features_loads_no_tensorflow(prototype_run, tmp_path):  # noqa: F811
    from tl_app import api

    run_dir = prototype_run["run_dir"]
    folder = draw_checks(tmp_path / "checks", 4, seed=3)
    api.classes_add(run_dir, "warm", folder, runs_dir=tmp_path / "runs", echo=None)  # caches the features
    script = ("import sys\n"
              "from tl_app.cli import main\n"
              f"main(['classes', 'add', {str(run_dir)!r}, 'checks', {str(folder)!r}, '--runs-dir', "
              f"{str(tmp_path / 'runs')!r}, '--json'], standalone_mode=False)\n"
              "print('tensorflow loaded:', 'tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensorflow loaded: False" in done.stdout
    result = json.loads(done.stdout[:done.stdout.rindex("tensorflow loaded")])
    assert result["change"]["cached"] == 4 and result["change"]["computed"] == 0
    assert result["classes"][-1] == "checks" and result["published"] is None
    # the edited run answers with Keras like any run: four classes, the new one recognised
    from tl_app.models.opener import load_run_model

    model = load_run_model(result["run_dir"])
    assert model.output.shape[-1] == len(result["classes"])
