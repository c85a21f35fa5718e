"""Issue 13, item 12: pixels that look scaled to 0..1 get a 400 that states the contract, not nonsense."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest

from tl_app.data.images import looks_scaled_to_unit, pixel_range_problem


def test_unit_range_detection_spares_constant_and_real_pixel_images():
    rng = np.random.default_rng(0)
    assert looks_scaled_to_unit(rng.uniform(0, 1, (8, 8, 3)).astype(np.float32))
    assert not looks_scaled_to_unit(np.zeros((8, 8, 3), np.float32))  # a constant (black) image
    assert not looks_scaled_to_unit(np.ones((8, 8, 3), np.float32))
    assert not looks_scaled_to_unit(rng.uniform(0, 255, (8, 8, 3)).astype(np.float32))
    batch = np.stack([rng.uniform(0, 255, (8, 8, 3)), rng.uniform(0, 1, (8, 8, 3))]).astype(np.float32)
    assert "image 1" in pixel_range_problem(batch) and pixel_range_problem(batch, allow_unit_range=True) == ""
    caffe = rng.uniform(-120, 130, (1, 8, 8, 3)).astype(np.float32)  # already preprocessed
    assert "not preprocessed" in pixel_range_problem(caffe, allow_unit_range=True)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    from test_server import Server

    base = tmp_path_factory.mktemp("unit-range")
    root = base / "models"
    shutil.copytree(exported["version_dir"], root / "shapes" / "1", ignore=shutil.ignore_patterns("*.tflite"))
    running = Server(root, log=base / "server.log")
    yield running
    running.stop()


def test_the_server_answers_unit_range_pixels_with_a_400_and_an_override(server):
    rng = np.random.default_rng(1)
    url = f"{server.url}/v1/models/shapes:predict"
    unit = rng.uniform(0, 1, (1, 32, 32, 3)).round(4).tolist()
    answer = httpx.post(url, json={"signature_name": "predict_pixels", "instances": unit}, timeout=60)
    assert answer.status_code == 400
    text = answer.text
    assert "0..255" in text and "allow_unit_range" in text
    override = {"signature_name": "predict_pixels", "instances": unit, "allow_unit_range": True}
    assert httpx.post(url, json=override, timeout=60).status_code == 200
    pixels = (np.asarray(unit) * 255).round(2).tolist()
    assert httpx.post(url, json={"signature_name": "predict_pixels", "instances": pixels}, timeout=60).status_code == 200
    black = np.zeros((1, 32, 32, 3)).tolist()
    assert httpx.post(url, json={"signature_name": "predict_pixels", "instances": black}, timeout=60).status_code == 200
