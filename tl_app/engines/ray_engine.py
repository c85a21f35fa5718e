"""Feature extraction and batch prediction on Ray Data: the local engine's code, run by actors.

The driver decides what to compute exactly as the local engine does (the
records the cache lacks), sends (position, path, content hash) rows through
``Dataset.map_batches`` into a pool of actors, and writes each batch of
features to the same FeatureCache the moment it comes back; a run that dies
resumes from the cache. Each actor builds the backbone once and runs
``tl_app.features.Extractor`` itself on its batches, so decoding, resizing,
padding and prediction are the local engine's own functions, not copies.
Batch prediction works the same way: each actor loads the exported model once
and decodes with tl_app.pipeline; the driver writes tl_app.inference's rows.

Image paths (and a local weight file) must be readable from every worker at
the same path: a shared filesystem on a cluster, nothing to do on one machine.
"""

from __future__ import annotations

import os
from contextlib import closing
from typing import Any, Iterator, Sequence

import numpy as np

from tl_app.core.config import Config
from tl_app.data.manifest import Record
from tl_app.engines import check_resources, connect, require_ray
from tl_app.core.errors import TlAppError
from tl_app.features.extract import Extractor, UniqueImages
from tl_app.models.ood import LAYER_NAME as OOD_SCORE
from tl_app.models.opener import Predictor, ood_threshold_of, open_model, read_model_info
from tl_app.inference import (decode_failure_reason, header_probe, pixel_limit, RowWriter, Tally, check_request,
                              iter_inputs)
from tl_app.data.pipeline import load_image
from tl_app.core.errors import ConfigError
from tl_app.core.progress import Progress


# ---- inside the actors -----------------------------------------------------
class _Discard:
    """A cache stand-in for the actors: the driver, not the workers, writes the cache."""

    def write(self, *args, **kwargs):
        return None


class _Silent:
    def update(self, count: int) -> None:
        pass


def limit_threads(cpus: float) -> None:
    """Give TensorFlow as many threads as the actor was granted CPUs (before TF starts)."""
    if cpus and cpus >= 1:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(cpus))
            tf.config.threading.set_inter_op_parallelism_threads(max(1, int(cpus)))
        except RuntimeError:
            pass  # TF already initialised in this process: keep its threads


def rows_to_records(batch: dict) -> list[Record]:
    """The few Record fields the local pipeline reads (path, fast, sha256)."""
    return [Record(path=str(path), relpath="", label="", label_index=0, split="", sha256=str(sha), format="",
                   width=0, height=0, fast=bool(fast))
            for path, fast, sha in zip(batch["path"], batch["fast"], batch["sha256"])]


class FeatureActor:
    """One backbone per Ray actor, built once; each call featurises a few batches of images."""

    def __init__(self, config: Config, recipe, batch_size: int, cpus: float = 0.0):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        limit_threads(cpus)
        self.extractor = Extractor(config, recipe)
        self.extractor.build()
        self.dim = self.extractor.dim()
        self.batch_size = int(batch_size)

    def __call__(self, batch: dict) -> dict:
        records = rows_to_records(batch)
        out = np.zeros((len(records), self.dim), np.float32)
        failed = self.extractor.compute(records, list(range(len(records))), _Discard(), out, self.batch_size,
                                        _Silent())
        done = np.array([i for i in range(len(records)) if i not in failed], np.int64)
        return {"position": np.asarray(batch["position"], np.int64)[done], "features": out[done]}


class ViewActor(FeatureActor):
    """Augmented views: the local extractor's deterministic augmenter, per (image, view)."""

    def __call__(self, batch: dict) -> dict:
        records = rows_to_records(batch)
        k = int(batch["k"][0]) if len(records) else 1
        wanted = [[int(v) for v in str(views).split(",")] for views in batch["views"]]
        missing = [t * k + v - 1 for t, views in enumerate(wanted) for v in views]
        flat = np.zeros((len(records) * k, self.dim), np.float32)
        self.extractor.compute_views(records, list(range(len(records))), k, missing, _Discard(), flat,
                                     self.batch_size, _Silent())
        rows = np.asarray(batch["row"], np.int64)
        return {"row": np.array([rows[m // k] for m in missing], np.int64),
                "view": np.array([m % k + 1 for m in missing], np.int32),
                "features": flat[missing] if missing else np.zeros((0, self.dim), np.float32)}


# ---- on the driver ------------------------------------------------------------
def actor_options(config: Config) -> dict:
    """map_batches arguments from [engine]: a fixed pool of num_workers actors, CPUs/GPUs each."""
    from ray.data import ActorPoolStrategy

    engine = config.engine
    options: dict[str, Any] = {"compute": ActorPoolStrategy(size=int(engine.num_workers)),
                               "num_cpus": float(engine.cpus_per_worker)}
    if engine.gpus_per_worker:
        options["num_gpus"] = float(engine.gpus_per_worker)
    return options


MAX_BATCHES_PER_CALL = 4


def rows_per_call(count: int, batch_size: int, workers: int) -> int:
    """Rows sent to an actor at once: up to 4 model batches (the actor's tf.data pipeline then
    decodes the next batch while the model runs), yet at least two calls per actor."""
    batches = count // max(1, workers * batch_size * 2)
    return batch_size * max(1, min(MAX_BATCHES_PER_CALL, batches))


def check_data_address(config: Config) -> None:
    """Ray Data needs a driver on the cluster: the Ray client (ray://) cannot run its executor."""
    address = config.engine.address.strip()
    if address.startswith("ray://"):
        raise TlAppError(
            f"--address {address}: Ray Data (extract and predict with --engine ray) does not run through the Ray "
            f"client. Run tl-app on a node of the cluster with --address auto, or submit it there as a Ray job: "
            f"ray job submit --address http://HEAD:8265 -- tl-app ... --engine ray --address auto "
            f"(training with --engine ray does accept ray:// addresses)."
        )


def run_actors(config: Config, actor_class, items: list[dict], constructor: dict, batch_size: int) -> Iterator[dict]:
    """Stream the actors' output batches back to the driver as they finish."""
    ray = connect(config.engine)
    check_resources(ray, config.engine)
    dataset = ray.data.from_items(items)
    rows = rows_per_call(len(items), int(batch_size), int(config.engine.num_workers))
    mapped = dataset.map_batches(actor_class, fn_constructor_kwargs=constructor, batch_size=rows,
                                 batch_format="numpy", **actor_options(config))
    try:
        yield from mapped.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as exc:
        raise TlAppError(
            f"The Ray engine failed: {exc}\nEvery batch that finished is in the feature cache; "
            f"run the same command again to resume."
        ) from None


class RayExtractor:
    """tl_app.features.Extractor's interface (model, dim, compute, compute_views) on Ray actors."""

    def __init__(self, config: Config, recipe):
        check_data_address(config)  # a wrong address is a mistake whether Ray is installed or not
        require_ray()  # before any work: without Ray, say which extra to install
        self.config = config
        self.recipe = recipe
        self.model = None  # the backbone lives in the actors
        self._dim: int | None = None

    def dim(self) -> int:
        """The feature width; it does not depend on the weights, so a random-weight copy answers."""
        if self._dim is None:
            shape_only = self.config.with_overrides({"backbone.weights": "none"})
            probe = Extractor(shape_only, self.recipe)
            self._dim = probe.dim()
            del probe
        return self._dim

    def _constructor(self, batch_size: int) -> dict:
        return {"config": self.config, "recipe": self.recipe, "batch_size": batch_size,
                "cpus": float(self.config.engine.cpus_per_worker)}

    def compute(self, records: Sequence[Record], missing, cache, out, batch_size, progress) -> set[int]:
        """Features of the missing records (identical files once), one cache shard per returned batch."""
        unique = UniqueImages(records, missing)
        items = [{"position": i, "path": records[i].path, "fast": bool(records[i].fast),
                  "sha256": records[i].sha256} for i in unique.positions]
        if not items:
            return set(missing)
        actors = run_actors(self.config, FeatureActor, items, self._constructor(batch_size), batch_size)
        with closing(actors) as batches:  # an error or interrupt here stops the actors too
            for batch in batches:
                positions = batch["position"].tolist()
                progress.update(unique.take(positions, np.asarray(batch["features"], np.float32), cache, out))
        return unique.failed()

    def compute_views(self, records, train_rows, k, missing_views, cache, flat, batch_size, progress) -> None:
        """The missing augmented views; flat[t * k + v - 1] is view v of train row t (as locally)."""
        by_train_row: dict[int, list[int]] = {}
        for flat_index in missing_views:
            by_train_row.setdefault(flat_index // k, []).append(flat_index % k + 1)
        items = []
        for t in sorted(by_train_row):
            record = records[train_rows[t]]
            items.append({"row": t, "path": record.path, "fast": bool(record.fast), "sha256": record.sha256,
                          "views": ",".join(str(v) for v in by_train_row[t]), "k": int(k)})
        if not items:
            return
        actors = run_actors(self.config, ViewActor, items, self._constructor(batch_size), batch_size)
        with closing(actors) as batches:
            for batch in batches:
                rows, views = batch["row"].tolist(), batch["view"].tolist()
                if not rows:
                    continue
                features = np.asarray(batch["features"], np.float32)
                cache.write([records[train_rows[t]].sha256 for t in rows], views, features)
                for t, v, vector in zip(rows, views, features):
                    flat[t * k + v - 1] = vector
                progress.update(len(rows))


# ---- batch prediction ------------------------------------------------------------
class PredictActor:
    """One loaded classifier per Ray actor; each call predicts a few batches of files."""

    def __init__(self, model_path: str, batch_size: int, cpus: float = 0.0, max_pixels: int = 0):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        limit_threads(cpus)
        self.predictor = open_model(model_path)
        self.max_pixels = pixel_limit(self.predictor, max_pixels)
        self.batch_size = int(batch_size)

    def __call__(self, batch: dict) -> dict:

        indices = np.asarray(batch["index"], np.int64)
        paths = [str(p) for p in batch["path"]]
        checked = [header_probe(path, self.max_pixels) for path in paths]  # (fast, problem)
        reasons = [problem for _, problem in checked]
        good = [i for i in range(len(paths)) if not reasons[i]]
        probs = np.zeros((len(paths), len(self.predictor.classes)), np.float32)
        scores = np.full(len(paths), np.nan, np.float32)  # stays NaN for a model without an OOD scorer
        ok = np.zeros(len(paths), bool)
        if good:
            for images, rows in self._images(paths, [checked[i][0] for i in good], good):
                rows = rows.numpy()
                outputs = self.predictor.outputs(images)
                probs[rows] = outputs["probabilities"]
                if OOD_SCORE in outputs:
                    scores[rows] = outputs[OOD_SCORE]
                ok[rows] = True
        for i in good:
            if not ok[i]:
                reasons[i] = decode_failure_reason(paths[i], self.max_pixels)
        return {"index": indices, "ok": ok, "probabilities": probs, "ood_score": scores,
                "reason": np.array(reasons, dtype=object)}

    def _images(self, paths: list[str], fast: list[bool], rows: list[int]):
        """Batches of (images, row) decoded by the local engine's load_image; a file that fails is dropped."""
        import tensorflow as tf


        p = self.predictor
        size, policy, background = p.input_size, p.resize_policy, p.background
        ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(paths[i]) for i in rows], fast, rows))
        ds = ds.map(lambda path, is_fast, row: (load_image(path, is_fast, size, policy, background), row),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        return ds.batch(self.batch_size)


def predict_paths_ray(model, inputs, config: Config, out=None, top_k: int = 5, batch_size: int = 32,
                      echo=print, progress: bool | None = None, max_pixels: int = 0) -> dict:
    """tl_app.inference.predict_paths on Ray actors: same rows, same order, same summary.

    Inputs are listed on the driver; header checks, decoding and the model run
    in the actors. Rows are written in input order as soon as every earlier
    row is known, in the local engine's format.
    """
    import time


    inputs = check_request(inputs, top_k, batch_size)
    if isinstance(model, Predictor):
        raise ConfigError("--engine ray loads the model in every actor: pass the model's path, not a Predictor.")
    check_data_address(config)
    require_ray()
    # the model's files, not the model: fails here, clearly, before any actor starts
    info = read_model_info(os.path.abspath(str(model)))
    model_path = os.path.abspath(str(info.source))  # this version, even if a newer one appears meanwhile

    listed = list(iter_inputs(inputs))
    threshold = ood_threshold_of(info.card)  # None: no unknown columns, as the local engine
    tally = Tally(RowWriter(out, min(top_k, len(info.classes)), ood=threshold is not None), info.classes, threshold)
    bar = Progress(len(listed), "predict", enabled=progress if progress is not None else echo is not None)
    results: dict[int, tuple] = {}  # index -> (ok, probabilities, reason, score), until its row is written
    written = [0]

    def flush() -> None:
        while written[0] in results:
            ok, probs, reason, score = results.pop(written[0])
            path = listed[written[0]][0]
            written[0] += 1
            if ok:
                tally.prediction(path, probs, score if threshold is not None else None)
            else:
                tally.failure(path, reason)

    items = []
    for index, (path, problem) in enumerate(listed):
        if problem:
            results[index] = (False, None, problem, None)
        else:
            items.append({"index": index, "path": path})
    started = time.perf_counter()
    try:
        flush()
        if items:
            constructor = {"model_path": model_path, "batch_size": batch_size,
                           "cpus": float(config.engine.cpus_per_worker), "max_pixels": max_pixels}
            with closing(run_actors(config, PredictActor, items, constructor, batch_size)) as batches:
                for batch in batches:
                    rows = zip(batch["index"].tolist(), batch["ok"].tolist(), np.asarray(batch["probabilities"]),
                               batch["reason"].tolist(), np.asarray(batch["ood_score"]).tolist())
                    for index, ok, probs, reason, score in rows:
                        results[index] = (ok, probs, str(reason), score)
                    flush()
                    bar.set(tally.done, tally.bad)
        flush()
    finally:
        tally.writer.close()
    seconds = time.perf_counter() - started
    bar.set(tally.done, tally.bad, final=True)
    return {**tally.summary(model_path, info.version, len(listed), seconds), "engine": "ray"}
