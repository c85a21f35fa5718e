"""Raw backbone throughput per backbone, as a ratio against ResNet50 measured in the same run.

Each backbone's feature model (raw pixels -> preprocessing -> backbone -> pooled features, random
weights: speed does not depend on their values) runs at its default input size, batch 32, as a
compiled forward pass (``tf.function`` around ``model(x, training=False)``) on in-memory float32
tensors: the fastest plain way to run it, the baseline every pipeline is compared with. ResNet50 is
measured first and last; the baseline is their mean and the drift between them says how steady the
machine was. The ratios are what ``tl-app backbones`` shows as speed (models/registry.py).

    python bench/bench_backbone.py --quick              # every backbone, 2 timed batches each
    python bench/bench_backbone.py --backbones resnet50,convnext_tiny --batches 6
"""

from __future__ import annotations

import argparse
import time

from common import emit

import numpy as np


def compiled_throughput(model, size: int, batch: int, batches: int, warmup: int = 1) -> float:
    """Images/s of the compiled forward pass over ``batches`` batches, after ``warmup`` calls."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    call = tf.function(lambda images: model(images, training=False))
    for _ in range(warmup):
        np.asarray(call(x))
    start = time.perf_counter()
    for _ in range(batches):
        np.asarray(call(x))
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 timed batches per backbone (a few minutes on 2 cores)")
    parser.add_argument("--batches", type=int, default=0, help="timed batches per backbone (default 6, quick 2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbones", default="", help="comma-separated names (default: every registry backbone)")
    parser.add_argument("--size", type=int, default=0, help="one input size for all (default: each one's own)")
    args = parser.parse_args()
    import keras

    from tl_app.models.backbones import REGISTRY, build_feature_model, get_spec

    batches = args.batches or (2 if args.quick else 6)
    names = [get_spec(n.strip()).name for n in args.backbones.split(",") if n.strip()] or list(REGISTRY)
    order = ["resnet50"] + [n for n in names if n != "resnet50"] + ["resnet50"]
    rates: dict[str, list[float]] = {}
    for name in order:
        spec = get_spec(name)
        size = args.size or spec.default_size
        model = build_feature_model(spec, size, "none")
        ips = compiled_throughput(model, size, args.batch, batches)
        rates.setdefault(name, []).append(ips)
        print(f"{name:<17} {size:>4} px {ips:8.2f} images/s", flush=True)
        del model
        keras.backend.clear_session()
    first, last = rates["resnet50"]
    baseline = (first + last) / 2
    results = {}
    print(f"\nbaseline resnet50: {baseline:.2f} images/s (first {first:.2f}, last {last:.2f}, "
          f"drift {abs(first - last) / baseline:.0%})")
    print(f"{'backbone':<17} {'size':>4} {'images/s':>9} {'vs resnet50':>11}")
    for name in names:
        spec = get_spec(name)
        ips = float(np.mean(rates[name])) if name != "resnet50" else baseline
        ratio = ips / baseline
        results[name] = {"size": args.size or spec.default_size, "images_per_s": round(ips, 2),
                         "vs_resnet50": round(ratio, 2)}
        print(f"{name:<17} {results[name]['size']:>4} {ips:9.2f} {ratio:10.2f}x")
    emit("backbone", {"batch": args.batch, "batches": batches, "way": "tf_function", "baseline": "resnet50",
                      "resnet50_first_last": [round(first, 2), round(last, 2)], "backbones": results})


if __name__ == "__main__":
    main()
