"""TFLite and ONNX conversion of an exported model, and runners used by the parity checks."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from tl_app.core.errors import ExportError


# ---- converters -----------------------------------------------------------------
def convert_tflite(model, path: Path, quantize: bool) -> None:
    """From the Keras model itself: a tf.Module's Keras 3 variables are not frozen by the converter."""
    import io

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic-range: int8 weights, float activations
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints its temporary export's endpoints
        path.write_bytes(converter.convert())


def run_tflite(path: Path, images):
    import numpy as np
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's move-to-LiteRT notice
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    key = next(iter(runner.get_input_details()))
    out = [next(iter(runner(**{key: images[i:i + 1].astype(np.float32)}).values())) for i in range(len(images))]
    return np.concatenate(out, axis=0)


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except Exception:
        return False
    return True


def convert_onnx(module, path: Path, input_size: int) -> None:
    if not onnx_available():
        raise ExportError(
            "ONNX export needs tf2onnx and onnxruntime, which are not installed. "
            "Install the extra with: pip install 'tl-app[onnx]' (or drop onnx from --format)."
        )
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images"),)
    try:
        tf2onnx.convert.from_function(module.probabilities, input_signature=spec, opset=17,
                                      output_path=str(path))
    except Exception as exc:  # the converter's own failure, reported with its reason
        raise ExportError(f"tf2onnx could not convert this model: {type(exc).__name__}: {exc}"[:600]) from None


def run_onnx(path: Path, images):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: images.astype(np.float32)})[0]
