"""Batch inference: an exported model (or a run) over files, folders and globs.

Images stream through tf.data in batches (decode and resize in parallel, the
model on the previous batch meanwhile), so memory stays bounded however many
inputs there are: inputs are walked lazily (once to count, once to read), and
rows are written as their batch finishes. A file that cannot be used becomes a
row with its reason, never an exception.
"""

from __future__ import annotations

import collections
import csv
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tl_app.errors import ConfigError, ModelNotFoundError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif", ".mpo"}
GRAPH_FORMATS = {"JPEG", "PNG"}  # decoded in the tf.data graph when also upright, 8-bit and opaque
MAX_PIXELS = 89_478_485


# ---- the model -------------------------------------------------------------------
@dataclass
class Predictor:
    """A loaded classifier: pixels (N, size, size, 3, 0..255) -> probabilities (N, C)."""

    classes: list[str]
    input_size: int
    resize_policy: str
    source: Path
    kind: str  # "savedmodel" | "keras"
    predict_fn: Callable = field(repr=False)
    name: str = ""
    version: int | None = None
    card: dict = field(default_factory=dict, repr=False)

    def predict(self, images) -> np.ndarray:
        return np.asarray(self.predict_fn(images))


def load_predictor(path: str | Path) -> Predictor:
    """saved_models/<name> (newest version), a version folder, or a run directory."""
    import tensorflow as tf

    from tl_app.export import (KERAS_FILE, PIXELS_SIGNATURE, SAVED_MODEL_FILE, read_card,
                               resolve_version_dir)
    from tl_app.runs import RUN_FILE, load_run_model

    path = Path(path)
    if (path / RUN_FILE).is_file():
        info = json.loads((path / RUN_FILE).read_text())
        model = load_run_model(path)
        return Predictor(list(info["classes"]), int(info["input_size"]), info.get("resize_policy") or "auto",
                         path, "keras", keras_function(model, int(info["input_size"])), name=path.name, card=info)
    version_dir = resolve_version_dir(path)
    card = read_card(version_dir)
    version = int(version_dir.name) if version_dir.name.isdigit() else None
    name = version_dir.parent.name if version is not None else version_dir.name
    if (version_dir / SAVED_MODEL_FILE).is_file():
        loaded = tf.saved_model.load(str(version_dir))
        signature = loaded.signatures.get(PIXELS_SIGNATURE)
        if signature is None:
            raise ModelNotFoundError(f"{version_dir} has no {PIXELS_SIGNATURE!r} signature; export it with tl-app.")
        if not card:
            raise ModelNotFoundError(f"{version_dir} has no model_card.json; re-export it with 'tl-app export'.")

        def run(images, _signature=signature, _keep=loaded):
            return _signature(images=tf.convert_to_tensor(images, tf.float32))["probabilities"].numpy()

        predictor_fn, kind = run, "savedmodel"
    elif (version_dir / KERAS_FILE).is_file():
        from tl_app.runs import load_model_file

        model = load_model_file(version_dir / KERAS_FILE)
        predictor_fn, kind = keras_function(model, int(card["input_size"])), "keras"
    else:  # resolve_version_dir only returns complete versions
        raise ModelNotFoundError(f"{version_dir} holds no model.")
    return Predictor(list(card["classes"]), int(card["input_size"]), card.get("resize_policy") or "auto",
                     version_dir, kind, predictor_fn, name=name, version=version, card=card)


def keras_function(model, input_size: int):
    """One traced call per batch shape, as model.predict does, without its per-call set-up."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)])
    def call(images):
        return tf.cast(model(images, training=False), tf.float32)

    return lambda images: call(tf.convert_to_tensor(images, tf.float32)).numpy()


# ---- the inputs ----------------------------------------------------------------------
def _walk(folder: Path) -> Iterator[str]:
    """Image files under a folder, recursively, sorted, hidden entries skipped."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                yield from _walk(Path(entry.path))
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                yield entry.path
        except OSError:
            continue


def iter_inputs(inputs) -> Iterator[tuple[str, str]]:
    """(path, problem) for every input; problem is "" for a candidate image."""
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            yield from ((p, "") for p in _walk(path))
        elif path.exists() or path.is_symlink():
            yield item, ""
        elif glob.has_magic(item):
            matches = sorted(glob.iglob(item, recursive=True))
            if not matches:
                yield item, "no file matches this pattern"
            for match in matches:
                if Path(match).is_dir():
                    yield from ((p, "") for p in _walk(Path(match)))
                else:
                    yield match, ""
        else:
            yield item, "no such file or directory"


def graph_decodable(image) -> bool:
    """Whether TensorFlow's decoder gives the same pixels as training's Pillow path.

    Plain upright 8-bit opaque JPEG/PNG: yes. EXIF-rotated, transparent,
    CMYK, 16-bit, GIF, BMP, WebP, TIFF...: decode with Pillow (tl_app.images).
    """
    fmt = (image.format or "").upper()
    orientation = int(image.getexif().get(0x0112, 1) or 1)
    opaque = "transparency" not in image.info and image.mode in ("RGB", "L")
    return fmt in GRAPH_FORMATS and opaque and orientation == 1


def header_probe(path: str, max_pixels: int = MAX_PIXELS) -> tuple[bool, str]:
    """(graph-decodable, problem) from the file header only; the full decode happens in tf.data."""
    from PIL import Image

    p = Path(path)
    if p.is_symlink() and not p.exists():
        return False, "broken link"
    if not p.is_file():
        return False, "not a regular file"
    try:
        if p.stat().st_size == 0:
            return False, "empty file (0 bytes)"
        with Image.open(p) as image:
            width, height = image.size
            if width * height > max_pixels:
                return False, f"too many pixels ({width}x{height} > {max_pixels}); possible decompression bomb"
            return graph_decodable(image), ""
    except PermissionError:
        return False, "unreadable: permission denied"
    except Image.UnidentifiedImageError:
        return False, "not an image (unknown file type)"
    except Exception as exc:  # a corrupt header: say what Pillow said
        return False, f"undecodable image: {str(exc)[:200]}"


def decode_failure_reason(path: str) -> str:
    from tl_app.images import probe_file

    try:
        reason = probe_file(path, MAX_PIXELS).reason
    except Exception as exc:
        reason = f"undecodable image: {str(exc)[:200]}"
    return reason or "could not be decoded"


# ---- output --------------------------------------------------------------------------
class RowWriter:
    """CSV (path, label_1, probability_1, ..., error) or JSON lines, streamed."""

    def __init__(self, out: str | Path | None, top_k: int):
        self.top_k = top_k
        self.path = Path(out) if out else None
        suffix = self.path.suffix.lower() if self.path else ".csv"
        if suffix not in (".csv", ".jsonl", ".ndjson"):
            raise ConfigError(f"--out {out}: expected a .csv or .jsonl file name, e.g. --out preds.csv.")
        self.jsonl = suffix in (".jsonl", ".ndjson")
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "w", newline="", encoding="utf-8")
        else:
            self.handle = sys.stdout
        if not self.jsonl:
            self.csv = csv.writer(self.handle)
            header = ["path"]
            for i in range(1, top_k + 1):
                header += [f"label_{i}", f"probability_{i}"]
            self.csv.writerow(header + ["error"])

    def prediction(self, path: str, top: list[tuple[str, float]]) -> None:
        if self.jsonl:
            row = {"path": path, "predictions": [{"label": l, "probability": p} for l, p in top], "error": None}
            self.handle.write(json.dumps(row) + "\n")
        else:
            cells = [path]
            for label, prob in top:
                cells += [label, f"{prob:.8g}"]
            cells += [""] * (1 + 2 * self.top_k - len(cells))
            self.csv.writerow(cells + [""])

    def failure(self, path: str, reason: str) -> None:
        if self.jsonl:
            self.handle.write(json.dumps({"path": path, "predictions": [], "error": reason}) + "\n")
        else:
            self.csv.writerow([path] + [""] * (2 * self.top_k) + [reason])

    def close(self) -> None:
        if self.path:
            self.handle.close()
        else:
            self.handle.flush()


class Progress:
    """One status line on stderr: done/total, images/s, bad files."""

    def __init__(self, total: int, stream=None, enabled: bool = True, width: int = 28):
        self.total, self.stream, self.enabled, self.width = total, stream or sys.stderr, enabled, width
        self.started = time.perf_counter()
        self.last = 0.0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, bad: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        filled = int(self.width * (done + bad) / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"predict [{bar}] {done + bad}/{self.total}  {rate:.1f} images/s  {bad} bad"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if final and self.tty:
            self.stream.write("\n")
        self.stream.flush()


# ---- the entry point -------------------------------------------------------------------
def predict_paths(model, inputs, out: str | Path | None = None, top_k: int = 5, batch_size: int = 32,
                  echo=print, progress: bool | None = None) -> dict:
    """Predict every image among ``inputs``; rows go to ``out`` (CSV/JSONL) or stdout.

    ``model`` is a path (see load_predictor) or a loaded Predictor. Returns a
    summary: predicted, bad, total, seconds, images_per_second, bad_files.
    """
    import tensorflow as tf

    from tl_app.pipeline import decode_file, resize_images

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ConfigError("No inputs given: pass image files, folders or globs, e.g. tl-app predict MODEL photos/.")
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    classes = predictor.classes
    k = min(top_k, len(classes))
    size = predictor.input_size
    policy = predictor.resize_policy
    total = sum(1 for _ in iter_inputs(inputs))

    writer = RowWriter(out, k)
    failures: collections.deque = collections.deque()  # (path, reason) found by the reader thread
    in_flight: collections.deque = collections.deque()  # (index, path) handed to the decoder
    bad_files: list[dict] = []  # the first 100, for the summary; every one is in the output
    bad = [0]

    def source():
        for index, (path, problem) in enumerate(iter_inputs(inputs)):
            fast = False
            if not problem:
                fast, problem = header_probe(path)
            if problem:
                failures.append((path, problem))
                continue
            in_flight.append((index, path))
            yield os.fsencode(path), fast, index

    signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool), tf.TensorSpec([], tf.int64))
    ds = tf.data.Dataset.from_generator(source, output_signature=signature)

    def load(path, fast, index):
        image = resize_images(decode_file(path, fast), size, policy)
        image.set_shape([size, size, 3])
        return image, index

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.batch(batch_size).prefetch(2)

    bar = Progress(total, enabled=progress if progress is not None else echo is not None)
    done = 0

    def record_failure(path: str, reason: str) -> None:
        writer.failure(path, reason)
        bad[0] += 1
        if len(bad_files) < 100:
            bad_files.append({"path": path, "reason": reason})

    def drain(before: int | None) -> None:
        while failures:
            record_failure(*failures.popleft())
        while in_flight and (before is None or in_flight[0][0] < before):
            _, path = in_flight.popleft()
            record_failure(path, decode_failure_reason(path))

    started = time.perf_counter()
    try:
        for images, indices in ds:
            probs = predictor.predict(images)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            for row, index in enumerate(indices.numpy().tolist()):
                drain(index)
                _, path = in_flight.popleft()
                writer.prediction(path, [(classes[j], float(probs[row, j])) for j in order[row]])
                done += 1
            bar.update(done, bad[0])
        drain(None)
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    bar.update(done, bad[0], final=True)
    summary = {
        "model": str(predictor.source), "version": predictor.version, "predicted": done,
        "bad": bad[0], "total": total, "seconds": round(seconds, 3),
        "images_per_second": round(done / seconds, 2) if seconds > 0 else 0.0,
        "out": str(writer.path) if writer.path else None, "bad_files": bad_files,
    }
    return summary
