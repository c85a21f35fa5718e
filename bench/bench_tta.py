"""Test-time augmentation: accuracy with and without --tta, on the sample with real pretrained weights.

Same data, weights (hed-vgg16: edge-tuned HED VGG16 convolutions, NOT ImageNet)
and head as bench_quality.py's dense route (and, with --finetune, its fine-tune
route). Each trained model is evaluated on the same validation images with
--tta 1 (a single pass, the default), 2 (image + flip), 7 (+ the 5 crops) and
12 (+ the crops' flips); accuracy, macro-F1, NLL and the evaluation time as a
ratio to --tta 1 come from tl-app evaluate in one run. Seeds train separate
heads, so a difference smaller than the spread between seeds is noise.

    python bench/bench_tta.py [--quick] [--size 96] [--seeds 0,1] [--views 1,2,7,12] [--finetune]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import emit
from bench_quality import CLASSES, base_config, write_data


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small data and input size: minutes on 2 CPU cores")
    parser.add_argument("--size", type=int, default=0, help="input size (default 96 quick, 160 otherwise)")
    parser.add_argument("--weights", default="hed-vgg16")
    parser.add_argument("--seeds", default="0,1", help="one head per seed")
    parser.add_argument("--views", default="1,2,7,12", help="--tta values to compare (1 is always measured)")
    parser.add_argument("--finetune", action="store_true", help="also the fine-tune route (3+2 epochs quick)")
    args = parser.parse_args()
    size = args.size or (96 if args.quick else 160)
    train_each, val_each = (30, 40) if args.quick else (60, 60)
    views = sorted({1, *(int(v) for v in args.views.split(","))})
    seeds = [int(s) for s in args.seeds.split(",")]

    from tl_app.api import train
    from tl_app.insight.evaluate import evaluate
    from tl_app.models.backbones import get_spec
    from tl_app.models.tta import view_names
    from tl_app.models.weights import labelled, resolve_weights

    resolve_weights(get_spec("vgg16"), args.weights)
    weights = labelled(args.weights)
    routes = {"dense": {}}
    if args.finetune:
        routes["finetune"] = {"train.strategy": "finetune", "train.epochs": 3 if args.quick else 8,
                              "train.finetune_epochs": 2 if args.quick else 6, "train.unfreeze_blocks": 1}
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        work = Path(tmp)
        data = write_data(work / "data", train_each, val_each)
        config = base_config(work, data, args.weights, size, epochs=15 if args.quick else 40)
        for route, overrides in routes.items():
            for seed in seeds:
                summary = train(config.with_overrides({"train.name": f"{route}-{seed}", "train.seed": seed,
                                                       **overrides}), echo=None)
                for n in views:
                    start = time.perf_counter()
                    metrics = evaluate(summary["run_dir"], str(data), split="val", out_dir=work / f"eval-{n}",
                                       echo=None, tta=n)
                    row = {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro"]["f1"], 4),
                           "nll": round(metrics["nll"], 4), "seconds": round(time.perf_counter() - start, 2)}
                    rows.setdefault(route, {}).setdefault(seed, {})[n] = row
                    print(f"  {route} seed {seed} --tta {n}: {row}", flush=True)

    print(f"\nvgg16 {weights}, {size}px, {train_each}/class train, {val_each}/class val "
          f"({val_each * len(CLASSES)} images; chance accuracy {1 / len(CLASSES):.2f})")
    print(f"{'route':<9} {'seed':>4} {'tta':>4} {'accuracy':>8} {'d-acc':>7} {'macro-F1':>8} {'nll':>7} "
          f"{'time/tta1':>9}")
    summary_rows = {}
    for route, by_seed in rows.items():
        for seed, by_views in by_seed.items():
            one = by_views[1]
            for n, row in by_views.items():
                row["accuracy_delta"] = round(row["accuracy"] - one["accuracy"], 4)
                row["time_ratio"] = round(row["seconds"] / (one["seconds"] or 1e-9), 2)
                print(f"{route:<9} {seed:>4} {n:>4} {row['accuracy']:>8.3f} {row['accuracy_delta']:>+7.3f} "
                      f"{row['macro_f1']:>8.3f} {row['nll']:>7.3f} {row['time_ratio']:>9.2f}")
        for n in views:
            deltas = [by_seed[s][n]["accuracy_delta"] for s in by_seed]
            summary_rows.setdefault(route, {})[n] = round(sum(deltas) / len(deltas), 4)
    for route, means in summary_rows.items():
        print(f"{route}: mean accuracy change over seeds against --tta 1: "
              + ", ".join(f"--tta {n} ({'+'.join(view_names(n))}) {d:+.3f}" if n <= 2 else f"--tta {n} {d:+.3f}"
                          for n, d in means.items()))
    emit("tta", {"weights": weights, "size": size, "train_each": train_each, "val_each": val_each,
                 "views": views, "rows": rows, "mean_accuracy_delta": summary_rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
