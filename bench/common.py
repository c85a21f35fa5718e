"""Shared helpers for benchmarks: every figure is a ratio against a baseline
measured in the same process, because these machines are noisy."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def write_photo_folder(root: str | Path, count: int, classes: int = 2, size=(500, 375), seed: int = 0) -> Path:
    """Real-size JPEG 'photos' (smooth gradients plus noise, ~500x375) in class folders."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"photo_{i:05d}.jpg"
        if path.exists():
            continue
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-0.3, 0.3, (2, 3))
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        pixels += rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=88)
    return root


def predict_throughput(model, size: int, batch: int = 32, batches: int = 4, warmup: int = 1) -> float:
    """Images/s of model.predict on in-memory tensors (the reference every pipeline is compared with)."""
    x = np.random.default_rng(0).uniform(0, 255, (batch * batches, size, size, 3)).astype("float32")
    model.predict(x[: batch * warmup], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.predict(x, batch_size=batch, verbose=0)
    return len(x) / (time.perf_counter() - start)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def emit(name: str, results: dict, rows: list[dict] | None = None) -> None:
    """The last line of every benchmark: one JSON document (with its target rows, if any, under "target_rows")."""
    print(json.dumps({"bench": name, **results, **({"target_rows": rows} if rows else {})}, sort_keys=True))


def target_row(row: str, what: str, value: float, unit: str, baseline: float | None, baseline_what: str,
               ratio: float, target: str) -> dict:
    """One line of an issue's target table: the measured figure, the baseline it was divided by (measured in
    the same run), the ratio and the goal; ``met`` reads the goal (">= 1.2", "<= 1.3") against the ratio."""
    op, goal = target.split()[:2]
    met = ratio >= float(goal) if op == ">=" else ratio <= float(goal)
    return {"row": row, "what": what, "value": round(value, 3), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 3), "baseline_what": baseline_what,
            "ratio": round(ratio, 3), "target": target, "met": bool(met)}


def honest_throughput(model, size: int, batch: int = 32, batches: int = 4, warmup: int = 2) -> dict:
    """Images/s of the fastest plain way to run ``model`` on in-memory float32 tensors at one batch size.

    Three ways, each after ``warmup`` calls and over the same ``batches`` batches: the model called
    in a compiled ``tf.function`` (``model(x, training=False)``), ``predict_on_batch`` and ``predict``.
    ``predict`` alone mostly measures its per-call overhead on small inputs; the best of the three is
    the baseline every pipeline is divided by (issue 17).
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    pool = [rng.uniform(0, 255, (batch, size, size, 3)).astype("float32") for _ in range(min(batches, 4))]
    data = [pool[k % len(pool)] for k in range(batches)]
    call = tf.function(lambda x: model(x, training=False))

    def run_call():
        for x in data:
            np.asarray(call(tf.constant(x)))

    def run_on_batch():
        for x in data:
            np.asarray(model.predict_on_batch(x))

    everything = np.concatenate(data)

    def run_predict():
        model.predict(everything, batch_size=batch, verbose=0)

    rates = {}
    for name, fn, warm in (("tf_function", run_call, lambda: [np.asarray(call(tf.constant(pool[0])))
                                                               for _ in range(warmup)]),
                           ("predict_on_batch", run_on_batch, lambda: [model.predict_on_batch(pool[0])
                                                                        for _ in range(warmup)]),
                           ("predict", run_predict, lambda: [model.predict(pool[0], batch_size=batch, verbose=0)
                                                             for _ in range(warmup)])):
        warm()
        start = time.perf_counter()
        fn()
        rates[name] = round(batch * batches / (time.perf_counter() - start), 2)
    best = max(rates, key=rates.get)
    return {**rates, "best": rates[best], "best_way": best, "images": batch * batches, "batch": batch,
            "dtype": "float32"}
