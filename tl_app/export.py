"""Export a trained run to saved_models/<name>/<version>/ (the TensorFlow Serving layout).

A version folder holds the SavedModel (``saved_model.pb`` + ``variables/``),
``model.keras``, optional ``model.tflite`` / ``model.onnx`` and
``model_card.json``. It is built in a hidden temporary folder next to the
versions and renamed into place, so a reader (TF Serving, ``tl-app serve``)
never sees a half-written version, and a killed export leaves nothing but a
hidden folder that the next export removes.

The SavedModel carries decoding, resizing and the backbone preprocessing in
its graph, so serving cannot drift from training:

* ``serving_default``: ``image_bytes`` (string [N], encoded JPEG/PNG/GIF/BMP)
* ``predict_pixels``: ``images`` (float32 [N, H, W, 3], RGB 0..255, any size)

Both return ``probabilities`` [N, C], ``class_index`` [N], ``class_name`` [N]
and ``class_names`` [N, C] (every output has the batch dimension first, as
TF Serving's row format requires).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import secrets
import time
import warnings
from pathlib import Path

from tl_app.errors import ConfigError, ModelNotFoundError, TlAppError, closest
from tl_app.files import pid_alive

FORMATS = ("savedmodel", "keras", "tflite", "onnx")
CARD_FILE = "model_card.json"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
ONNX_FILE = "model.onnx"
SAVED_MODEL_FILE = "saved_model.pb"
BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "predict_pixels"
TEMP_PREFIX = ".export-"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")  # version folder names: 1, 2, ... (ASCII digits only)
FLOAT_TOLERANCE = 1e-3  # TFLite / ONNX float32 against Keras
SAVEDMODEL_TOLERANCE = 1e-5
QUANTIZED_TOLERANCE = 0.1  # dynamic-range int8 weights: reported, warned above this


class ExportError(TlAppError):
    """An export could not be completed (conversion or parity failure)."""


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


# ---- the SavedModel -----------------------------------------------------------
def build_serving_module(model, classes: list[str], input_size: int, resize_policy: str):
    """A tf.Module whose tf.functions carry decode + resize + the model."""
    import tensorflow as tf

    from tl_app.pipeline import effective_policy, resize_images

    policy = effective_policy(resize_policy)
    size = int(input_size)

    class ServingModule(tf.Module):
        def __init__(self):
            super().__init__(name="tl_app_classifier")
            self.model = model
            self.class_list = tf.constant(list(classes), dtype=tf.string)

        def _outputs(self, images):
            probabilities = tf.cast(self.model(images, training=False), tf.float32)
            index = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
            n = tf.shape(probabilities)[0]
            return {
                "probabilities": probabilities,
                "class_index": index,
                "class_name": tf.gather(self.class_list, index),
                "class_names": tf.tile(self.class_list[tf.newaxis, :], tf.stack([n, 1])),
            }

        def _resize_batch(self, images):
            images = tf.cast(images, tf.float32)
            shape = tf.shape(images)
            same = tf.logical_and(tf.equal(shape[1], size), tf.equal(shape[2], size))
            out = tf.cond(same, lambda: tf.clip_by_value(images, 0.0, 255.0),
                          lambda: resize_images(images, size, policy))
            out.set_shape([None, size, size, 3])
            return out

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve_bytes(self, image_bytes):
            def decode(data):
                image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
                image.set_shape([None, None, 3])
                resized = resize_images(image, size, policy)
                resized.set_shape([size, size, 3])
                return resized

            # A few images decode at once: parallel enough, and full-size decodes stay bounded in memory.
            images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
                               parallel_iterations=8)
            return self._outputs(images)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def serve_pixels(self, images):
            return self._outputs(self._resize_batch(images))

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        def probabilities(self, images):
            """The plain model for converters (TFLite, ONNX): fixed size, probabilities only."""
            return {"probabilities": tf.cast(self.model(images, training=False), tf.float32)}

    return ServingModule()


def save_savedmodel(module, directory: Path) -> None:
    import tensorflow as tf

    signatures = {
        BYTES_SIGNATURE: module.serve_bytes.get_concrete_function(),
        PIXELS_SIGNATURE: module.serve_pixels.get_concrete_function(),
    }
    tf.saved_model.save(module, str(directory), signatures=signatures)


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


# ---- parity ----------------------------------------------------------------------
def sample_images(run_dir: Path, info: dict, input_size: int, resize_policy: str, count: int = 8):
    """Real images of the run (validation split first); random pixels when the data has moved."""
    import numpy as np

    from tl_app.pipeline import load_images

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


# ---- the model card -------------------------------------------------------------
PREPROCESS_TEXT = {
    "caffe": "RGB->BGR, minus the ImageNet channel means (103.939, 116.779, 123.68); inside the model",
    "tf": "pixels scaled from 0..255 to -1..1; inside the model",
}


def model_card(run_dir: Path, info: dict, name: str, version: int, formats: list[str], quantize: bool) -> dict:
    from tl_app.runs import versions

    config = {}
    if (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
    preprocess = info.get("preprocess", "")
    return {
        "name": name,
        "version": version,
        "classes": list(info["classes"]),
        "num_classes": len(info["classes"]),
        "backbone": info.get("backbone"),
        "weights": info.get("weights"),
        "weights_fingerprint": info.get("weights_fingerprint"),
        "input_size": int(info["input_size"]),
        "input": "RGB pixels 0..255 (float) at input_size x input_size, or encoded image bytes",
        "resize_policy": info.get("resize_policy"),
        "preprocessing": {"mode": preprocess, "description": PREPROCESS_TEXT.get(preprocess, preprocess)},
        "strategy": info.get("strategy"),
        "metrics": info.get("metrics", {}),
        "dataset_fingerprint": info.get("dataset_fingerprint"),
        "data_root": info.get("data_root"),
        "run_dir": str(run_dir.resolve()),
        "trained": info.get("created"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "formats": formats,
        "quantized": bool(quantize),
        "signatures": {
            BYTES_SIGNATURE: {"inputs": {"image_bytes": "string [N] (encoded JPEG/PNG/GIF/BMP)"}},
            PIXELS_SIGNATURE: {"inputs": {"images": "float32 [N, H, W, 3], RGB 0..255, resized in the graph"}},
            "outputs": {"probabilities": "float32 [N, C]", "class_index": "int64 [N]",
                        "class_name": "string [N]", "class_names": "string [N, C]"},
        },
        "config": config,
    }


# ---- atomic publication ---------------------------------------------------------
def parse_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = [f for f in re.split(r"[,\s]+", formats) if f]
    out = []
    for fmt in formats or ["savedmodel", "keras"]:
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            hint = closest(fmt, FORMATS)
            raise ConfigError(f"Unknown export format {fmt!r}; expected some of: {', '.join(FORMATS)}."
                              + (f" Did you mean {hint!r}?" if hint else ""))
        if fmt not in out:
            out.append(fmt)
    return out


def remove_stale_temporaries(model_dir: Path) -> list[str]:
    """Hidden build folders of exports whose process has died (killed, crashed)."""
    removed = []
    if not model_dir.is_dir():
        return removed
    for entry in model_dir.iterdir():
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isascii() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


@contextlib.contextmanager
def publication_lock(model_dir: Path):
    """Serialises version numbering between concurrent exports of one model."""
    import fcntl

    with open(model_dir / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fsync_tree(directory: Path) -> None:
    """Data reaches the disk before the rename makes it visible."""
    for folder, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, model_dir: Path) -> int:
    """Rename the finished build to the next version number; returns the number."""
    with publication_lock(model_dir):
        version = (list_versions(model_dir) or [0])[-1] + 1
        card_path = temp / CARD_FILE
        card = json.loads(card_path.read_text())
        card["version"] = version
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        fsync_tree(temp)
        os.rename(temp, model_dir / str(version))
        fsync_dir(model_dir)
    return version


# ---- the entry point ---------------------------------------------------------------
def export_run(run_dir: str | Path, root: str | Path = "saved_models", name: str | None = None,
               formats=("savedmodel", "keras"), quantize: bool = False, echo=print) -> dict:
    """Export a run directory; returns {name, version, path, files, parity, ...}."""
    from tl_app.runs import MODEL_FILE, load_run_model, read_run_info, slug

    started = time.perf_counter()
    say = echo or (lambda *_: None)
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    formats = parse_formats(formats)
    name = check_model_name(name or slug(run_dir.name))
    if not (run_dir / MODEL_FILE).is_file():
        raise ModelNotFoundError(f"{run_dir / MODEL_FILE} does not exist: the run did not finish training.")
    model = load_run_model(run_dir)
    classes = list(info["classes"])
    size = int(info["input_size"])
    policy = info.get("resize_policy") or "center_crop"
    if int(model.output_shape[-1]) != len(classes):
        raise ExportError(f"{run_dir}: the model has {model.output_shape[-1]} outputs but run.json lists "
                          f"{len(classes)} classes; the run directory is inconsistent.")

    model_dir = Path(root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(model_dir)
    temp = model_dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        module = build_serving_module(model, classes, size, policy)
        images, image_source = sample_images(run_dir, info, size, policy)
        reference = model.predict(images, verbose=0, batch_size=32)
        parity: dict = {"images": int(len(images)), "source": image_source}
        files = []
        if "savedmodel" in formats:
            say(f"[export] SavedModel (signatures {BYTES_SIGNATURE}, {PIXELS_SIGNATURE})")
            save_savedmodel(module, temp)
            parity["savedmodel"] = savedmodel_parity(temp, images, reference)
            files += [SAVED_MODEL_FILE, "variables/"]
        if "keras" in formats:
            shutil.copy2(run_dir / MODEL_FILE, temp / KERAS_FILE)
            files.append(KERAS_FILE)
        if "tflite" in formats:
            say("[export] TFLite" + (" (dynamic-range quantised)" if quantize else " (float32)"))
            convert_tflite(model, temp / TFLITE_FILE, quantize)
            parity["tflite"] = check_parity("TFLite", run_tflite(temp / TFLITE_FILE, images), reference,
                                            QUANTIZED_TOLERANCE if quantize else FLOAT_TOLERANCE,
                                            strict=not quantize, echo=say)
            files.append(TFLITE_FILE)
        if "onnx" in formats:
            say("[export] ONNX")
            convert_onnx(module, temp / ONNX_FILE, size)
            parity["onnx"] = check_parity("ONNX", run_onnx(temp / ONNX_FILE, images), reference,
                                          FLOAT_TOLERANCE, strict=True, echo=say)
            files.append(ONNX_FILE)
        card = model_card(run_dir, info, name, 0, formats, quantize)
        card["parity"] = parity
        card["files"] = files + [CARD_FILE]
        (temp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        version = publish(temp, model_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    path = model_dir / str(version)
    say(f"[export] {path}  ({', '.join(formats)})")
    return {"name": name, "version": version, "path": path, "root": str(root), "formats": formats,
            "files": card["files"], "parity": parity, "seconds": round(time.perf_counter() - started, 2)}


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
