"""One way to open any saved model: a run folder, a model folder (newest version), a
version folder, a .keras file or a SavedModel, read as its metadata or opened as a
predictor. Batch inference, the Ray engine, evaluation, explanations and the server
all come here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import tl_app.data.augment  # noqa: F401  (registers tl-app's custom Keras layers for loading)
import tl_app.models.backbones  # noqa: F401  (same)
import tl_app.models.fewshot_heads  # noqa: F401  (same: the k-NN and prototype heads)
from tl_app.models.tta import without_tta  # (registers the test-time augmentation layers too)
from tl_app.models.calibration import recorded_temperature, with_temperature  # (registers TemperatureScaling too)
from tl_app.models.ood import LAYER_NAME as OOD_SCORE, SCORED, recorded_ood, split_outputs, with_ood, without_ood
from tl_app.core.config import Config
from tl_app.core.errors import ModelNotFoundError
from tl_app.models.artifacts import (CARD_FILE, KERAS_FILE, MODEL_FILE, PIXELS_SIGNATURE, RUN_FILE, SAVED_MODEL_FILE,
                                     parse_version, read_card, read_run_info, resolve_version_dir)

DEFAULT_BACKGROUND = (255, 255, 255)
INIT_OP = "__saved_model_init_op"


def load_model_file(path: str | Path):
    """A saved .keras classifier (tl-app's custom layers registered), loaded with Keras safe mode."""
    import keras


    return keras.saving.load_model(Path(path), safe_mode=True, compile=False)


def load_run_model(run_dir: str | Path):
    """The trained model of a run, loaded with Keras safe mode."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist: the run did not finish training.")
    return load_model_file(path)


# ---- the model -------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What a model's files say about it, read without loading the model."""

    source: Path  # the run directory, or the exact version folder (a newer version appearing later is not used)
    classes: list[str]
    input_size: int
    resize_policy: str
    name: str = ""
    version: int | None = None
    card: dict = field(default_factory=dict, repr=False)  # model_card.json, or run.json for a run
    background: tuple = DEFAULT_BACKGROUND  # training's data.background: transparency is composited on it


@dataclass
class Predictor:
    """An opened classifier: pixels (N, size, size, 3, 0..255) -> probabilities (N, C), plus what its files say.

    ``model`` is the Keras model when it was opened with ``keras=True`` (evaluation,
    explanations); serving and batch inference use the SavedModel when there is one.
    """

    classes: list[str]
    input_size: int
    resize_policy: str
    source: Path  # the run directory, or the exact version folder
    kind: str  # "savedmodel" | "keras"
    predict_fn: Callable = field(repr=False)
    name: str = ""
    version: int | None = None
    card: dict = field(default_factory=dict, repr=False)  # model_card.json, or run.json for a run
    background: tuple = DEFAULT_BACKGROUND  # decode transparent images onto this, as training did
    model: object = field(default=None, repr=False)
    run_dir: Path | None = None
    config: Config | None = field(default=None, repr=False)  # the run's configuration, when known

    def predict(self, images) -> np.ndarray:
        return self.outputs(images)["probabilities"]

    def outputs(self, images) -> dict:
        """{"probabilities": [N, C]} plus "ood_score" [N] for a model that carries an OOD scorer."""
        probabilities, score = split_outputs(self.predict_fn(images))
        out = {"probabilities": np.asarray(probabilities)}
        if score is not None:
            out[OOD_SCORE] = np.asarray(score).reshape(-1)
        return out

    @property
    def ood_threshold(self) -> float | None:
        """The threshold above which an ood_score means "unknown" (run.json's or the card's), or None."""
        return ood_threshold_of(self.card)

    @property
    def backbone(self) -> str:
        return self.card.get("backbone", "")

    @property
    def label(self) -> str:
        """name, or name-version for an exported version (folder names of evaluation outputs)."""
        return f"{self.name}-{self.version}" if self.version is not None else self.source.name


def ood_threshold_of(card: dict | None) -> float | None:
    """run.json's or the model card's OOD threshold, or None for a model without a scorer."""
    record = (card or {}).get("ood") or {}
    return float(record["threshold"]) if record.get("method") in SCORED else None


def run_background(config: dict | None, source: str) -> tuple:
    """data.background of a run's saved configuration, checked as training checked it (white if absent)."""

    data = (config or {}).get("data") or {}
    if "background" not in data:
        return DEFAULT_BACKGROUND
    checked = Config.from_dict({"data": {"background": data["background"]}}, source=source)
    return tuple(int(v) for v in checked.data.background)


def read_model_info(path: str | Path) -> ModelInfo:
    """saved_models/<name> (newest version), a version folder, or a run directory: its classes, sizes,
    version and background from run.json/config.json or model_card.json; the model itself is not loaded."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        info = read_run_info(path)
        if not (path / MODEL_FILE).is_file():
            raise ModelNotFoundError(f"{path / MODEL_FILE} does not exist: the run did not finish training. "
                                     f"Train it again, or pass an exported model (saved_models/<name>).")
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return ModelInfo(path, list(info["classes"]), int(info["input_size"]), info.get("resize_policy") or "auto",
                         name=path.name, card=info, background=run_background(config, str(config_file)))
    version_dir = resolve_version_dir(path)
    card = read_card(version_dir)
    if not card:
        raise ModelNotFoundError(f"{version_dir} has no {CARD_FILE}; re-export it with 'tl-app export'.")
    version = parse_version(version_dir.name)
    name = version_dir.parent.name if version is not None else version_dir.name
    return ModelInfo(version_dir, list(card["classes"]), int(card["input_size"]), card.get("resize_policy") or "auto",
                     name=name, version=version, card=card,
                     background=run_background(card.get("config"), f"{version_dir / CARD_FILE} [config]"))


_OPENED: dict[tuple, Predictor] = {}


def open_model(path: str | Path, keras: bool = False) -> Predictor:
    """The one model opener: saved_models/<name> (newest version), a version folder, or a run directory.

    With ``keras=False`` (predict, Ray actors) an export runs through its SavedModel's
    pixel signature; with ``keras=True`` (evaluate, explain, report) the Keras model
    is loaded and kept in ``.model``. The last two opened models are kept (keyed by
    path, kind and file time), so one process does not deserialise a model twice.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(
            f"Model {str(path)!r} does not exist. Expected a run directory (runs/<name>, printed at the end of "
            f"'tl-app train') or an exported model folder (saved_models/<name>[/<version>])."
        )
    info = read_model_info(path)  # classes, sizes and card/run.json, as predict and serve read them
    source = info.source
    is_run = (source / RUN_FILE).is_file()
    if is_run or keras or not (source / SAVED_MODEL_FILE).is_file():
        target = source / (MODEL_FILE if is_run else KERAS_FILE)
    else:
        target = source / SAVED_MODEL_FILE
    try:
        stamp = target.stat().st_mtime_ns
    except OSError:
        stamp = None
    # a run's temperature lives in run.json, not in model.keras: a new one must not reuse the cached model
    key = (str(source.resolve()), target.name, stamp, recorded_temperature(info.card) if is_run else None,
           json.dumps(info.card.get("ood"), sort_keys=True, default=str) if is_run else None)
    if stamp is not None and key in _OPENED:
        return _OPENED[key]
    opened = _open(info, target)
    if stamp is not None:
        while len(_OPENED) >= 2:
            _OPENED.pop(next(iter(_OPENED)))
        _OPENED[key] = opened
    return opened


def config_data_of(info: ModelInfo) -> dict | None:
    """The run's saved configuration: config.json of a run, the model card's copy for an export."""
    if (info.source / RUN_FILE).is_file():
        config_file = info.source / "config.json"
        return json.loads(config_file.read_text()) if config_file.is_file() else None
    return info.card.get("config")  # the run's configuration travels in the model card


def calibrated_model(info: ModelInfo, target: Path):
    """The Keras classifier in ``target``; a run's gets its recorded temperature (an export's has it inside)."""
    model = load_model_file(target)
    temperature = recorded_temperature(info.card) if (info.source / RUN_FILE).is_file() else None
    if temperature is not None:  # a run answers as its export will: with training's calibration
        model = with_temperature(model, temperature)
    return model


def scored_model(info: ModelInfo, model):
    """``model`` with a run's recorded OOD score attached (an export's model.keras already carries it)."""
    ood = recorded_ood(info.card, info.source if (info.source / RUN_FILE).is_file() else None)
    return with_ood(model, *ood) if ood is not None else model


def _open(info: ModelInfo, target: Path) -> Predictor:
    source = info.source
    model = run_dir = None
    if (source / RUN_FILE).is_file():
        run_dir = source
    config_data = config_data_of(info)
    if target.name == SAVED_MODEL_FILE:
        signature = open_savedmodel(source)[1].get(PIXELS_SIGNATURE)
        if signature is None:
            raise ModelNotFoundError(f"{source} has no {PIXELS_SIGNATURE!r} signature; export it with tl-app.")
        predict_fn, kind = savedmodel_outputs(signature), "savedmodel"
    elif target.is_file():
        model = calibrated_model(info, target)
        scored = scored_model(info, model)  # ... with its OOD score
        # evaluation and explanations see the plain (calibrated) single-pass classifier; an export --tta
        # model.keras keeps its views in predict_fn (as its SavedModel does), and evaluate averages them itself
        model = without_ood(without_tta(model))
        predict_fn, kind = keras_outputs(scored, info.input_size), "keras"
    else:
        raise ModelNotFoundError(
            f"{source} has no {KERAS_FILE}: evaluation and explanations need the Keras model. Export with "
            f"the keras format (tl-app export RUN_DIR --format savedmodel,keras) or pass the run directory."
        )
    config = Config.from_dict(config_data) if config_data else None  # same splits and data settings as training
    return Predictor(info.classes, info.input_size, info.resize_policy, source, kind, predict_fn, name=info.name,
                     version=info.version, card=info.card, background=info.background, model=model,
                     run_dir=run_dir, config=config)


def open_savedmodel(path: str | Path):
    """A SavedModel and its serving signatures by name (the init op left out); TensorFlow loads here."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return loaded, {name: fn for name, fn in loaded.signatures.items() if name != INIT_OP}


def savedmodel_function(signature):
    """The pixel signature as images -> probabilities (numpy)."""
    return lambda images: split_outputs(savedmodel_outputs(signature)(images))[0]


def savedmodel_outputs(signature):
    """The pixel signature as images -> probabilities, or {probabilities, ood_score} when it has a score."""
    import tensorflow as tf

    def run(images):
        out = signature(images=tf.convert_to_tensor(images, tf.float32))
        if OOD_SCORE in out:
            return {"probabilities": out["probabilities"].numpy(), OOD_SCORE: out[OOD_SCORE].numpy()}
        return out["probabilities"].numpy()

    return run


def keras_function(model, input_size: int):
    """images -> probabilities (numpy) of a Keras classifier."""
    run = keras_outputs(model, input_size)
    return lambda images: split_outputs(run(images))[0]


def keras_outputs(model, input_size: int):
    """One traced call per batch shape, as model.predict does, without its per-call set-up.

    images -> probabilities, or {probabilities, ood_score} for a model carrying an OOD score.
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)])
    def call(images):
        probabilities, score = split_outputs(model(images, training=False))
        if score is None:
            return tf.cast(probabilities, tf.float32)
        return {"probabilities": tf.cast(probabilities, tf.float32), OOD_SCORE: tf.cast(score, tf.float32)}

    def run(images):
        out = call(tf.convert_to_tensor(images, tf.float32))
        return {k: v.numpy() for k, v in out.items()} if isinstance(out, dict) else out.numpy()

    return run
