"""The Ray engine: the local engine's features and predictions, resumable, and optional.

The slow tests start a local Ray instance with 2 CPUs (the actors are real
processes that import TensorFlow); run them with ``pytest -m slow``.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys

import numpy as np
import pytest

from tl_app.core.config import load_config
from tl_app.core.errors import ConfigError, TlAppError


# ---- without Ray -------------------------------------------------------------------
def test_engine_ray_without_ray_names_the_extra(tiny_config, monkeypatch):
    from tl_app import api

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    config = tiny_config.with_overrides({"engine.name": "ray"})
    with pytest.raises(TlAppError, match=r"pip install 'tl-app\[ray\]'"):
        api.extract(config, echo=None)


def test_cli_extract_engine_ray_without_ray_is_one_clear_error(cli, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = cli("extract", tiny_config.data.root, "--weights", "none", "--input-size", 32,
                 "--cache-dir", tmp_path / "cache", "--out", tmp_path / "feats", "--engine", "ray")
    assert result.exit_code == 2
    assert "pip install 'tl-app[ray]'" in result.output and "Traceback" not in result.output


def test_cli_predict_engine_ray_without_ray_is_one_clear_error(cli, tiny_config, tmp_path, monkeypatch):
    from factories import make_run_dir

    run_dir = make_run_dir(tiny_config)
    monkeypatch.setitem(sys.modules, "ray", None)
    result = cli("predict", run_dir, tiny_config.data.root, "--out", tmp_path / "p.csv", "--engine", "ray")
    assert result.exit_code == 2
    assert "pip install 'tl-app[ray]'" in result.output and "Traceback" not in result.output


def test_ray_client_address_is_refused_for_ray_data(tiny_config):
    from tl_app import api

    config = tiny_config.with_overrides({"engine.name": "ray", "engine.address": "ray://head:10001"})
    with pytest.raises(TlAppError, match="--address auto"):
        api.extract(config, echo=None)


def test_engine_settings_are_checked():
    with pytest.raises(ConfigError, match="Did you mean 'ray'"):
        load_config(None, {"engine.name": "rey"})
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(None, {"engine.num_workers": 0})
    config = load_config(None, {"engine.name": "ray", "engine.address": "auto", "engine.gpus_per_worker": 1})
    assert (config.engine.name, config.engine.address, config.engine.gpus_per_worker) == ("ray", "auto", 1.0)


def test_default_engine_does_not_import_ray(tiny_config, monkeypatch):
    from tl_app.features.extract import extract_features

    monkeypatch.setitem(sys.modules, "ray", None)
    result = extract_features(tiny_config, echo=None)
    assert result.stats["computed"] == 36


# ---- on a local Ray instance ----------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray  # the ray extra: make test installs it

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield ray
    ray.shutdown()


def extract_args(config, cache, out, *extra):
    return ["extract", config.data.root, "--backbone", "resnet50", "--weights", "none", "--input-size", 32,
            "--batch-size", 8, "--cache-dir", cache, "--out", out, *extra]


def last_json(text: str) -> dict:
    """The JSON summary a command prints (Ray may forward actor log lines around it)."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.JSONDecoder().raw_decode("\n".join(lines[start:]))[0]


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.slow
def test_ray_extract_matches_the_local_engine(ray_local, cli, tiny_config, tmp_path):
    local = cli(*extract_args(tiny_config, tmp_path / "cache-local", tmp_path / "local", "--augment-views", 1))
    assert local.exit_code == 0, local.output
    remote = cli(*extract_args(tiny_config, tmp_path / "cache-ray", tmp_path / "ray", "--augment-views", 1,
                               "--engine", "ray", "--num-workers", 2, "--cpus-per-worker", 1))
    assert remote.exit_code == 0, remote.output

    for name in ("features.npy", "views.npy"):
        a, b = np.load(tmp_path / "local" / name), np.load(tmp_path / "ray" / name)
        assert a.shape == b.shape and a.shape[0] > 0
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert read_rows(tmp_path / "ray" / "index.csv") == read_rows(tmp_path / "local" / "index.csv")
    meta = [json.loads((tmp_path / d / "meta.json").read_text()) for d in ("local", "ray")]
    assert meta[0]["recipe"] == meta[1]["recipe"] and meta[0]["shape"] == meta[1]["shape"]

    # the same cache format: the local engine finds everything the Ray engine computed
    again = cli(*extract_args(tiny_config, tmp_path / "cache-ray", tmp_path / "again", "--augment-views", 1,
                              "--json"))
    stats = last_json(again.output)
    assert stats["computed"] == 0 and stats["cached"] == 36 and stats["views_computed"] == 0


class Interrupt(Exception):
    pass


class StopAfterFirstBatch:
    def __init__(self):
        self.done = 0

    def update(self, count):
        self.done += count
        raise Interrupt


@pytest.mark.slow
def test_ray_extract_resumes_from_what_the_cache_holds(ray_local, tiny_config):
    from tl_app.engines.ray_engine import RayExtractor
    from tl_app.features.cache import FeatureCache
    from tl_app.features.extract import extract_features
    from tl_app.features.recipe import recipe_for
    from tl_app.data.scan import scan_dataset

    expected = extract_features(tiny_config.with_overrides({"features.cache_dir": tiny_config.features.cache_dir
                                                           + "-local"}), echo=None)
    config = tiny_config.with_overrides({"engine.name": "ray", "engine.num_workers": 1})
    recipe = recipe_for(config)
    cache = FeatureCache(config.features.cache_dir, recipe)
    records = scan_dataset(config).records
    extractor = RayExtractor(config, recipe)
    out = np.zeros((len(records), extractor.dim()), np.float32)
    progress = StopAfterFirstBatch()
    with pytest.raises(Interrupt):  # the run dies after its first batch came back
        extractor.compute(records, list(range(len(records))), cache, out, 8, progress)
    saved = len(cache.shards())
    assert saved == 1 and 0 < progress.done < len(records)

    resumed = extract_features(config, echo=None)
    assert resumed.stats["cached"] == progress.done
    assert resumed.stats["computed"] == len(records) - progress.done
    np.testing.assert_allclose(np.asarray(resumed.features), np.asarray(expected.features), rtol=0, atol=1e-5)


def fit_knn_scorer(run_dir: Path) -> None:
    """A k-NN unknown-scorer fitted, as training fits it, on the run's features of 24 random images."""
    import keras

    from tl_app.models.artifacts import MODEL_FILE
    from tl_app.models.ood import feature_model
    from tl_app.training.ood import fit_ood

    model = keras.saving.load_model(run_dir / MODEL_FILE, compile=False)
    size = int(model.input.shape[1])
    pixels = np.random.default_rng(3).uniform(0, 255, (24, size, size, 3)).astype(np.float32)
    features = np.asarray(feature_model(model).predict(pixels, verbose=0))
    assert fit_ood("knn", features, np.arange(24) % 3, features[:6], run_dir)["method"] == "knn"


@pytest.mark.slow
def test_ray_predict_writes_the_local_engine_rows(ray_local, cli, tiny_config, tmp_path):
    from factories import make_run_dir
    from PIL import Image

    from tl_app.inference import iter_inputs, predict_paths

    tiny_config.data.background = [0, 0, 0]  # the actors must composite transparency on it too
    run_dir = make_run_dir(tiny_config)
    fit_knn_scorer(run_dir)  # the rows carry label, unknown and ood_score, as the local engine's
    inputs = tmp_path / "inputs"
    shutil.copytree(tiny_config.data.root, inputs)
    (inputs / "circles" / "broken.jpg").write_bytes(b"not an image")
    rgba = np.random.default_rng(1).integers(0, 255, (40, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(inputs / "squares" / "see-through.png")
    missing = tmp_path / "missing.jpg"
    local = predict_paths(run_dir, [inputs, missing], out=tmp_path / "local.csv", top_k=2, batch_size=8, echo=None)
    result = cli("predict", run_dir, inputs, missing, "--out", tmp_path / "ray.csv", "--top-k", 2,
                 "--batch-size", 8, "--json", "--engine", "ray", "--num-workers", 2)
    assert result.exit_code == 0, result.output
    remote = last_json(result.output)
    for key in ("predicted", "bad", "total", "bad_files"):
        assert remote[key] == local[key]
    assert (remote["predicted"], remote["bad"]) == (37, 2)
    a, b = read_rows(tmp_path / "local.csv"), read_rows(tmp_path / "ray.csv")
    assert a[0] == b[0]  # the header
    # the same rows in the same order, which is the order of the inputs
    assert [r[0] for r in b[1:]] == [path for path, _ in iter_inputs([inputs, missing])]
    assert [(r[0], r[1], r[3], r[-1]) for r in a[1:]] == [(r[0], r[1], r[3], r[-1]) for r in b[1:]]
    for x, y in zip(a[1:], b[1:]):
        for i in (2, 4):
            if x[i]:
                assert abs(float(x[i]) - float(y[i])) <= 1e-5, (x, y)
    assert a[0][-4:] == ["label", "unknown", "ood_score", "error"]
    assert [(r[-4], r[-3]) for r in a[1:]] == [(r[-4], r[-3]) for r in b[1:]]
    scored = [(x[-2], y[-2]) for x, y in zip(a[1:], b[1:]) if x[-2]]
    assert len(scored) == 37 and all(abs(float(x) - float(y)) <= 1e-4 * max(1.0, abs(float(x))) for x, y in scored)
