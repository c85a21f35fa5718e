"""Batch inference: an exported model (or a run) over files, folders and globs.

Images stream through tf.data in batches (decode and resize in parallel, the
model on the previous batch meanwhile), so memory stays bounded however many
inputs there are: inputs are walked lazily (once to count, once to read), and
rows are written in input order as their batch finishes. A file that cannot be
used becomes a row with its reason, never an exception.
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

from tl_app.dataset import is_hidden
from tl_app.errors import ConfigError, ModelNotFoundError
from tl_app.images import probe_header

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif", ".mpo"}
MAX_PIXELS = 89_478_485
DEFAULT_BACKGROUND = (255, 255, 255)
MAX_LISTED_BAD = 100  # bad files named in the summary; every one has its row in the output


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
    background: tuple = DEFAULT_BACKGROUND  # decode transparent images onto this, as training did

    def predict(self, images) -> np.ndarray:
        return np.asarray(self.predict_fn(images))


def run_background(config: dict | None, source: str) -> tuple:
    """data.background of a run's saved configuration, checked as training checked it (white if absent)."""
    from tl_app.config import Config

    data = (config or {}).get("data") or {}
    if "background" not in data:
        return DEFAULT_BACKGROUND
    checked = Config.from_dict({"data": {"background": data["background"]}}, source=source)
    return tuple(int(v) for v in checked.data.background)


def read_model_info(path: str | Path) -> ModelInfo:
    """saved_models/<name> (newest version), a version folder, or a run directory: its classes, sizes,
    version and background from run.json/config.json or model_card.json; the model itself is not loaded."""
    from tl_app.export import CARD_FILE, parse_version, read_card, resolve_version_dir
    from tl_app.runs import MODEL_FILE, RUN_FILE, read_run_info

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


def load_predictor(path: str | Path) -> Predictor:
    """saved_models/<name> (newest version), a version folder, or a run directory."""
    import tensorflow as tf

    from tl_app.export import KERAS_FILE, PIXELS_SIGNATURE, SAVED_MODEL_FILE
    from tl_app.runs import RUN_FILE, load_model_file, load_run_model

    info = read_model_info(path)
    source = info.source
    if (source / RUN_FILE).is_file():
        predictor_fn, kind = keras_function(load_run_model(source), info.input_size), "keras"
    elif (source / SAVED_MODEL_FILE).is_file():
        loaded = tf.saved_model.load(str(source))
        signature = loaded.signatures.get(PIXELS_SIGNATURE)
        if signature is None:
            raise ModelNotFoundError(f"{source} has no {PIXELS_SIGNATURE!r} signature; export it with tl-app.")

        def run(images, _signature=signature, _keep=loaded):
            return _signature(images=tf.convert_to_tensor(images, tf.float32))["probabilities"].numpy()

        predictor_fn, kind = run, "savedmodel"
    elif (source / KERAS_FILE).is_file():
        predictor_fn, kind = keras_function(load_model_file(source / KERAS_FILE), info.input_size), "keras"
    else:  # resolve_version_dir only returns complete versions
        raise ModelNotFoundError(f"{source} holds no model.")
    return Predictor(info.classes, info.input_size, info.resize_policy, source, kind, predictor_fn,
                     name=info.name, version=info.version, card=info.card, background=info.background)


def keras_function(model, input_size: int):
    """One traced call per batch shape, as model.predict does, without its per-call set-up."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)])
    def call(images):
        return tf.cast(model(images, training=False), tf.float32)

    return lambda images: call(tf.convert_to_tensor(images, tf.float32)).numpy()


# ---- the inputs ----------------------------------------------------------------------
def _walk(folder: str | Path, seen: set[str] | None = None) -> Iterator[str]:
    """Image files under a folder, recursively, sorted, hidden entries skipped (as the dataset scan does).

    Links are followed, and each real directory is entered once (tl_app.dataset.walk_files' rule, kept
    lazy here): a link back up the tree (loop -> ..) cannot repeat files or recurse without end.
    """
    seen = set() if seen is None else seen
    real = os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if is_hidden(entry.name):
            continue
        try:
            if entry.is_dir():
                yield from _walk(entry.path, seen)
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


def header_probe(path: str, max_pixels: int = MAX_PIXELS) -> tuple[bool, str]:
    """(graph-decodable, problem) from the file header only (tl_app.images.probe_header, the dataset scan's
    checks); the full decode happens in tf.data."""
    probe = probe_header(path, max_pixels)
    return probe.fast, probe.reason


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


# ---- what both engines share (tl_app.engines.ray_engine.predict_paths_ray too) ------------
def check_request(inputs, top_k: int, batch_size: int) -> list:
    """The inputs as a list, after checking the numbers; a clear error for each mistake."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ConfigError("No inputs given: pass image files, folders or globs, e.g. tl-app predict MODEL photos/.")
    return inputs


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """One image's k most probable classes, most probable first (a tie keeps the class order)."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [(classes[j], float(probs[j])) for j in order]


class Tally:
    """Writes the rows, counts them, and names the first MAX_LISTED_BAD bad files for the summary."""

    def __init__(self, writer: RowWriter, classes: list[str]):
        self.writer, self.classes = writer, classes
        self.done = 0
        self.bad = 0
        self.bad_files: list[dict] = []

    def prediction(self, path: str, probs: np.ndarray) -> None:
        self.writer.prediction(path, top_classes(probs, self.classes, self.writer.top_k))
        self.done += 1

    def failure(self, path: str, reason: str) -> None:
        self.writer.failure(path, reason)
        self.bad += 1
        if len(self.bad_files) < MAX_LISTED_BAD:
            self.bad_files.append({"path": path, "reason": reason})

    def summary(self, model: str | Path, version: int | None, total: int, seconds: float) -> dict:
        return {
            "model": str(model), "version": version, "predicted": self.done, "bad": self.bad, "total": total,
            "seconds": round(seconds, 3), "images_per_second": round(self.done / seconds, 2) if seconds > 0 else 0.0,
            "out": str(self.writer.path) if self.writer.path else None, "bad_files": self.bad_files,
        }


# ---- the entry point -------------------------------------------------------------------
def predict_paths(model, inputs, out: str | Path | None = None, top_k: int = 5, batch_size: int = 32,
                  echo=print, progress: bool | None = None) -> dict:
    """Predict every image among ``inputs``; rows go to ``out`` (CSV/JSONL) or stdout, in input order.

    ``model`` is a path (see load_predictor) or a loaded Predictor. Returns a
    summary: predicted, bad, total, seconds, images_per_second, bad_files.
    """
    import tensorflow as tf

    from tl_app.pipeline import load_image

    inputs = check_request(inputs, top_k, batch_size)
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    size, policy, background = predictor.input_size, predictor.resize_policy, predictor.background
    total = sum(1 for _ in iter_inputs(inputs))
    tally = Tally(RowWriter(out, min(top_k, len(predictor.classes))), predictor.classes)
    # (index, path, problem) of every input the reader has passed, in input order, until its row is written;
    # problem is "" for a file handed to the decoder
    pending: collections.deque = collections.deque()

    def source():
        for index, (path, problem) in enumerate(iter_inputs(inputs)):
            fast = False
            if not problem:
                fast, problem = header_probe(path)
            pending.append((index, path, problem))
            if not problem:
                yield os.fsencode(path), fast, index

    signature = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool), tf.TensorSpec([], tf.int64))
    ds = tf.data.Dataset.from_generator(source, output_signature=signature)
    ds = ds.map(lambda path, fast, index: (load_image(path, fast, size, policy, background), index),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.batch(batch_size).prefetch(2)

    def settle(before: int | None) -> None:
        """Rows for the inputs before ``before`` that never reached the model (all of them when None)."""
        while pending and (before is None or pending[0][0] < before):
            _, path, problem = pending.popleft()
            tally.failure(path, problem or decode_failure_reason(path))

    bar = Progress(total, enabled=progress if progress is not None else echo is not None)
    started = time.perf_counter()
    try:
        for images, indices in ds:
            probs = predictor.predict(images)
            for row, index in enumerate(indices.numpy().tolist()):
                settle(index)
                _, path, _ = pending.popleft()
                tally.prediction(path, probs[row])
            bar.update(tally.done, tally.bad)
        settle(None)
    finally:
        tally.writer.close()
    seconds = time.perf_counter() - started
    bar.update(tally.done, tally.bad, final=True)
    return tally.summary(predictor.source, predictor.version, total, seconds)
