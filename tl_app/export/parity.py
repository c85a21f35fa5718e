"""Parity checks: every exported format must give the Keras model's outputs on sample images."""

from __future__ import annotations

import json
from pathlib import Path
from tl_app.core.errors import ExportError
from tl_app.models.artifacts import PIXELS_SIGNATURE
from tl_app.data.pipeline import load_images


FLOAT_TOLERANCE = 1e-3  # TFLite / ONNX float32 against Keras


SAVEDMODEL_TOLERANCE = 1e-5


QUANTIZED_TOLERANCE = 0.1  # dynamic-range int8 weights: reported, warned above this


# ---- parity ----------------------------------------------------------------------
def sample_images(run_dir: Path, info: dict, input_size: int, resize_policy: str, count: int = 8):
    """Real images of the run (validation split first); random pixels when the data has moved."""
    import numpy as np


    paths = []
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        try:
            records = json.loads(manifest.read_text()).get("records", [])
            records.sort(key=lambda r: (r.get("split") != "val", r.get("relpath", "")))
            paths = [r["path"] for r in records if Path(r.get("path", "")).is_file()][:count]
        except (ValueError, KeyError, TypeError):
            paths = []
    if paths:
        try:
            return load_images(paths, input_size, resize_policy), "dataset images"
        except Exception:
            pass
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (count, input_size, input_size, 3)).astype(np.float32), "random pixels"


def max_abs_diff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if len(a) else 0.0


def savedmodel_parity(directory: Path, images, reference) -> dict:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(directory))
    out = loaded.signatures[PIXELS_SIGNATURE](images=tf.constant(images))["probabilities"].numpy()
    diff = max_abs_diff(out, reference)
    if not diff <= SAVEDMODEL_TOLERANCE:
        raise ExportError(f"SavedModel parity check failed: max |difference| {diff:.2e} from the Keras model "
                          f"(tolerance {SAVEDMODEL_TOLERANCE:g}).")
    return {"max_abs_diff": diff, "tolerance": SAVEDMODEL_TOLERANCE}


def check_parity(label: str, out, reference, tolerance: float, strict: bool, echo) -> dict:
    import numpy as np

    diff = max_abs_diff(out, reference)
    if diff != diff:  # NaN never passes
        diff = float("inf")
    agree = float(np.mean(np.argmax(out, axis=1) == np.argmax(reference, axis=1))) if len(out) else 1.0
    result = {"max_abs_diff": diff, "tolerance": tolerance, "top1_agreement": agree}
    if diff > tolerance:
        if strict:
            raise ExportError(f"{label} parity check failed: max |difference| {diff:.2e} from the Keras model "
                              f"(tolerance {tolerance:g}); the converted model is not published.")
        echo(f"[export] warning: {label} differs from the Keras model by up to {diff:.2e} "
             f"(top-1 agreement {agree:.0%})")
    return result
