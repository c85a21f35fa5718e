"""Where batch prediction runs the classifier: Keras (the SavedModel or model.keras), ONNX Runtime or TFLite.

For ``onnxruntime`` and ``tflite`` (the TFLite interpreter with XNNPACK, full
precision) the classifier (with its temperature and OOD score, as predict
answers) is converted once and kept beside the model in a hidden
``.runtime/`` folder, named by a key of the model file's bytes, its recorded
temperature and OOD scorer and the converter and library versions, so a changed
model never reuses a stale conversion. The conversion is used only after it
matched Keras on a calibration batch when it was made: the same top-1 class,
probabilities within 1e-4 and the OOD score within 1e-4 (relative to its size)
with the same verdict; otherwise it is refused with what differed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.errors import ConfigError, ModelNotFoundError, TlAppError
from tl_app.core.config import Config
from tl_app.core.files import atomic_write_text
from tl_app.features.runtime import PARITY_TOLERANCE, TfliteRuntime, ort_quantize_static, parity, tflite_convert
from tl_app.models.artifacts import KERAS_FILE, MODEL_FILE, RUN_FILE
from tl_app.models.ood import LAYER_NAME as OOD_SCORE, OOD_FILE, PROBABILITIES, split_outputs
from tl_app.models.opener import (ModelInfo, Predictor, calibrated_model, config_data_of, ood_threshold_of,
                                  open_model, read_model_info, scored_model)

PREDICT_RUNTIMES = ("keras", "onnxruntime", "tflite")
SUFFIX = {"onnxruntime": "onnx", "tflite": "tflite"}
PREDICT_PRECISIONS = ("fp32", "int8")
INT8_AGREEMENT = 0.99  # top-1 (and unknown-verdict) agreement of int8 with float32 Keras on the gate images
CALIBRATE_IMAGES = 16  # the first of the user's images set the int8 activation ranges; the rest gate it
SAMPLE_IMAGES = 128  # the user's images predict reads for calibration and the gate
MIN_GATE_IMAGES = 20  # fewer images left after calibration: the gate checks every image of the sample
FOLDER = ".runtime"
PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime")


def model_target(info: ModelInfo) -> Path:
    """The .keras file the conversion starts from (a run's model.keras, an export's model.keras)."""
    target = info.source / (MODEL_FILE if (info.source / RUN_FILE).is_file() else KERAS_FILE)
    if not target.is_file():
        raise ModelNotFoundError(
            f"{info.source} has no {KERAS_FILE}, which --runtime onnxruntime and tflite convert from. Export with the "
            f"keras format (tl-app export RUN_DIR --format savedmodel,keras), pass the run directory, or use "
            f"--runtime keras.")
    return target


def versions() -> dict:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def conversion_key(info: ModelInfo, target: Path) -> str:
    """Everything that changes what the converted model answers: the model file's bytes, a run's temperature
    and OOD scorer (kept beside model.keras), the input size and the libraries."""
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    extra = {"temperature": info.card.get("temperature"), "ood": info.card.get("ood"),
             "calibration": info.card.get("calibration"), "input_size": info.input_size, "versions": versions()}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    scorer = info.source / OOD_FILE
    if (info.source / RUN_FILE).is_file() and scorer.is_file():
        digest.update(scorer.read_bytes())
    return digest.hexdigest()[:24]


def tf2onnx_classifier(model, path: Path, input_size: int) -> None:
    """The scored Keras classifier to ONNX: pixels in, ``probabilities`` (and ``ood_score``) out."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images"),)

    def outputs(images):
        probabilities, score = split_outputs(model(images, training=False))
        out = {PROBABILITIES: tf.cast(probabilities, tf.float32)}
        if score is not None:
            out[OOD_SCORE] = tf.cast(score, tf.float32)
        return out

    tf2onnx.convert.from_function(tf.function(outputs), input_signature=spec, opset=17, output_path=str(path))


class OnnxClassifier:
    """A converted classifier in an ONNX Runtime session: pixels -> {probabilities, ood_score}."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort  # only here: the onnx extra is optional

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.names = [output.name.split(":")[0] for output in self.session.get_outputs()]

    def __call__(self, images) -> dict:
        values = self.session.run(None, {self.input: np.ascontiguousarray(np.asarray(images), np.float32)})
        out = dict(zip(self.names, values))
        if OOD_SCORE in out:
            out[OOD_SCORE] = np.asarray(out[OOD_SCORE]).reshape(-1)
        return out


class TfliteClassifier(TfliteRuntime):
    """A converted classifier in TFLite's interpreter (XNNPACK): pixels -> {probabilities, ood_score}.

    TFLite names its outputs after graph tensors, so they are told apart by shape: probabilities are
    (batch, classes) with two or more classes, the OOD score one number per image."""

    def __call__(self, images) -> dict:
        self.run(np.asarray(images))
        out = {}
        for detail in self.interpreter.get_output_details():
            value = np.array(self.interpreter.get_tensor(detail["index"]))
            if value.ndim == 2 and value.shape[-1] > 1:
                out[PROBABILITIES] = value
            else:
                out[OOD_SCORE] = value.reshape(-1)
        return out


CONVERTERS = {"onnxruntime": tf2onnx_classifier, "tflite": tflite_convert}  # tflite: from the Keras model itself
CLASSIFIERS = {"onnxruntime": OnnxClassifier, "tflite": TfliteClassifier}


def calibration_images(input_size: int) -> np.ndarray:
    """Fixed pixels in 0..255, the same in every check: noise, flat colours and gradients."""
    rng = np.random.default_rng(17)
    noise = rng.uniform(0, 255, (4, input_size, input_size, 3))
    flat = np.broadcast_to(np.array([[0, 0, 0], [255, 255, 255], [200, 40, 40], [30, 160, 90]], np.float64)
                           [:, None, None, :], (4, input_size, input_size, 3))
    ramp = np.linspace(0, 255, input_size)
    gradient = np.stack([np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1),
                         np.stack(np.broadcast_arrays(ramp[:, None], 128.0 + 0 * ramp[None, :], ramp[None, :]), -1)])
    return np.concatenate([noise, flat, gradient]).astype(np.float32)


def classifier_parity(expected: dict, got: dict, threshold: float | None) -> dict:
    """{ok, probabilities, top1_agreement, ood_score?, verdict_agreement?, reason?} of a conversion against Keras.

    A top-1 class (or a verdict) counts as disagreeing only where Keras' own margin is wider than the
    tolerance: a near tie may flip within 1e-4 and that is the tolerance's business, not the class's.
    """
    probs, other = np.asarray(expected[PROBABILITIES], np.float32), got.get(PROBABILITIES)
    if other is None:
        return {"ok": False, "reason": "no probabilities output"}
    result = {"probabilities": parity(probs, other)}
    reasons = [] if result["probabilities"]["ok"] else [
        result["probabilities"].get("reason") or f"probabilities differ by up to "
        f"{result['probabilities']['max_abs_diff']:.3g} (allowed {result['probabilities']['allowed']:.3g})"]
    if result["probabilities"]["ok"]:
        ordered = np.sort(probs, axis=-1)
        clear = ordered[:, -1] - ordered[:, -2] > 2 * PARITY_TOLERANCE if probs.shape[-1] > 1 else np.ones(len(probs), bool)
        same = np.argmax(probs, -1) == np.argmax(np.asarray(other).reshape(probs.shape), -1)
        result["top1_agreement"] = float(np.mean(same[clear])) if clear.any() else 1.0
        if not same[clear].all():
            reasons.append(f"top-1 class agreement {result['top1_agreement']:.3f} instead of 1")
    if OOD_SCORE in expected:
        if OOD_SCORE not in got:
            reasons.append("no ood_score output")
        else:
            score = np.asarray(expected[OOD_SCORE], np.float32).reshape(-1)
            result[OOD_SCORE] = parity(score, np.asarray(got[OOD_SCORE]).reshape(-1))
            if not result[OOD_SCORE]["ok"]:
                reasons.append(result[OOD_SCORE].get("reason") or f"ood_score differs by up to "
                               f"{result[OOD_SCORE]['max_abs_diff']:.3g} (allowed {result[OOD_SCORE]['allowed']:.3g})")
            elif threshold is not None:
                other_score = np.asarray(got[OOD_SCORE]).reshape(-1)
                clear = np.abs(score - threshold) > result[OOD_SCORE]["allowed"]
                same = (score > threshold) == (other_score > threshold)
                result["verdict_agreement"] = float(np.mean(same[clear])) if clear.any() else 1.0
                if not same[clear].all():
                    reasons.append(f"unknown-verdict agreement {result['verdict_agreement']:.3f} instead of 1")
    result["ok"] = not reasons
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result


def keras_answers(model, images: np.ndarray) -> dict:
    probabilities, score = split_outputs(model(images, training=False))
    out = {PROBABILITIES: np.asarray(probabilities, np.float32)}
    if score is not None:
        out[OOD_SCORE] = np.asarray(score, np.float32).reshape(-1)
    return out


def passed_record(path: Path, record: Path) -> dict:
    """The record of a conversion kept at ``path`` that passed its check, or {} (none, unreadable, refused)."""
    try:
        checked = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return checked if path.is_file() and checked.get("ok") else {}


def converted_classifier(info: ModelInfo, converter: Callable | None = None,
                         runtime: str = "onnxruntime") -> tuple[Path, dict]:
    """(the checked .onnx or .tflite file, its parity record), converting and checking it first when none matches
    the key."""
    found = versions()
    converter = converter or CONVERTERS[runtime]
    if runtime == "onnxruntime" and (found["onnxruntime"] is None or found["tf2onnx"] is None):
        raise ConfigError("--runtime onnxruntime needs onnxruntime and tf2onnx, which are not installed. Install "
                          "them with: pip install 'tl-app[onnx]', or use --runtime keras.")
    target = model_target(info)
    key = conversion_key(info, target)
    folder = info.source / FOLDER
    stem = f"classifier-{key}-{SUFFIX[runtime]}"
    path, record = folder / f"{stem}.{SUFFIX[runtime]}", folder / f"{stem}.parity.json"
    checked = passed_record(path, record)
    if checked:
        return path, checked
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise TlAppError(f"--runtime {runtime} keeps its converted model in {folder}, which cannot be written "
                         f"({exc.strerror}). Use a copy of the model in a writable folder, or --runtime keras.") from None
    model = scored_model(info, calibrated_model(info, target))
    tmp = folder / f".tmp-{os.getpid()}-{path.name}"
    try:
        try:
            converter(model, tmp, info.input_size)
        except Exception as exc:  # the converter's own failure, reported with its reason
            raise TlAppError(f"The model could not be converted for {runtime} ({type(exc).__name__}: "
                             f"{str(exc)[:300]}). Use --runtime keras.") from None
        images = calibration_images(info.input_size)
        result = classifier_parity(keras_answers(model, images), CLASSIFIERS[runtime](tmp)(images),
                                   ood_threshold_of(info.card))
        if not result["ok"]:
            raise TlAppError(f"The {runtime} conversion of {info.source} does not match Keras ({result['reason']}), "
                             f"so it is refused: predictions must not depend on the runtime. Use --runtime keras.")
        for stale in folder.glob(f"classifier-*-{SUFFIX[runtime]}.*"):  # this runtime's earlier conversions
            stale.unlink(missing_ok=True)
        os.replace(tmp, path)
        result.update(versions=found, key=key, images=len(images))
        atomic_write_text(record, json.dumps(result, indent=1, default=float))
    finally:
        tmp.unlink(missing_ok=True)
    return path, result


def agreement(expected: dict, got: dict, threshold: float | None) -> dict:
    """Top-1 and unknown-verdict agreement of a reduced-precision classifier with float32 Keras, every image
    counted (near ties too: they are where reduced precision flips answers)."""
    probs = np.asarray(expected[PROBABILITIES])
    other = np.asarray(got.get(PROBABILITIES, np.zeros_like(probs))).reshape(probs.shape)
    result = {"images": int(len(probs)), "gate": INT8_AGREEMENT,
              "top1_agreement": float(np.mean(probs.argmax(-1) == other.argmax(-1))),
              "max_abs_probability_diff": float(np.max(np.abs(probs - other)))}
    reasons = [] if result["top1_agreement"] >= INT8_AGREEMENT else [
        f"top-1 class agreement {result['top1_agreement']:.3f}"]
    if OOD_SCORE in expected and threshold is not None:
        score = np.asarray(expected[OOD_SCORE]).reshape(-1)
        other_score = np.asarray(got.get(OOD_SCORE, np.full_like(score, np.nan))).reshape(-1)
        result["verdict_agreement"] = float(np.mean((score > threshold) == (other_score > threshold)))
        if result["verdict_agreement"] < INT8_AGREEMENT:
            reasons.append(f"unknown-verdict agreement {result['verdict_agreement']:.3f}")
    result["ok"] = not reasons
    if reasons:
        result["reason"] = "; ".join(reasons)
    return result


def quantize_convolutions(source: Path, target: Path, input_size: int, images: np.ndarray) -> None:
    """Static int8 for the backbone's convolutions only: the head, the temperature and the OOD scorer's
    distances stay float32 (quantised, the k-NN distances flipped verdicts)."""
    ort_quantize_static(source, target, input_size, images, op_types=("Conv",))


def int8_classifier(info: ModelInfo, sample: Callable[[], np.ndarray], quantizer: Callable = quantize_convolutions
                    ) -> tuple[Path, dict]:
    """(the gated int8 .onnx file, its record): the parity-checked float32 ONNX classifier's convolutions
    statically quantised with activation ranges from the first CALIBRATE_IMAGES of ``sample()`` (the user's
    own images, as predict feeds them; read only when there is no gated copy yet), then gated on the rest
    (all of them when fewer than MIN_GATE_IMAGES are left): top-1 and unknown-verdict agreement with float32
    Keras of at least INT8_AGREEMENT, or it is refused. The fixed synthetic calibration images are not used:
    noise and flat colours sit on decision boundaries no photo is near. Kept beside the fp32 conversion under
    the same key, so a changed model is quantised and gated again."""
    source, _ = converted_classifier(info, None, "onnxruntime")
    stem = source.name[: -len("-onnx.onnx")] + "-int8"
    path, record = source.with_name(f"{stem}.onnx"), source.with_name(f"{stem}.gate.json")
    checked = passed_record(path, record)
    if checked:
        return path, checked
    sample = np.asarray(sample(), np.float32).reshape(-1, info.input_size, info.input_size, 3)
    calibrate = sample[:CALIBRATE_IMAGES]
    if not len(calibrate):
        raise TlAppError("--precision int8 calibrates on the images it predicts, and none could be read. Use "
                         "--precision fp32.")
    # the rest gate it; too few of them (under MIN_GATE_IMAGES), and every image does
    gate = sample[CALIBRATE_IMAGES:] if len(sample) - CALIBRATE_IMAGES >= MIN_GATE_IMAGES else sample
    tmp = source.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        try:
            quantizer(source, tmp, info.input_size, calibrate)
        except Exception as exc:  # the quantiser's own failure, with its reason
            raise TlAppError(f"The model could not be quantised to int8 ({type(exc).__name__}: {str(exc)[:300]}). "
                             f"Use --precision fp32.") from None
        model = scored_model(info, calibrated_model(info, model_target(info)))
        batches = [keras_answers(model, gate[i:i + 32]) for i in range(0, len(gate), 32)]
        expected = {k: np.concatenate([batch[k] for batch in batches]) for k in batches[0]}
        result = agreement(expected, OnnxClassifier(tmp)(gate), ood_threshold_of(info.card))
        if not result["ok"]:
            raise TlAppError(f"--precision int8 is refused for {info.source}: its answers are too far from float32 "
                             f"({result['reason']} on {result['images']} of your images; the gate is "
                             f"{INT8_AGREEMENT:.0%}). Use --precision fp32.")
        for stale in source.parent.glob("classifier-*-int8.*"):
            stale.unlink(missing_ok=True)
        os.replace(tmp, path)
        result.update(calibration_images=int(len(calibrate)), precision="int8")
        atomic_write_text(record, json.dumps(result, indent=1, default=float))
    finally:
        tmp.unlink(missing_ok=True)
    return path, result


def open_predictor(model, runtime: str = "keras", converter: Callable | None = None, precision: str = "fp32",
                   sample: Callable[[], np.ndarray] | None = None) -> Predictor:
    """The Predictor batch prediction uses: ``open_model``'s for keras, a checked conversion otherwise.

    ``model`` is a path or an opened Predictor (its source is converted for onnxruntime and tflite).
    ``precision`` int8 runs ONNX Runtime on a statically quantised copy, calibrated and gated on ``sample()``
    (the user's images, decoded and resized as predict feeds them; see ``int8_classifier``).
    """
    if runtime not in PREDICT_RUNTIMES:
        raise ConfigError(f"Unknown runtime {runtime!r} for predict: expected one of {', '.join(PREDICT_RUNTIMES)}.")
    if precision not in PREDICT_PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r} for predict: expected one of "
                          f"{', '.join(PREDICT_PRECISIONS)}.")
    if precision == "int8" and runtime == "tflite":
        raise ConfigError("--precision int8 runs ONNX Runtime on a quantised copy; drop --runtime tflite.")
    if runtime == "keras" and precision == "fp32":
        return model if isinstance(model, Predictor) else open_model(model)
    info = read_model_info(model.source if isinstance(model, Predictor) else model)
    if precision == "int8":
        path, _ = int8_classifier(info, sample or (lambda: np.zeros((0, info.input_size, info.input_size, 3))))
        runtime = "onnxruntime"
    else:
        path, _ = converted_classifier(info, converter, runtime)
    config_data = config_data_of(info)
    run_dir = info.source if (info.source / RUN_FILE).is_file() else None
    return Predictor(info.classes, info.input_size, info.resize_policy, info.source,
                     runtime if precision == "fp32" else f"{runtime}-{precision}", CLASSIFIERS[runtime](path),
                     name=info.name, version=info.version, card=info.card,
                     background=info.background, run_dir=run_dir,
                     config=Config.from_dict(config_data) if config_data else None)
