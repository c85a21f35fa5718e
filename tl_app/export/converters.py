"""TFLite and ONNX conversion of an exported model, and runners used by the parity checks."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from tl_app.core.errors import ExportError


# ---- converters -----------------------------------------------------------------
def convert_tflite(model, path: Path, quantize: bool) -> None:
    """From the Keras model itself: a tf.Module's Keras 3 variables are not frozen by the converter.

    A model with named outputs (models.ood.with_verdict: probabilities, ood_score,
    unknown) keeps them as the signature's output names.
    """
    import io

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic-range: int8 weights, float activations
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints its temporary export's endpoints
        path.write_bytes(converter.convert())


def tflite_outputs(path: Path, images) -> dict:
    """Every named output of a .tflite file's signature on ``images``, one image per call (its batch is 1)."""
    import numpy as np
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's move-to-LiteRT notice
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    key = next(iter(runner.get_input_details()))
    rows = [runner(**{key: images[i:i + 1].astype(np.float32)}) for i in range(len(images))]
    return {name: np.concatenate([row[name] for row in rows], axis=0) for name in (rows[0] if rows else {})}


def probabilities_of(outputs: dict):
    """The probabilities among a converted model's outputs (the only output of a model without a scorer)."""
    return outputs["probabilities"] if "probabilities" in outputs else next(iter(outputs.values()))


def run_tflite(path: Path, images):
    return probabilities_of(tflite_outputs(path, images))


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
        tf2onnx.convert.from_function(module.plain_outputs, input_signature=spec, opset=17,
                                      output_path=str(path))
    except Exception as exc:  # the converter's own failure, reported with its reason
        raise ExportError(f"tf2onnx could not convert this model: {type(exc).__name__}: {exc}"[:600]) from None


def onnx_outputs(path: Path, images) -> dict:
    """Every named output of an .onnx file on ``images`` (probabilities, and ood_score/unknown when scored)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    values = session.run(None, {name: images.astype(np.float32)})
    return {output.name.split(":")[0]: value for output, value in zip(session.get_outputs(), values)}


def run_onnx(path: Path, images):
    return probabilities_of(onnx_outputs(path, images))
