"""The names of the files a run folder and a model version hold, and their readers.

runs/<name>/run.json + model.keras; saved_models/<name>/<version>/ with
saved_model.pb, model.keras, model.tflite, model.onnx and model_card.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from tl_app.core.errors import ModelNotFoundError

import os
from tl_app.core.errors import ConfigError


RUN_FILE = "run.json"


MODEL_FILE = "model.keras"


def read_run_info(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{run_dir} is not a tl-app run directory (no {RUN_FILE}). "
            f"Expected the folder 'tl-app train' printed at its end, e.g. runs/<name>."
        )
    return json.loads(path.read_text())


CARD_FILE = "model_card.json"


KERAS_FILE = "model.keras"


TFLITE_FILE = "model.tflite"


ONNX_FILE = "model.onnx"


SAVED_MODEL_FILE = "saved_model.pb"


BYTES_SIGNATURE = "serving_default"


PIXELS_SIGNATURE = "predict_pixels"


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")  # version folder names: 1, 2, ... (ASCII digits only)


# ---- the layout, shared with inference and the server ------------------------
def valid_model_name(name: str) -> bool:
    """Names are single path components: no separators, no '..', no hidden names."""
    return bool(NAME_PATTERN.match(name or "")) and ".." not in name


def check_model_name(name: str) -> str:
    if not valid_model_name(name):
        raise ConfigError(
            f"Model name {name!r} is not valid: use letters, digits, '_', '-' or '.', starting with a "
            f"letter or digit (at most 128 characters, no '..'), e.g. --name flowers."
        )
    return name


def parse_version(text: str | None) -> int | None:
    """A version folder name ('1', '42': ASCII digits, no leading zero, at most 18) as a number, else None."""
    if not isinstance(text, str) or not VERSION_PATTERN.fullmatch(text):
        return None
    return int(text)


def list_versions(model_dir: str | Path) -> list[int]:
    """Published versions of saved_models/<name>, ascending; hidden/temporary/other folders are ignored."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    out = []
    for entry in os.scandir(model_dir):
        version = parse_version(entry.name)
        if version is not None and entry.is_dir():
            out.append(version)
    return sorted(out)


def is_complete_version(path: str | Path) -> bool:
    path = Path(path)
    return (path / SAVED_MODEL_FILE).is_file() or ((path / KERAS_FILE).is_file() and (path / CARD_FILE).is_file())


def resolve_version_dir(path: str | Path) -> Path:
    """saved_models/<name> -> its newest complete version; a version folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(
            f"Model {str(path)!r} does not exist. Expected saved_models/<name> (newest version), "
            f"saved_models/<name>/<version>, or a run directory."
        )
    if is_complete_version(path):
        return path
    for version in reversed(list_versions(path)):
        if is_complete_version(path / str(version)):
            return path / str(version)
    raise ModelNotFoundError(
        f"{path} holds no exported model version (expected numbered folders such as {path}/1 with "
        f"{SAVED_MODEL_FILE} or {KERAS_FILE} + {CARD_FILE}). Create one with 'tl-app export RUN_DIR'."
    )


def read_card(version_dir: str | Path) -> dict:
    path = Path(version_dir) / CARD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
