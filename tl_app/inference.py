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
from pathlib import Path
from typing import Iterator

import numpy as np

from tl_app.core.errors import ConfigError
from tl_app.data.images import probe_header
from tl_app.core.progress import Progress
from tl_app.data.scan import IMAGE_SUFFIXES, walk
from tl_app.models.opener import Predictor, open_model
from tl_app.models.ood import LAYER_NAME as OOD_SCORE, UNKNOWN_LABEL
from tl_app.data.images import probe_file
from tl_app.data.pipeline import load_image

MAX_PIXELS = 89_478_485
MAX_LISTED_BAD = 100  # bad files named in the summary; every one has its row in the output


def folder_images(folder) -> Iterator[tuple[str, str]]:
    """Image files under a folder, by the scan's walker (links followed, no folder entered twice)."""
    return ((str(path), "") for path, _ in walk(folder, suffixes=IMAGE_SUFFIXES))


def iter_inputs(inputs) -> Iterator[tuple[str, str]]:
    """(path, problem) for every input; problem is "" for a candidate image."""
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            yield from folder_images(path)
        elif path.exists() or path.is_symlink():
            yield item, ""
        elif glob.has_magic(item):
            matches = sorted(glob.iglob(item, recursive=True))
            if not matches:
                yield item, "no file matches this pattern"
            for match in matches:
                if Path(match).is_dir():
                    yield from folder_images(match)
                else:
                    yield match, ""
        else:
            yield item, "no such file or directory"


def header_probe(path: str, max_pixels: int = MAX_PIXELS) -> tuple[bool, str]:
    """(graph-decodable, problem) from the file header only (tl_app.images.probe_header, the dataset scan's
    checks); the full decode happens in tf.data."""
    probe = probe_header(path, max_pixels)
    return probe.fast, probe.reason


def pixel_limit(predictor, override: int = 0) -> int:
    """Pixels per image: ``override`` (predict.max_pixels) if set, else the data.max_pixels the model was
    trained with (its card's or run's configuration), else Pillow's decompression-bomb threshold."""
    if override:
        return int(override)
    config = getattr(predictor, "config", None)
    return int(config.data.max_pixels) if config is not None else MAX_PIXELS


def decode_failure_reason(path: str, max_pixels: int = MAX_PIXELS) -> str:

    try:
        reason = probe_file(path, max_pixels).reason
    except Exception as exc:
        reason = f"undecodable image: {str(exc)[:200]}"
    return reason or "could not be decoded"


# ---- output --------------------------------------------------------------------------
class RowWriter:
    """CSV (path, label_1, probability_1, ..., error) or JSON lines, streamed.

    With ``ood`` (a model that carries an OOD scorer) each row also has ``label`` ("unknown" when the
    ood_score is above the model's threshold, else the top class), ``unknown`` and ``ood_score``; JSON
    lines add ``top_class``. Models without one give the rows they always gave.
    """

    def __init__(self, out: str | Path | None, top_k: int, ood: bool = False):
        self.top_k = top_k
        self.ood = ood
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
            self.csv.writerow(header + (["label", "unknown", "ood_score"] if ood else []) + ["error"])

    def prediction(self, path: str, top: list[tuple[str, float]], verdict: dict | None = None) -> None:
        """``verdict``: {label, unknown, ood_score} for a model with an OOD scorer."""
        if self.jsonl:
            row = {"path": path, "predictions": [{"label": l, "probability": p} for l, p in top], "error": None}
            if self.ood:
                row = {"path": path, **(verdict or {}), "top_class": top[0][0], **row}
            self.handle.write(json.dumps(row) + "\n")
        else:
            cells = [path]
            for label, prob in top:
                cells += [label, f"{prob:.8g}"]
            cells += [""] * (1 + 2 * self.top_k - len(cells))
            if self.ood:
                v = verdict or {}
                cells += [v.get("label", ""), {True: "true", False: "false"}.get(v.get("unknown"), ""),
                          "" if v.get("ood_score") is None else f"{v['ood_score']:.8g}"]
            self.csv.writerow(cells + [""])

    def failure(self, path: str, reason: str) -> None:
        if self.jsonl:
            self.handle.write(json.dumps({"path": path, "predictions": [], "error": reason}) + "\n")
        else:
            self.csv.writerow([path] + [""] * (2 * self.top_k + (3 if self.ood else 0)) + [reason])

    def close(self) -> None:
        if self.path:
            self.handle.close()
        else:
            self.handle.flush()


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


def ood_verdict(score, threshold: float | None, top_class: str) -> dict | None:
    """{label, unknown, ood_score} of one image: "unknown" above the model's threshold, else its top class."""
    if threshold is None or score is None:
        return None
    unknown = bool(float(score) > threshold)
    return {"label": UNKNOWN_LABEL if unknown else top_class, "unknown": unknown, "ood_score": float(score)}


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """One image's k most probable classes, most probable first (a tie keeps the class order)."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [(classes[j], float(probs[j])) for j in order]


class Tally:
    """Writes the rows, counts them, and names the first MAX_LISTED_BAD bad files for the summary."""

    def __init__(self, writer: RowWriter, classes: list[str], ood_threshold: float | None = None):
        self.writer, self.classes, self.ood_threshold = writer, classes, ood_threshold
        self.done = 0
        self.bad = 0
        self.bad_files: list[dict] = []

    def prediction(self, path: str, probs: np.ndarray, score=None) -> None:
        top = top_classes(probs, self.classes, self.writer.top_k)
        self.writer.prediction(path, top, ood_verdict(score, self.ood_threshold, top[0][0]))
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
                  echo=print, progress: bool | None = None, max_pixels: int = 0) -> dict:
    """Predict every image among ``inputs``; rows go to ``out`` (CSV/JSONL) or stdout, in input order.

    ``model`` is a path (see tl_app.models.opener.open_model) or a loaded Predictor. Returns a
    summary: predicted, bad, total, seconds, images_per_second, bad_files. An image over ``pixel_limit``
    (the model's data.max_pixels unless ``max_pixels``) is a bad row.
    """
    import tensorflow as tf


    inputs = check_request(inputs, top_k, batch_size)
    predictor = model if isinstance(model, Predictor) else open_model(model)
    size, policy, background = predictor.input_size, predictor.resize_policy, predictor.background
    limit = pixel_limit(predictor, max_pixels)
    total = sum(1 for _ in iter_inputs(inputs))
    threshold = predictor.ood_threshold  # None: a model without an OOD scorer answers as before
    tally = Tally(RowWriter(out, min(top_k, len(predictor.classes)), ood=threshold is not None), predictor.classes,
                  threshold)
    # (index, path, problem) of every input the reader has passed, in input order, until its row is written;
    # problem is "" for a file handed to the decoder
    pending: collections.deque = collections.deque()

    def source():
        for index, (path, problem) in enumerate(iter_inputs(inputs)):
            fast = False
            if not problem:
                fast, problem = header_probe(path, limit)
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
            tally.failure(path, problem or decode_failure_reason(path, limit))

    bar = Progress(total, "predict", enabled=progress if progress is not None else echo is not None)
    started = time.perf_counter()
    try:
        for images, indices in ds:
            outputs = predictor.outputs(images)
            probs, scores = outputs["probabilities"], outputs.get(OOD_SCORE)
            for row, index in enumerate(indices.numpy().tolist()):
                settle(index)
                _, path, _ = pending.popleft()
                tally.prediction(path, probs[row], None if scores is None else scores[row])
            bar.set(tally.done, tally.bad)
        settle(None)
    finally:
        tally.writer.close()
    seconds = time.perf_counter() - started
    bar.set(tally.done, tally.bad, final=True)
    return tally.summary(predictor.source, predictor.version, total, seconds)
