"""Run directories: one folder holds everything a training run produced.

Layout (both strategies)::

    runs/<name>/
        config.json, config.toml   resolved configuration
        manifest.json              the scanned dataset (labels, splits, hashes)
        skipped.csv, skipped.json  files that could not be used, with reasons
        run.json                   what export and inference need (classes, sizes, metrics)
        model.keras                raw pixels (0..255, input_size) -> class probabilities
        history.json, log.csv      per-epoch metrics
        metrics.json               final validation metrics
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from pathlib import Path

from tl_app.config import Config
from tl_app.errors import ModelNotFoundError
from tl_app.files import atomic_write_text

RUN_FILE = "run.json"
MODEL_FILE = "model.keras"


def versions() -> dict:
    import keras
    import tensorflow as tf

    from tl_app import __version__

    return {"tl_app": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def new_run_dir(config: Config) -> Path:
    """runs/<name>; a timestamped name when none is given; never reuses a folder."""
    base = Path(config.train.runs_dir)
    name = config.train.name or f"{config.train.strategy}-{config.backbone.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    path = base / slug(name)
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{slug(name)}-{suffix}"
    path.mkdir(parents=True)
    return path


def write_json(path: Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def write_run_info(run_dir: str | Path, **info) -> Path:
    """run.json: merged with what is already there."""
    path = Path(run_dir) / RUN_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(info)
    data.setdefault("created", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    data["versions"] = versions()
    return write_json(path, data)


def read_run_info(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{run_dir} is not a tl-app run directory (no {RUN_FILE}). "
            f"Expected the folder 'tl-app train' printed at its end, e.g. runs/<name>."
        )
    return json.loads(path.read_text())


def load_model_file(path: str | Path):
    """A saved .keras classifier (tl-app's custom layers registered), loaded with Keras safe mode."""
    import keras

    import tl_app.augment  # noqa: F401  (registers custom layers)
    import tl_app.backbones  # noqa: F401

    return keras.saving.load_model(Path(path), safe_mode=True, compile=False)


def load_run_model(run_dir: str | Path):
    """The trained model of a run, loaded with Keras safe mode."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist: the run did not finish training.")
    return load_model_file(path)


def fmt(value) -> str:
    """A metric for the console: 4 decimals, or n/a when the run has none (no validation split)."""
    return "n/a" if value is None else f"{value:.4f}"
