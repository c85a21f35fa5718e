"""Batch inference: an exported model (or a run) over files, folders and globs.

Images stream through tf.data in batches (decode and resize in parallel, the
model on the previous batch meanwhile), so memory stays bounded however many
inputs there are: inputs are walked lazily (once to count, once to read), and
rows are written in input order and flushed as their batch finishes, so a killed
run keeps what it did and ``resume`` answers only the rest. A file that cannot
be used becomes a row with its reason, never an exception.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
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
from tl_app.models.opener import Predictor, ood_threshold_of, read_model_info
from tl_app.export.predict_runtime import SAMPLE_IMAGES, open_predictor
from tl_app.models.ood import LAYER_NAME as OOD_SCORE, UNKNOWN_LABEL
from tl_app.models.tta import tta_function, views_to_run
from tl_app.data.images import probe_file
from tl_app.data.pipeline import load_image, load_images

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

    def __init__(self, out: str | Path | None, top_k: int, ood: bool = False, resume: bool = False):
        self.top_k = top_k
        self.ood = ood
        self.path = Path(out) if out else None
        suffix = self.path.suffix.lower() if self.path else ".csv"
        if suffix not in (".csv", ".jsonl", ".ndjson"):
            raise ConfigError(f"--out {out}: expected a .csv or .jsonl file name, e.g. --out preds.csv.")
        self.jsonl = suffix in (".jsonl", ".ndjson")
        header = ["path"]
        for i in range(1, top_k + 1):
            header += [f"label_{i}", f"probability_{i}"]
        header += (["label", "unknown", "ood_score"] if ood else []) + ["error"]
        # path -> how many of its rows the existing file already holds (resume skips that many)
        self.answered: collections.Counter = collections.Counter()
        if self.path and resume and self.path.exists():
            self.handle = self._reopen(header)
            self.csv = csv.writer(self.handle)
            return
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "w", newline="", encoding="utf-8")
        else:
            self.handle = sys.stdout
        self.csv = csv.writer(self.handle)
        if not self.jsonl:
            self.csv.writerow(header)

    def _reopen(self, header: list[str]):
        """The existing file kept to its answered rows (error rows and a half-written last line dropped),
        open for appending; refused when its columns are not the ones this run writes."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        complete = text[: text.rfind("\n") + 1]  # a kill can leave the last line half written
        fix = "Pass the --top-k and model of the first run, or write to a new file (drop --resume or change --out)."
        kept = []
        if self.jsonl:
            keys = ["path", *(["label", "unknown", "ood_score", "top_class"] if self.ood else []), "predictions",
                    "error"]
            for line in complete.splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict) or row.get("error") or not row.get("predictions"):
                    continue
                if sorted(row) != sorted(keys) or len(row["predictions"]) != self.top_k:
                    raise ConfigError(
                        f"--resume: {self.path} holds rows with {len(row.get('predictions') or [])} classes and "
                        f"fields {sorted(row)}; this run writes {self.top_k} classes and fields {sorted(keys)}. "
                        + fix)
                kept.append(line + "\n")
                self.answered[row["path"]] += 1
        else:
            rows = list(csv.reader(io.StringIO(complete, newline="")))
            if rows and rows[0] != header:
                raise ConfigError(f"--resume: {self.path} has the columns {','.join(rows[0])}; this run writes "
                                  f"{','.join(header)}. " + fix)
            kept_rows = [header] + [row for row in rows[1:] if len(row) == len(header) and not row[-1]]
            buffer = io.StringIO(newline="")
            csv.writer(buffer).writerows(kept_rows)
            kept = [buffer.getvalue()]
            self.answered.update(row[0] for row in kept_rows[1:])
        partial = self.path.with_name(self.path.name + ".resume-tmp")
        with open(partial, "w", newline="", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(partial, self.path)  # a kill meanwhile leaves the old file, never a half-kept one
        return open(self.path, "a", newline="", encoding="utf-8")

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

    def flush(self) -> None:
        """Rows so far reach the file (a killed run keeps them)."""
        self.handle.flush()

    def close(self) -> None:
        if self.path:
            self.handle.close()
        else:
            self.handle.flush()


# ---- what both engines share (tl_app.engines.ray_engine.predict_paths_ray too) ------------
def unanswered(inputs, answered: collections.Counter) -> Iterator[tuple[str, str]]:
    """iter_inputs less the rows an earlier run already wrote (a path listed twice is skipped as often as it
    was answered)."""
    left = collections.Counter(answered)
    for path, problem in iter_inputs(inputs):
        if left[path] > 0:
            left[path] -= 1
            continue
        yield path, problem


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

    def summary(self, model: str | Path, version: int | None, total: int, seconds: float, skipped: int = 0) -> dict:
        """``total`` counts every input; ``skipped`` those a resumed run found already answered."""
        return {
            "model": str(model), "version": version, "predicted": self.done, "bad": self.bad, "skipped": skipped,
            "total": total,
            "seconds": round(seconds, 3), "images_per_second": round(self.done / seconds, 2) if seconds > 0 else 0.0,
            "out": str(self.writer.path) if self.writer.path else None, "bad_files": self.bad_files,
        }


def user_sample(inputs, info, max_pixels: int = 0, count: int = SAMPLE_IMAGES) -> np.ndarray:
    """Up to ``count`` of the inputs' readable images, decoded and resized as predict feeds them: what
    --precision int8 calibrates and gates on (unreadable files are left to the run to report)."""
    images = []
    limit = int(max_pixels) or MAX_PIXELS
    for path, problem in iter_inputs(inputs):
        if problem or header_probe(path, limit)[1]:
            continue
        try:
            images.append(load_images([path], info.input_size, info.resize_policy, info.background)[0])
        except Exception:  # a file the decoder refuses: the run itself lists it
            continue
        if len(images) >= count:
            break
    size = info.input_size
    return np.stack(images).astype(np.float32) if images else np.zeros((0, size, size, 3), np.float32)


def open_for_predict(model, inputs, runtime: str, precision: str, max_pixels: int):
    """open_predictor, with the user's own images as the int8 calibration and gate sample when asked."""
    if precision == "fp32":
        return open_predictor(model, runtime)
    info = read_model_info(model.source if isinstance(model, Predictor) else model)
    return open_predictor(model, runtime, precision=precision,
                          sample=lambda: user_sample(inputs, info, max_pixels))  # read only to quantise


# ---- the entry point -------------------------------------------------------------------
def predict_paths(model, inputs, out: str | Path | None = None, top_k: int = 5, batch_size: int = 32,
                  echo=print, progress: bool | None = None, max_pixels: int = 0, resume: bool = False,
                  runtime: str = "keras", tta: int = 1, precision: str = "fp32") -> dict:
    """Predict every image among ``inputs``; rows go to ``out`` (CSV/JSONL) or stdout, in input order.

    With ``resume`` the rows ``out`` already holds (from an interrupted run) are kept and their inputs
    skipped; the rest are appended in input order.

    ``runtime``: keras, onnxruntime or tflite (tl_app.export.predict_runtime: converted once, checked against Keras).
    ``precision``: fp32, or int8 (ONNX Runtime, quantised; calibrated and gated on the first images of ``inputs``).
    ``tta`` > 1: probabilities averaged over that many views of each image (models.tta; the OOD score is the
    image's own); refused for a model exported with --tta, which averages in its graph already.

    ``model`` is a path (see tl_app.models.opener.open_model) or a loaded Predictor. Returns a
    summary: predicted, bad, total, seconds, images_per_second, bad_files. An image over ``pixel_limit``
    (the model's data.max_pixels unless ``max_pixels``) is a bad row.
    """
    import tensorflow as tf


    inputs = check_request(inputs, top_k, batch_size)
    if resume and not out:
        raise ConfigError("--resume continues the rows of an --out file, and none was given: "
                          "pass the first run's file, e.g. --out preds.csv --resume.")
    if isinstance(model, Predictor) and (runtime != "keras" or precision != "fp32"):
        model = model.source  # converted from its files
    predictor = model if isinstance(model, Predictor) else None
    if predictor is None and not resume:  # opened before the out file is started, which a failure would empty
        predictor = open_for_predict(model, inputs, runtime, precision, max_pixels)
    # a resumed run reads only the model's files (classes, OOD threshold) until an input is left to predict
    info = predictor if predictor is not None else read_model_info(model)
    views = views_to_run(tta, info.card)
    threshold = ood_threshold_of(info.card)  # None: a model without an OOD scorer answers as before
    writer = RowWriter(out, min(top_k, len(info.classes)), ood=threshold is not None, resume=resume)
    tally = Tally(writer, info.classes, threshold)
    total = sum(1 for _ in iter_inputs(inputs))
    left = sum(1 for _ in unanswered(inputs, writer.answered)) if writer.answered else total
    if predictor is None and not left:  # every row is already in the file: no model to load
        writer.close()
        return tally.summary(info.source, info.version, total, 0.0, skipped=total)
    if predictor is None:
        try:
            predictor = open_for_predict(model, inputs, runtime, precision, max_pixels)
        except BaseException:
            writer.close()
            raise
    if views > 1:
        predictor = dataclasses.replace(predictor, predict_fn=tta_function(predictor.predict_fn, views))
    size, policy, background = predictor.input_size, predictor.resize_policy, predictor.background
    limit = pixel_limit(predictor, max_pixels)
    # (index, path, problem) of every input the reader has passed, in input order, until its row is written;
    # problem is "" for a file handed to the decoder
    pending: collections.deque = collections.deque()

    def source():
        for index, (path, problem) in enumerate(unanswered(inputs, writer.answered)):
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

    bar = Progress(left, "predict", enabled=progress if progress is not None else echo is not None)
    started = time.perf_counter()
    try:
        for images, indices in ds:
            outputs = predictor.outputs(images)
            probs, scores = outputs["probabilities"], outputs.get(OOD_SCORE)
            for row, index in enumerate(indices.numpy().tolist()):
                settle(index)
                _, path, _ = pending.popleft()
                tally.prediction(path, probs[row], None if scores is None else scores[row])
            writer.flush()
            bar.set(tally.done, tally.bad)
        settle(None)
    finally:
        tally.writer.close()
    seconds = time.perf_counter() - started
    bar.set(tally.done, tally.bad, final=True)
    return tally.summary(predictor.source, predictor.version, total, seconds, skipped=total - left)
