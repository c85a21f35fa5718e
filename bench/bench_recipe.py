"""The fine-tuning recipe options against the plain recipe, on the sample with real pretrained weights.

Same data, weights (hed-vgg16: edge-tuned HED VGG16 convolutions, not ImageNet),
seed and epochs as bench_quality.py's fine-tune route, with block5 and block4
unfrozen in phase 2 so that train.lr_decay_per_block has a deeper block to act
on. Each row changes one option; accuracy and macro-F1 come from tl-app
evaluate on the same validation images, and the time is a ratio to the plain
row measured in the same run.

    python bench/bench_recipe.py [--quick] [--size 96] [--only plain,ema]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import emit
from bench_quality import CLASSES, base_config, write_data

ROWS = {
    "plain": {},
    "ema": {"train.ema": True},  # train.ema_momentum as configured (0.99)
    "ema/0.9": {"train.ema": True, "train.ema_momentum": 0.9},  # a shorter memory, for runs of few steps
    "mixup 0.2": {"train.mixup": 0.2},
    "cutmix 1.0": {"train.cutmix": 1.0},
    "lr_decay 0.3": {"train.lr_decay_per_block": 0.3},
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small data and input size: minutes on 2 CPU cores")
    parser.add_argument("--size", type=int, default=0, help="input size (default 96 quick, 160 otherwise)")
    parser.add_argument("--weights", default="hed-vgg16")
    parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
    args = parser.parse_args()
    size = args.size or (96 if args.quick else 160)
    train_each, val_each = (30, 15) if args.quick else (60, 30)
    rows_wanted = [r for r in ROWS if not args.only or r in args.only.split(",")]
    if "plain" not in rows_wanted:
        rows_wanted.insert(0, "plain")

    from tl_app.api import train
    from tl_app.insight.evaluate import evaluate
    from tl_app.models.backbones import get_spec
    from tl_app.models.weights import labelled, resolve_weights

    resolve_weights(get_spec("vgg16"), args.weights)
    weights = labelled(args.weights)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        work = Path(tmp)
        data = write_data(work / "data", train_each, val_each)
        config = base_config(work, data, args.weights, size, epochs=3 if args.quick else 8).with_overrides({
            "train.strategy": "finetune", "train.finetune_epochs": 2 if args.quick else 6,
            "train.unfreeze_blocks": 2})
        for name in rows_wanted:
            overrides = {"train.name": name.replace(" ", "-").replace("/", "-"), **ROWS[name]}
            start = time.perf_counter()
            summary = train(config.with_overrides(overrides), echo=None)
            seconds = time.perf_counter() - start
            metrics = evaluate(summary["run_dir"], str(data), split="val", echo=None)
            rows[name] = {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro"]["f1"], 4),
                          "seconds": round(seconds, 1)}
            print(f"  {name}: {rows[name]}", flush=True)

    plain = rows["plain"]
    print(f"\nvgg16 {weights}, {size}px, {train_each}/class train, {val_each}/class val, fine-tune "
          f"{config.train.epochs}+{config.train.finetune_epochs} epochs, block5+block4 unfrozen "
          f"(chance accuracy {1 / len(CLASSES):.2f})")
    print(f"{'recipe':<13} {'accuracy':>8} {'macro-F1':>8} {'d-acc':>7} {'seconds':>8} {'time/plain':>10}")
    for name, row in rows.items():
        row["accuracy_delta"] = round(row["accuracy"] - plain["accuracy"], 4)
        row["time_ratio"] = round(row["seconds"] / (plain["seconds"] or 1e-9), 2)
        print(f"{name:<13} {row['accuracy']:>8.3f} {row['macro_f1']:>8.3f} {row['accuracy_delta']:>+7.3f} "
              f"{row['seconds']:>8.1f} {row['time_ratio']:>10.2f}")
    emit("recipe", {"weights": weights, "size": size, "train_each": train_each, "val_each": val_each,
                    "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
