"""k-NN and prototype heads: fitted on cached features, exported like any head, classes added without training."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factories import make_run_dir, small_config


def draw_checks(folder: Path, count: int, seed: int = 1) -> Path:
    """A new class unlike the sample shapes: checkerboards of random colours and cell sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        side, cell = int(rng.integers(64, 120)), int(rng.integers(6, 16))
        yy, xx = np.mgrid[0:side, 0:side]
        mask = ((yy // cell + xx // cell) % 2).astype(bool)
        pixels = np.empty((side, side, 3), np.uint8)
        pixels[mask] = rng.integers(0, 256, 3)
        pixels[~mask] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"checks_{i:02d}.png")
    return folder


def fewshot_config(base: Path, sample_dir: Path, kind: str):
    config = small_config(base, sample_dir, backbone="vgg16")
    config.head.kind = kind
    config.train.name = kind
    return config


@pytest.fixture(scope="module")
def prototype_run(tmp_path_factory, sample_dir):
    from tl_app.training.bottleneck import train_bottleneck

    base = tmp_path_factory.mktemp("proto")
    config = fewshot_config(base, sample_dir, "prototype")
    summary = train_bottleneck(config, echo=None)
    return {"config": config, "run_dir": Path(summary["run_dir"]), "base": base, "summary": summary}


def per_class_accuracy(model_file: Path, features: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    from tl_app.models.opener import load_model_file

    head = load_model_file(model_file).get_layer("head")
    predicted = head.predict(features, verbose=0).argmax(1)
    return {c: float(np.mean(predicted[labels == i] == i)) for i, c in enumerate(classes) if np.any(labels == i)}


@pytest.mark.parametrize("kind", ["knn", "prototype"])
def test_fewshot_heads_are_keras_layers_that_fit_without_epochs_and_reload(kind, tmp_path, sample_dir):
    from tl_app.models.artifacts import read_run_info
    from tl_app.models.fewshot_heads import fewshot_layer
    from tl_app.models.opener import load_run_model
    from tl_app.training.bottleneck import train_bottleneck
    from tl_app.features.extract import extract_features

    config = fewshot_config(tmp_path, sample_dir, kind)
    summary = train_bottleneck(config, echo=None)
    run_dir = Path(summary["run_dir"])
    info = read_run_info(run_dir)
    assert info["head"]["kind"] == kind and summary["metrics"]["epochs_trained"] == 0
    model = load_run_model(run_dir)
    layer = fewshot_layer(model.get_layer("head"))
    assert type(layer).__name__ == {"knn": "KnnHead", "prototype": "PrototypeHead"}[kind]
    assert not model.trainable_weights or all(not w.trainable for w in layer.weights)
    cached = extract_features(config, echo=None)
    train = cached.rows("train")
    probs = model.get_layer("head").predict(np.asarray(cached.features)[train], verbose=0)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    # each training feature's nearest neighbour is itself: k-NN with k=1 recalls the training set exactly
    if kind == "knn":
        assert summary["metrics"]["train_accuracy"] >= 0.9


def test_prototype_head_exports_to_every_format_through_the_parity_gate(prototype_run):
    from tl_app.export.exporter import export_run

    result = export_run(prototype_run["run_dir"], root=prototype_run["base"] / "saved_models", name="proto",
                        formats="savedmodel,keras,tflite", echo=None)
    for fmt in ("savedmodel", "keras", "tflite"):
        assert result["parity"][fmt]["top1_agreement"] == 1.0, fmt
    assert (result["path"] / "saved_model.pb").is_file() and (result["path"] / "model.tflite").is_file()


def test_adding_a_class_keeps_old_class_accuracy_and_reads_only_new_features(prototype_run, tmp_path):
    from tl_app import api
    from tl_app.features.extract import extract_features
    from tl_app.models.artifacts import read_run_info

    config, run_dir = prototype_run["config"], prototype_run["run_dir"]
    classes = read_run_info(run_dir)["classes"]
    cached = extract_features(config, echo=None)
    val = cached.rows("val")
    features, labels = np.asarray(cached.features)[val], np.asarray(cached.labels)[val]
    before = per_class_accuracy(run_dir / "model.keras", features, labels, classes)

    folder = draw_checks(tmp_path / "checks", 8)
    result = api.classes_add(run_dir, "checks", folder, runs_dir=tmp_path / "runs", echo=None)
    assert result["published"] is None and result["classes"] == classes + ["checks"]
    assert result["change"]["computed"] == 8 and result["change"]["cached"] == 0  # the new images only
    edited = Path(result["run_dir"])
    after = per_class_accuracy(edited / "model.keras", features, labels, classes)
    for name in classes:
        assert after[name] >= 0.99 * before[name], (name, before, after)
    # the new class is recognised, from its cached features (a second add computes nothing)
    from tl_app.models.opener import load_run_model

    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in sorted(folder.iterdir())])
    predicted = load_run_model(edited).predict(pixels.astype("float32"), verbose=0).argmax(1)
    assert np.mean(predicted == 3) > 0.25  # better than chance among 4 classes, with random backbone weights
    again = api.classes_add(run_dir, "checks2", folder, runs_dir=tmp_path / "runs", echo=None)
    assert again["change"]["computed"] == 0 and again["change"]["cached"] == 8
    removed = api.classes_remove(edited, "checks", runs_dir=tmp_path / "runs", echo=None)
    back = per_class_accuracy(Path(removed["run_dir"]) / "model.keras", features, labels, classes)
    assert back == before and removed["classes"] == classes


def test_a_dense_head_is_refused_with_the_prototype_route(cli, tmp_path, sample_dir):
    config = small_config(tmp_path, sample_dir, backbone="vgg16")
    run_dir = make_run_dir(config)
    folder = draw_checks(tmp_path / "checks", 2)
    result = cli("classes", "add", run_dir, "checks", folder)
    assert result.exit_code != 0
    assert "'dense' head" in result.output and "--head prototype" in result.output
    assert "Traceback" not in result.output


class serve:
    """`python -m tl_app serve ROOT` on a free loopback port (gRPC off), waited for up to 5 minutes (busy CI)."""

    def __init__(self, root: Path, log: Path):
        import os
        import socket
        import subprocess

        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.pop("TL_APP_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "tl_app", "serve", str(root), "--port", str(port),
                                      "--poll-seconds", "0.3", "--grpc-port", "0"],
                                     cwd=Path(__file__).resolve().parents[1], env=env, stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def test_a_class_added_to_a_served_model_appears_without_restart_or_failed_request(prototype_run, tmp_path):
    import httpx
    from tl_app import api
    from tl_app.export.exporter import export_run

    root = tmp_path / "models"
    export_run(prototype_run["run_dir"], root=root, name="live", formats="savedmodel,keras", echo=None)
    folder = draw_checks(tmp_path / "checks", 6)
    image = {"b64": base64.b64encode(next(folder.iterdir()).read_bytes()).decode()}
    server = serve(root, tmp_path / "server.log")
    statuses, widths, stop = [], [], threading.Event()

    def hammer():
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/models/live:predict", json={"instances": [image]})
                except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                    statuses.append(repr(exc))
                    continue
                statuses.append(response.status_code)
                if response.status_code == 200:
                    row = response.json()["predictions"][0]
                    widths.append((len(row["probabilities"]), tuple(row["class_names"])))

    thread = threading.Thread(target=hammer)
    try:
        thread.start()
        deadline = time.time() + 120
        while not widths and time.time() < deadline:
            time.sleep(0.1)
        assert widths, f"no successful request before the change: {statuses[:5]}"
        result = api.classes_add(root / "live", "checks", folder, runs_dir=tmp_path / "runs", echo=None)
        assert result["published"]["version"] == 2
        deadline = time.time() + 60
        while time.time() < deadline and not any(w == 4 for w, _ in widths[-3:]):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(60)
        server.stop()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert widths[0][0] == 3 and "checks" not in widths[0][1]
    assert widths[-1][0] == 4 and widths[-1][1][-1] == "checks"  # the new class, in the same process's answers


def test_episodes_give_a_mean_with_a_95_percent_interval_and_more_shots_help():
    from tl_app.insight.fewshot import run_episodes

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 32)) * 1.0
    labels = np.repeat(np.arange(8), 30)
    features = centres[labels] + rng.normal(size=(len(labels), 32)) * 1.5
    one = run_episodes(features, labels, way=5, shot=1, episodes=300)
    ten = run_episodes(features, labels, way=5, shot=10, episodes=300)
    assert 0.2 < one["accuracy"] < ten["accuracy"] <= 1.0
    assert 0 < ten["ci95"] < one["ci95"] < 0.05 and one["queries"] == 15
    separable = run_episodes(centres[labels] * 10 + rng.normal(size=(len(labels), 32)) * 0.01, labels, 5, 1, 50)
    assert separable["accuracy"] == 1.0


def test_evaluate_episodes_on_a_run_and_a_clear_error_for_too_many_ways(cli, prototype_run):
    result = cli("evaluate", prototype_run["run_dir"], "--episodes", 30, "--way", 3, "--shot", "1,5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert [r["shot"] for r in report["results"]] == [1, 5] and report["images"] == 36
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ci95"] >= 0 for r in report["results"])
    too_many = cli("evaluate", prototype_run["run_dir"], "--episodes", 5, "--way", 5, "--shot", "1")
    assert too_many.exit_code != 0 and "Lower --way" in too_many.output and "Traceback" not in too_many.output
