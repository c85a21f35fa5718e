"""Shared fixtures: tiny real datasets on disk, tiny random-weight configs.

Every test runs with KERAS_HOME in a temporary folder, so the ImageNet path is
exercised against an empty cache and nothing touches the user's ~/.keras.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
def sample_dir(tmp_path_factory) -> Path:
    """A small copy of the procedural sample dataset (36 images, 3 classes). Do not modify."""
    from tl_app.sample_data import write_sample_dataset

    root = tmp_path_factory.mktemp("sample") / "sample"
    write_sample_dataset(root, seed=0, counts=SMALL_COUNTS)
    return root


@pytest.fixture
def tiny_config(tmp_path, sample_dir):
    """A Config that trains in seconds: resnet50, random weights, 32x32 inputs."""
    from tl_app.config import Config

    config = Config()
    config.data.root = str(sample_dir)
    config.backbone.name = "resnet50"
    config.backbone.weights = "none"
    config.backbone.input_size = 32
    config.features.cache_dir = str(tmp_path / "cache" / "features")
    config.train.runs_dir = str(tmp_path / "runs")
    config.train.epochs = 2
    config.train.finetune_epochs = 1
    config.train.batch_size = 8
    config.data.batch_size = 8
    config.head.units = [16]
    config.export.root = str(tmp_path / "saved_models")
    return config


@pytest.fixture
def cli():
    """Invoke the real click CLI in-process; returns click's Result."""
    from click.testing import CliRunner

    from tl_app.cli import main

    runner = CliRunner()

    def invoke(*args, **kwargs):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return invoke
