"""Where the backbone runs during extraction: Keras itself, or ONNX Runtime on a converted copy.

A converted model is made once and kept next to the feature cache, in the
recipe's folder (its key already covers everything that changes the network:
backbone, weights, input size, layer, pooling, library versions). It is used
only after its outputs matched Keras on a calibration batch when it was
converted (max |difference| <= PARITY_TOLERANCE x the largest |feature|, at
least 1e-4 absolute); a conversion that does not match is refused, never
used. Because the outputs are equal, both runtimes share one cache recipe.

Reduced precision (features.precision) is an explicit choice with its own
recipe, since its features differ: ``int8`` is the ONNX conversion quantised
statically by ONNX Runtime (int8 per-channel weights, uint8 activations with
ranges calibrated on fixed pseudo-random pixels, QLinearConv kernels),
``bf16`` the Keras model under the mixed_bfloat16 policy. Either is used only
if its features keep a cosine >= PRECISION_COSINE with float32 Keras on every
image of the calibration batch; otherwise it is refused with the measured cosine.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tl_app.core.errors import TlAppError
from tl_app.core.files import atomic_write_text

RUNTIMES = ("keras", "onnxruntime", "tflite")
TFLITE_FILE = "backbone.tflite"
TFLITE_PARITY_FILE = "backbone.tflite.parity.json"
PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_COSINE = 0.999
INT8_FILE = "backbone.int8.onnx"
INT8_RECORD = "backbone.int8.gate.json"
PARITY_TOLERANCE = 1e-4
ONNX_FILE = "backbone.onnx"
PARITY_FILE = "backbone.onnx.parity.json"
CALIBRATION_IMAGES = 4


class KerasRuntime:
    """The Keras feature model, one batch per call."""

    name = "keras"

    def __init__(self, model):
        self.model = model

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images))


class OnnxRuntime:
    """A converted feature model in an ONNX Runtime session."""

    name = "onnxruntime"

    def __init__(self, path: str | Path):
        import onnxruntime as ort  # only here: the onnx extra is optional

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(images, np.float32)})[0]


class TfliteRuntime:
    """A converted feature model in TensorFlow Lite's interpreter (XNNPACK, its default CPU delegate)."""

    name = "tflite"

    def __init__(self, path: str | Path):
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's move-to-LiteRT notice
            self.interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.batch = None

    def run(self, images: np.ndarray) -> None:
        """Resize for this batch shape if it is new (extraction pads to one), set the input and invoke."""
        images = np.ascontiguousarray(images, np.float32)
        if self.batch != images.shape:
            self.interpreter.resize_tensor_input(self.input, list(images.shape))
            self.interpreter.allocate_tensors()
            self.batch = images.shape
        self.interpreter.set_tensor(self.input, images)
        self.interpreter.invoke()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.run(images)
        return np.array(self.interpreter.get_tensor(self.output))


def tflite_convert(model, path: Path, input_size: int) -> None:
    """A Keras model to a float32 .tflite (raw pixels in; batch resized at run time): the feature model, or
    predict's scored classifier."""
    import contextlib
    import io

    import tensorflow as tf

    # from the Keras model itself: a tf.function's Keras 3 variables are not frozen (garbage at run time)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):
        path.write_bytes(converter.convert())


def tf2onnx_convert(model, path: Path, input_size: int) -> None:
    """The Keras feature model to ONNX through tf2onnx (raw pixels in, features out)."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images"),)
    function = tf.function(lambda images: model(images, training=False))
    tf2onnx.convert.from_function(function, input_signature=spec, opset=17, output_path=str(path))


def onnx_versions() -> dict:
    versions = {}
    for package in ("onnxruntime", "tf2onnx", "onnx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def calibration_batch(input_size: int) -> np.ndarray:
    """Fixed pseudo-random pixels in 0..255: the same batch in every check."""
    rng = np.random.default_rng(17)
    return rng.uniform(0, 255, (CALIBRATION_IMAGES, input_size, input_size, 3)).astype(np.float32)


def parity(expected: np.ndarray, got: np.ndarray) -> dict:
    """How far a converted model's outputs are from Keras', and whether that is within the tolerance."""
    expected = np.asarray(expected, np.float32).reshape(len(expected), -1)
    got = np.asarray(got, np.float32)
    if got.shape[0] != expected.shape[0] or got.size != expected.size:
        return {"ok": False, "reason": f"output shape {tuple(got.shape)} instead of {tuple(expected.shape)}"}
    got = got.reshape(expected.shape)
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    allowed = PARITY_TOLERANCE * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    return {"ok": bool(np.isfinite(diff) and diff <= allowed), "max_abs_diff": diff, "allowed": allowed,
            "tolerance": PARITY_TOLERANCE}


def open_runtime(name: str, model, folder: str | Path, input_size: int,
                 converter: Callable | None = None) -> KerasRuntime | OnnxRuntime | TfliteRuntime:
    """The runtime ``name`` for ``model``; onnxruntime and tflite convert once into ``folder`` and check parity."""
    if name == "keras":
        return KerasRuntime(model)
    if name == "tflite":
        return open_tflite(model, Path(folder), input_size, converter or tflite_convert)
    converter = converter or tf2onnx_convert
    if name != "onnxruntime":
        raise TlAppError(f"Unknown runtime {name!r}: expected one of {', '.join(RUNTIMES)}.")
    versions = onnx_versions()
    if versions["onnxruntime"] is None or versions["tf2onnx"] is None:
        raise TlAppError("--runtime onnxruntime needs onnxruntime and tf2onnx, which are not installed. Install "
                         "them with: pip install 'tl-app[onnx]', or use --runtime keras.")
    return open_converted(model, Path(folder), input_size, converter, versions, OnnxRuntime, "ONNX",
                          ONNX_FILE, PARITY_FILE)


def open_tflite(model, folder: Path, input_size: int, converter: Callable) -> TfliteRuntime:
    """The TFLite copy of ``model``: converted once into ``folder``, used only within the parity tolerance."""
    import tensorflow as tf

    return open_converted(model, folder, input_size, converter, {"tensorflow": tf.__version__}, TfliteRuntime,
                          "TFLite", TFLITE_FILE, TFLITE_PARITY_FILE)


def open_converted(model, folder: Path, input_size: int, converter: Callable, versions: dict, runtime_class,
                   label: str, file: str, parity_file: str):
    """``runtime_class`` on the converted copy of ``model`` in ``folder``: reused when its recorded parity
    check passed with these library ``versions``, else converted to a temporary file, compared with Keras on
    the calibration batch, and renamed into place only if it matches (refused otherwise)."""
    path, record = folder / file, folder / parity_file
    try:
        checked = json.loads(record.read_text())
    except (OSError, ValueError):
        checked = {}
    if path.is_file() and checked.get("ok") and checked.get("versions") == versions:
        return runtime_class(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}-{file}"
    try:
        try:
            converter(model, tmp, input_size)
        except Exception as exc:  # the converter's own failure, reported with its reason
            raise TlAppError(f"The backbone could not be converted to {label} ({type(exc).__name__}: "
                             f"{str(exc)[:300]}). Use --runtime keras.") from None
        sample = calibration_batch(input_size)
        result = parity(np.asarray(model.predict_on_batch(sample)), runtime_class(tmp)(sample))
        if not result["ok"]:
            detail = result.get("reason") or (f"max |difference| {result['max_abs_diff']:.3g}, "
                                              f"allowed {result['allowed']:.3g}")
            raise TlAppError(f"The {label} conversion of the backbone does not match Keras ({detail}), so it is "
                             f"refused: features must not depend on the runtime. Use --runtime keras.")
        os.replace(tmp, path)
        atomic_write_text(record, json.dumps({**result, "versions": versions, "input_size": input_size}, indent=1))
    finally:
        if tmp.exists():
            tmp.unlink()
    return runtime_class(path)


# ---- reduced precision ---------------------------------------------------------------
def cosine_gate(expected: np.ndarray, got: np.ndarray) -> dict:
    """Per-image cosine of reduced-precision features with float32 Keras'; ok when the lowest is >= the gate."""
    expected = np.asarray(expected, np.float64).reshape(len(expected), -1)
    got = np.asarray(got, np.float64)
    if got.size != expected.size:
        return {"ok": False, "min_cosine": float("nan"), "reason": f"output shape {tuple(got.shape)} instead of "
                f"{tuple(expected.shape)}"}
    got = got.reshape(expected.shape)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    cosine = np.where(norms > 0, np.sum(expected * got, axis=1) / np.maximum(norms, 1e-30),
                      np.where(np.linalg.norm(expected, axis=1) == np.linalg.norm(got, axis=1), 1.0, 0.0))
    low = float(np.min(cosine)) if len(cosine) else 1.0
    return {"ok": bool(np.isfinite(low) and low >= PRECISION_COSINE), "min_cosine": low,
            "mean_cosine": float(np.mean(cosine)) if len(cosine) else 1.0, "gate": PRECISION_COSINE,
            "images": int(len(cosine))}


def refuse_precision(precision: str, result: dict) -> None:
    if not result["ok"]:
        measured = result.get("reason") or f"lowest feature cosine {result['min_cosine']:.5f}"
        raise TlAppError(f"--precision {precision} is refused for this backbone: its features are too far from "
                         f"float32 ({measured} on the calibration batch; the gate is cosine >= {PRECISION_COSINE}). "
                         f"Use --precision fp32.")


QUANTIZE_IMAGES = 16


def ort_quantize_dynamic(source: Path, target: Path, input_size: int) -> None:
    """int8 weights, activations quantised per batch (ConvInteger): closer to float32 on small inputs, but it
    measured 0.17x the Keras baseline on this machine, so the static quantiser is the default."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def ort_quantize_static(source: Path, target: Path, input_size: int, images: np.ndarray | None = None,
                        op_types: Sequence[str] | None = None) -> None:
    """Static int8 (QOperator: QLinearConv/QLinearMatMul), per-channel weights; activation ranges calibrated
    on ``images`` (raw pixels, one per calibration step), by default QUANTIZE_IMAGES fixed pseudo-random images
    (another seed than the gate's calibration batch). ``op_types``: quantise only these operators (a
    classifier keeps its head and OOD scorer in float32 with ("Conv",)); None: every one the quantiser can.
    Dynamic quantisation measured 0.17x the Keras baseline here (ConvInteger), static ~1.9x ONNX fp32."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = source.with_name(source.name + ".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    if images is None:
        rng = np.random.default_rng(1)
        images = rng.uniform(0, 255, (QUANTIZE_IMAGES, input_size, input_size, 3))
    images = [np.asarray(x, np.float32)[None] for x in images]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({name: x} for x in images)

        def get_next(self):
            return next(self.items, None)

    try:
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types) if op_types else None)
    finally:
        prepared.unlink(missing_ok=True)


def open_int8(model, folder: str | Path, input_size: int, converter: Callable = tf2onnx_convert,
              quantizer: Callable = ort_quantize_static) -> OnnxRuntime:
    """The int8 backbone: converted, quantised and gated once into ``folder`` (the int8 recipe's)."""
    folder = Path(folder)
    path, record = folder / INT8_FILE, folder / INT8_RECORD
    versions = onnx_versions()
    if versions["onnxruntime"] is None or versions["tf2onnx"] is None:
        raise TlAppError("--precision int8 needs onnxruntime and tf2onnx, which are not installed. Install "
                         "them with: pip install 'tl-app[onnx]', or use --precision fp32.")
    try:
        checked = json.loads(record.read_text())
    except (OSError, ValueError):
        checked = {}
    if path.is_file() and checked.get("ok") and checked.get("versions") == versions:
        return OnnxRuntime(path)
    folder.mkdir(parents=True, exist_ok=True)
    full, tmp = folder / f".tmp-{os.getpid()}-fp32-{ONNX_FILE}", folder / f".tmp-{os.getpid()}-{INT8_FILE}"
    try:
        try:
            converter(model, full, input_size)
            quantizer(full, tmp, input_size)
        except Exception as exc:  # the converter's or quantiser's own failure, with its reason
            raise TlAppError(f"The backbone could not be quantised to int8 ({type(exc).__name__}: "
                             f"{str(exc)[:300]}). Use --precision fp32.") from None
        sample = calibration_batch(input_size)
        result = cosine_gate(np.asarray(model.predict_on_batch(sample)), OnnxRuntime(tmp)(sample))
        refuse_precision("int8", result)
        os.replace(tmp, path)
        atomic_write_text(record, json.dumps({**result, "versions": versions, "input_size": input_size,
                                              "precision": "int8"}, indent=1))
    finally:
        for leftover in (full, tmp):
            if leftover.exists():
                leftover.unlink()
    return OnnxRuntime(path)


def open_bf16(model, bf16_model, input_size: int) -> KerasRuntime:
    """The Keras backbone under mixed_bfloat16 (``bf16_model``, float32 ``model``'s weights), gated against it."""
    bf16_model.set_weights(model.get_weights())
    sample = calibration_batch(input_size)
    refuse_precision("bf16", cosine_gate(np.asarray(model.predict_on_batch(sample)),
                                         np.asarray(bf16_model.predict_on_batch(sample), np.float32)))
    return KerasRuntime(bf16_model)
