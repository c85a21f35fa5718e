"""Evaluate a trained classifier on an image folder: numbers, tables and pictures.

Outputs (in the evaluation folder): metrics.json, predictions.csv,
confusion_matrix.csv / confusion_matrix_normalized.csv and their PNGs,
top_losses.png, reliability_diagram.png (calibration before and after the
model's temperature) and skipped.csv (files that could not be used, with reasons).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from tl_app.core.errors import DataError, TlAppError
from tl_app.models.opener import Predictor, open_model
from tl_app.data.pipeline import make_dataset
from tl_app.core.config import DataConfig
from tl_app.data.manifest import Manifest
from tl_app.data.scan import scan
from tl_app.insight.plots import (BAD, GOOD, Tile, confusion_matrix_plot, contact_sheet, grid_rows, reliability_diagram,
                                 risk_coverage_plot)
from tl_app.models.calibration import scale_probabilities, temperature_of
from tl_app.models.tta import card_views, check_views, tta_function, view_names, views_to_run
from tl_app.training.calibration import calibration_figures, reliability_bins, risk_coverage
from tl_app.training.retrieval import retrieval_text
from tl_app.insight.ood import folder_images, ood_figures, ood_text


# ---- metrics -----------------------------------------------------------------
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return matrix


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    if len(y_true) == 0:
        return 0.0
    k = max(1, min(k, probs.shape[1]))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def classification_metrics(y_true, probs: np.ndarray, classes: list[str], top_k: int = 5) -> dict:
    """Accuracy, top-k accuracy, per-class precision/recall/F1/support, macro and weighted means.

    Divisions by zero count as 0, as in scikit-learn with ``zero_division=0``; macro
    means average the classes that occur (true or predicted), as scikit-learn does.
    """
    y_true = np.asarray(y_true, int)
    k = len(classes)
    y_pred = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, int)
    matrix = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    total = support.sum()
    weights = support / total if total else np.zeros(k)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    k_used = max(1, min(top_k, k))
    # macro means over the classes present (true or predicted), as scikit-learn's default labels:
    # a class absent from the evaluated split is not a zero
    present = (support > 0) | (predicted > 0)
    present = present if present.any() else np.ones(k, bool)
    return {
        "count": int(len(y_true)),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "top_k": k_used,
        "top_k_accuracy": top_k_accuracy(y_true, probs, k_used),
        "per_class": per_class,
        "macro": {"precision": float(precision[present].mean()), "recall": float(recall[present].mean()),
                  "f1": float(f1[present].mean()), "classes": int(present.sum())},
        "weighted": {"precision": float((precision * weights).sum()), "recall": float((recall * weights).sum()),
                     "f1": float((f1 * weights).sum())},
        "confusion_matrix": matrix.tolist(),
    }


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    sums = matrix.sum(axis=1, keepdims=True).astype(float)
    return np.divide(matrix, sums, out=np.zeros(matrix.shape), where=sums > 0)


def most_confused(matrix: np.ndarray, classes: list[str], limit: int = 10) -> list[dict]:
    """Off-diagonal cells, largest first: (true, predicted, count, share of the true class)."""
    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1)
    pairs = [
        {"true": classes[i], "predicted": classes[j], "count": int(matrix[i, j]),
         "fraction_of_true": float(matrix[i, j] / rows[i]) if rows[i] else 0.0}
        for i in range(len(classes)) for j in range(len(classes)) if i != j and matrix[i, j] > 0
    ]
    pairs.sort(key=lambda p: (-p["count"], -p["fraction_of_true"], p["true"], p["predicted"]))
    return pairs[:limit]


def calibration_section(probs: np.ndarray, y_true: np.ndarray, temperature: float | None) -> tuple[dict, list]:
    """Figures (ECE, MCE, NLL, Brier) before and after the model's temperature, and the diagram's curves.

    A calibrated model outputs softmax(log(p) / T); its uncalibrated probabilities are recovered
    exactly (up to the layer's 1e-12 floor) as softmax(T * log(p_calibrated)), so one pass suffices.
    """
    if temperature is None:
        figures = calibration_figures(probs, y_true)
        return ({"method": "none", "temperature": None, "before": figures, "after": None},
                [("uncalibrated", reliability_bins(probs, y_true), figures["ece"])])
    raw = scale_probabilities(probs, 1.0 / temperature)
    before, after = calibration_figures(raw, y_true), calibration_figures(probs, y_true)
    return ({"method": "temperature", "temperature": float(temperature), "before": before, "after": after},
            [("before (T = 1)", reliability_bins(raw, y_true), before["ece"]),
             (f"after (T = {temperature:.3f})", reliability_bins(probs, y_true), after["ece"])])


# ---- evaluation --------------------------------------------------------------
def choose_split(split: str | None, manifest, same_data: bool) -> str:
    """val for the training folder (the held-out part); for other folders test, then all."""
    if split:
        if split not in ("train", "val", "test", "all"):
            raise TlAppError(f"--split must be one of val, test, all (or train), got {split!r}.")
        return split
    if same_data:
        return "val"
    if manifest.layout == "split-folders":
        return "test" if manifest.split("test") else "val"
    return "all"


def training_manifest(loaded: Predictor):
    """The manifest the model was trained on (its run directory's), or None when it cannot be found."""
    run_dir = loaded.run_dir or (Path(loaded.card["run_dir"]) if loaded.card.get("run_dir") else None)
    if run_dir is None or not (Path(run_dir) / "manifest.json").is_file():
        return None
    try:
        return Manifest.load(Path(run_dir) / "manifest.json")
    except (OSError, ValueError, TypeError, KeyError):
        return None


def apply_training_splits(manifest, trained) -> tuple[dict, list]:
    """Give each scanned image the split it had in training (by content, then by path).

    Returns the counts of new, gone and changed images, and the new images,
    which belong to no training split (they are left out of train/val/test).
    """
    by_hash = {r.sha256: r.split for r in trained.records}
    by_path = {r.relpath: r for r in trained.records}
    now = {r.relpath for r in manifest.records}
    kept, unseen, changed = [], [], 0
    for record in manifest.records:
        old = by_path.get(record.relpath)
        if old is not None and old.sha256 != record.sha256:
            changed += 1
        split = by_hash.get(record.sha256) or (old.split if old is not None else None)
        if split is None:
            unseen.append(record)
            continue
        record.split = split
        kept.append(record)
    manifest.records = kept
    gone = sum(1 for relpath in by_path if relpath not in now)
    return {"new": len(unseen), "gone": gone, "changed": changed}, unseen


def predict_records(loaded: Predictor, records, batch_size: int = 32, background=(255, 255, 255), views: int = 1):
    """Probabilities for each record that decodes (averaged over ``views`` test-time views); returns
    (probs, kept record indices)."""
    dataset = make_dataset(records, loaded.input_size, loaded.resize_policy, batch_size, with_index=True,
                           background=background)
    run = tta_function(loaded.model.predict_on_batch, views)
    probs, kept = [], []
    for images, index in dataset:
        probs.append(np.asarray(run(images), np.float32))
        kept.append(index.numpy())
    if not probs:
        return np.zeros((0, len(loaded.classes)), np.float32), np.zeros(0, int)
    return np.concatenate(probs), np.concatenate(kept).astype(int)


def evaluate(model_path: str | Path, data: str | Path | None = None, split: str | None = None,
             out_dir: str | Path | None = None, top_k: int = 5, batch_size: int = 32, top_losses: int = 16,
             ood_folder: str | Path | None = None, echo=print, tta: int = 1) -> dict:
    """Run the model over a folder's split and write every evaluation artifact; returns metrics.

    ``tta`` > 1: probabilities averaged over that many views (models.tta). A model exported with --tta is
    evaluated over its own views (what it serves), and asking it for more is refused.
    """
    say = echo or (lambda *a, **k: None)
    check_views(tta)
    if ood_folder is not None and not Path(ood_folder).is_dir():
        raise DataError(f"--ood-folder {str(ood_folder)!r} is not a folder. Expected a folder of images from "
                        f"none of the model's classes (any layout).")
    loaded = open_model(model_path, keras=True)
    views = max(views_to_run(tta, loaded.card), card_views(loaded.card))  # loaded.model is the single pass
    data_root = data or loaded.card.get("data_root")
    if not data_root:
        raise DataError("No DATA folder given and the model does not record its training data; pass DATA.")
    data_config = dataclasses.replace(loaded.config.data if loaded.config is not None else DataConfig(),
                                      root=str(data_root), strict=False)
    manifest = scan(data_root, data_config)
    same_data = bool(loaded.card.get("data_root")) and Path(data_root).resolve() == Path(
        loaded.card["data_root"]).resolve()
    split = choose_split(split, manifest, same_data)
    changes = None
    run_manifest = training_manifest(loaded) if same_data else None
    if run_manifest is not None:
        changes, unseen = apply_training_splits(manifest, run_manifest)
        if changes["new"] or changes["gone"] or changes["changed"]:
            say(f"warning: {data_root} changed since training: {changes['new']} new, {changes['gone']} gone, "
                f"{changes['changed']} changed image(s); splits are the run's, new images count only in --split all")
        records = manifest.split(split) + (unseen if split == "all" else [])
    else:
        records = manifest.split(split)
    if not records:
        available = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
        raise DataError(
            f"No images in split {split!r} of {data_root} (images per split: {available}). "
            f"Choose another with --split (val, test or all)."
        )
    skipped = [{"path": s.path, "reason": s.reason} for s in manifest.skipped]
    model_index = {name: i for i, name in enumerate(loaded.classes)}
    labels = {r.label for r in records}
    unknown = sorted(labels - set(model_index))
    if len(unknown) == len(labels):
        raise DataError(
            f"None of the classes in {data_root} ({', '.join(sorted(labels))}) is a class of "
            f"the model ({', '.join(loaded.classes)}). Expected class folders named like the training classes."
        )
    for record in records:
        if record.label in unknown:
            skipped.append({"path": record.path, "reason": f"class {record.label!r} is not a class of the model"})
    records = [r for r in records if r.label in model_index]
    say(f"evaluating {loaded.label} on {len(records)} images ({split} split of {data_root})"
        + (f" averaged over {views} test-time views" if views > 1 else ""))
    probs, kept = predict_records(loaded, records, batch_size, tuple(data_config.background), views)
    dropped = sorted(set(range(len(records))) - set(kept.tolist()))
    skipped += [{"path": records[i].path, "reason": "could not be decoded at evaluation time"} for i in dropped]
    used = [records[i] for i in kept]
    if not used:
        raise DataError(f"No image of split {split!r} in {data_root} could be decoded; see the skipped list.")
    y_true = np.array([model_index[r.label] for r in used], int)
    metrics = classification_metrics(y_true, probs, loaded.classes, top_k)
    matrix = np.array(metrics["confusion_matrix"])
    y_pred = probs.argmax(axis=1)
    losses = -np.log(np.clip(probs[np.arange(len(used)), y_true], 1e-7, 1.0))
    metrics.update({
        "model": str(loaded.source), "data": str(data_root), "split": split, "classes": loaded.classes,
        "nll": float(losses.mean()), "most_confused": most_confused(matrix, loaded.classes),
        "splits_from": "the run's manifest" if changes is not None else "a fresh scan",
        **({"data_changes": changes} if changes is not None else {}),
        "skipped": skipped, "skipped_count": len(skipped),
        "tta": {"views": views, "order": view_names(views)},
    })

    out = Path(out_dir) if out_dir else default_out_dir(loaded)
    out.mkdir(parents=True, exist_ok=True)
    write_matrix_csv(out / "confusion_matrix.csv", matrix, loaded.classes)
    normalized = normalize_rows(matrix)
    write_matrix_csv(out / "confusion_matrix_normalized.csv", normalized, loaded.classes)
    confusion_matrix_plot(matrix, loaded.classes, out / "confusion_matrix.png",
                          title=f"confusion matrix ({split}, n={len(used)})")
    confusion_matrix_plot(normalized, loaded.classes, out / "confusion_matrix_normalized.png",
                          normalized=True)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "confidence", "p_true", "loss"])
        for r, t, p, row, loss in zip(used, y_true, y_pred, probs, losses):
            writer.writerow([r.path, loaded.classes[t], loaded.classes[p], f"{row[p]:.6f}", f"{row[t]:.6f}",
                             f"{loss:.6f}"])
    with open(out / "skipped.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "reason"])
        writer.writeheader()
        writer.writerows(skipped)
    order = np.argsort(-losses, kind="stable")[:top_losses]
    tiles = [
        Tile(used[i].path,
             f"{Path(used[i].path).name[:22]}\ntrue {loaded.classes[y_true[i]]} / pred {loaded.classes[y_pred[i]]}\n"
             f"p={probs[i, y_pred[i]]:.2f} loss={losses[i]:.2f}",
             GOOD if y_true[i] == y_pred[i] else BAD)
        for i in order
    ]
    metrics["top_losses"] = [
        {"path": used[i].path, "true": loaded.classes[y_true[i]], "predicted": loaded.classes[y_pred[i]],
         "confidence": float(probs[i, y_pred[i]]), "loss": float(losses[i])} for i in order
    ]
    contact_sheet(grid_rows(tiles, 4), out / "top_losses.png", title=f"top {len(tiles)} losses ({split})")
    metrics["calibration"], curves = calibration_section(probs, y_true, temperature_of(loaded.model))
    reliability_diagram(curves, out / "reliability_diagram.png",
                        title=f"reliability ({split}, n={len(used)}, {len(curves[0][1])} bins)")
    selective = risk_coverage(probs, y_true)
    risk_coverage_plot([("top probability", selective)], out / "risk_coverage.png",
                       title=f"risk-coverage ({split}, n={len(used)})")
    metrics["selective"] = {"aurc": selective["aurc"], "accuracy_at_coverage": selective["at"],
                            "ranked_by": "top probability"}
    if loaded.card.get("retrieval"):  # a metric run: recorded at training (the export's card does not carry it)
        metrics["retrieval"] = loaded.card["retrieval"]
    if ood_folder is not None:
        metrics["ood"] = ood_section(loaded, run_manifest, used, ood_folder, batch_size,
                                     tuple(data_config.background))
    files = {name: str(out / name) for name in (
        "metrics.json", "confusion_matrix.csv", "confusion_matrix_normalized.csv", "confusion_matrix.png",
        "confusion_matrix_normalized.png", "top_losses.png", "reliability_diagram.png", "risk_coverage.png",
        "predictions.csv",
        "skipped.csv")}
    metrics["files"] = files
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    say(summary_text(metrics))
    return metrics


def ood_section(loaded: Predictor, run_manifest, used, ood_folder, batch_size: int, background) -> dict:
    """--ood-folder: Mahalanobis on the training split's features vs max-softmax, evaluated split vs the folder."""
    trained = run_manifest or training_manifest(loaded)
    train = trained.split("train") if trained is not None else []
    index = {name: i for i, name in enumerate(loaded.classes)}
    train = [r for r in train if r.label in index]
    if not train:
        raise DataError("--ood-folder needs the training split's images to fit the Mahalanobis scorer; none was "
                        "found (evaluate on the training folder, or a run whose data is still in place).")
    labels = np.array([index[r.label] for r in train], int)
    size, policy = loaded.input_size, loaded.resize_policy
    return ood_figures(
        loaded.model,
        make_dataset(train, size, policy, batch_size, with_index=True, background=background),
        lambda rows: labels[np.asarray(rows, int)],
        make_dataset(used, size, policy, batch_size, with_index=True, background=background),
        folder_images(ood_folder, size, policy, background, batch_size), scorer_record=loaded.card.get("ood"),
        score_fn=(lambda images: loaded.outputs(images).get("ood_score")) if loaded.ood_threshold is not None
        else None)


def default_out_dir(loaded: Predictor) -> Path:
    if loaded.run_dir is not None:
        return loaded.run_dir / "evaluation"
    return Path("evaluation") / loaded.label


def write_matrix_csv(path: Path, matrix: np.ndarray, classes: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, np.asarray(matrix)):
            writer.writerow([name, *[(f"{v:.4f}" if isinstance(v, float) else int(v)) for v in row.tolist()]])


def informative_top_k(metrics: dict) -> bool:
    """Top-k accuracy says something only while k is below the number of classes (else it is 1.0)."""
    return metrics.get("top_k") is not None and metrics["top_k"] < len(metrics.get("per_class", {}))


def summary_text(metrics: dict) -> str:
    """The evaluation as a small text table for the terminal."""
    top = f"top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}  " if informative_top_k(metrics) else ""
    views = (metrics.get("tta") or {}).get("views", 1)
    lines = [f"accuracy {metrics['accuracy']:.4f}  {top}"
             f"nll {metrics['nll']:.4f}  (n={metrics['count']}, split={metrics['split']}"
             + (f", {views} test-time views" if views > 1 else "") + ")"]
    width = max(5, *(len(c) for c in metrics["per_class"]))
    lines.append(f"{'class'.ljust(width)}  precision  recall     f1  support")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name.ljust(width)}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  "
                     f"{row['support']:7d}")
    lines.append(calibration_text(metrics.get("calibration")))
    if metrics.get("selective"):
        at = metrics["selective"]["accuracy_at_coverage"]
        lines.append("accuracy when answering only the most confident: "
                     + ", ".join(f"{float(c):.0%} -> {a:.4f}" for c, a in at.items())
                     + f" (AURC {metrics['selective']['aurc']:.4f})")
    if metrics.get("ood"):
        lines.append(ood_text(metrics["ood"]))
    if metrics.get("retrieval"):
        r = metrics["retrieval"]
        lines.append(retrieval_text(r["features"], r.get("embeddings")) + " [at training]")
    if metrics["most_confused"]:
        lines.append("most confused: " + "; ".join(
            f"{p['true']} -> {p['predicted']} ({p['count']})" for p in metrics["most_confused"][:5]))
    if metrics["skipped_count"]:
        lines.append(f"skipped {metrics['skipped_count']} file(s); see skipped.csv")
    lines.append(f"written to {Path(metrics['files']['metrics.json']).parent}")
    return "\n".join(lines)


def calibration_text(calibration: dict | None) -> str:
    """ECE/MCE/NLL/Brier before and after the temperature, in one line."""
    if not calibration:
        return "calibration: not measured"
    b, a = calibration["before"], calibration.get("after")
    if a is None:
        return (f"calibration: none (ECE {b['ece']:.4f}, MCE {b['mce']:.4f}, NLL {b['nll']:.4f}, "
                f"Brier {b['brier']:.4f})")
    return (f"calibration: temperature {calibration['temperature']:.3f}  ECE {b['ece']:.4f} -> {a['ece']:.4f}  "
            f"MCE {b['mce']:.4f} -> {a['mce']:.4f}  NLL {b['nll']:.4f} -> {a['nll']:.4f}  "
            f"Brier {b['brier']:.4f} -> {a['brier']:.4f}")
