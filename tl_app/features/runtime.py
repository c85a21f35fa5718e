"""Where the backbone runs during extraction: Keras itself, or ONNX Runtime on a converted copy.

A converted model is made once and kept next to the feature cache, in the
recipe's folder (its key already covers everything that changes the network:
backbone, weights, input size, layer, pooling, library versions). It is used
only after its outputs matched Keras on a calibration batch when it was
converted (max |difference| <= PARITY_TOLERANCE x the largest |feature|, at
least 1e-4 absolute); a conversion that does not match is refused, never
used. Because the outputs are equal, both runtimes share one cache recipe.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.errors import TlAppError
from tl_app.core.files import atomic_write_text

RUNTIMES = ("keras", "onnxruntime")
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
                 converter: Callable = tf2onnx_convert) -> KerasRuntime | OnnxRuntime:
    """The runtime ``name`` for ``model``; onnxruntime converts once into ``folder`` and checks parity."""
    if name == "keras":
        return KerasRuntime(model)
    if name != "onnxruntime":
        raise TlAppError(f"Unknown runtime {name!r}: expected one of {', '.join(RUNTIMES)}.")
    folder = Path(folder)
    path, record = folder / ONNX_FILE, folder / PARITY_FILE
    versions = onnx_versions()
    if versions["onnxruntime"] is None or versions["tf2onnx"] is None:
        raise TlAppError("--runtime onnxruntime needs onnxruntime and tf2onnx, which are not installed. Install "
                         "them with: pip install 'tl-app[onnx]', or use --runtime keras.")
    try:
        checked = json.loads(record.read_text())
    except (OSError, ValueError):
        checked = {}
    if path.is_file() and checked.get("ok") and checked.get("versions") == versions:
        return OnnxRuntime(path)
    return OnnxRuntime(convert_checked(model, folder, input_size, converter, versions))


def convert_checked(model, folder: Path, input_size: int, converter: Callable, versions: dict) -> Path:
    """Convert to a temporary file, compare with Keras on the calibration batch, then rename into place."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}-{ONNX_FILE}"
    try:
        try:
            converter(model, tmp, input_size)
        except Exception as exc:  # the converter's own failure, reported with its reason
            raise TlAppError(f"The backbone could not be converted to ONNX ({type(exc).__name__}: "
                             f"{str(exc)[:300]}). Use --runtime keras.") from None
        sample = calibration_batch(input_size)
        result = parity(np.asarray(model.predict_on_batch(sample)), OnnxRuntime(tmp)(sample))
        if not result["ok"]:
            detail = result.get("reason") or (f"max |difference| {result['max_abs_diff']:.3g}, "
                                              f"allowed {result['allowed']:.3g}")
            raise TlAppError(f"The ONNX conversion of the backbone does not match Keras ({detail}), so it is "
                             f"refused: features must not depend on the runtime. Use --runtime keras.")
        os.replace(tmp, folder / ONNX_FILE)
        atomic_write_text(folder / PARITY_FILE, json.dumps({**result, "versions": versions,
                                                            "input_size": input_size}, indent=1))
    finally:
        if tmp.exists():
            tmp.unlink()
    return folder / ONNX_FILE
