"""The dataset doctor: label issues, duplicates, outliers and poor images, from cached features.

Everything works on features the cache already holds (computing only what is
missing), so a check of 10,000 images takes seconds, before any training. The
doctor only reports: doctor.json (every finding and its score), doctor.html
(thumbnails grouped by kind) and issues.csv, which the user edits and hands to
``tl-app train --exclude/--relabel``. It never moves or deletes a file.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from tl_app.core.config import Config
from tl_app.core.files import atomic_write_text
from tl_app.data.duplicates import components, near_pairs
from tl_app.data.manifest import Record
from tl_app.features.extract import extract_features
from tl_app.insight.confident_learning import label_issues, out_of_fold_probabilities, reduce_features
from tl_app.insight.doctor_page import write_page

DUPLICATE_COSINE = 0.97  # standardised features at least this similar: a feature-space near-duplicate
PHASH_CONFIRM_COSINE = 0.8  # a dHash match counts when the features agree this much (flat shapes share hashes)
DUPLICATE_NEIGHBOURS = 5
OUTLIER_NEIGHBOURS = 10  # more than a few: planted or real outliers often come in look-alike pairs
OUTLIER_Z = 5.0  # either k-NN score this many (scaled) median absolute deviations above its median: two
# detectors give two chances to a shape, so the bar is higher than one detector's usual 3.5
TINY_SIDE = 32
EXTREME_ASPECT = 4.0
FLAT_STD = 3.0  # grey levels: a thumbnail this flat is blank
ISSUE_COLUMNS = ["path", "relpath", "kind", "action", "given_label", "suggested_label", "score", "split",
                 "group", "detail"]


def pairwise_neighbours(x: np.ndarray, k: int, metric: str = "cosine",
                        block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows: indices and cosine similarities (``x`` unit rows, largest
    first) or Euclidean distances (smallest first). Blocked: O(N * block) memory."""
    n = len(x)
    k = max(1, min(k, n - 1))
    idx = np.zeros((n, k), np.int64)
    values = np.zeros((n, k), np.float32)
    squares = (x * x).sum(axis=1)
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = x[start:stop] @ x.T
        if metric == "euclidean":  # as a negated distance, so that larger is nearer in both cases
            s = -np.sqrt(np.maximum(squares[start:stop, None] + squares[None, :] - 2 * s, 0))
        s[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-vals, axis=1)
        idx[start:stop] = np.take_along_axis(part, order, axis=1)
        values[start:stop] = np.take_along_axis(vals, order, axis=1)
    return idx, (-values if metric == "euclidean" else values)


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def duplicate_groups(records: list[Record], unit: np.ndarray, neighbour_idx: np.ndarray,
                     neighbour_sim: np.ndarray, cosine: float = DUPLICATE_COSINE) -> list[dict]:
    """Groups linked by identical bytes, a dHash match the features confirm, or a feature-space
    neighbour above ``cosine`` (``unit``: unit-length feature rows)."""
    pairs: list[tuple[str, str, int]] = []
    how: dict[tuple[int, int], set] = {}

    def link(a: int, b: int, kind: str) -> None:
        a, b = min(a, b), max(a, b)
        pairs.append((f"{a:09d}", f"{b:09d}", 0))
        how.setdefault((a, b), set()).add(kind)

    by_sha: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_sha.setdefault(r.sha256, []).append(i)
    for members in by_sha.values():
        for other in members[1:]:
            link(members[0], other, "exact")
    for a, b, _ in near_pairs({f"{i:09d}": r.dhash for i, r in enumerate(records)}):
        if float(unit[int(a)] @ unit[int(b)]) >= PHASH_CONFIRM_COSINE:
            link(int(a), int(b), "phash")
    for i in range(len(records)):
        for j, s in zip(neighbour_idx[i], neighbour_sim[i]):
            if s >= cosine:
                link(i, int(j), "features")
    roots = components(pairs)
    grouped: dict[str, list[int]] = {}
    for key, root in roots.items():
        grouped.setdefault(root, []).append(int(key))
    groups = []
    for members in grouped.values():
        members.sort()
        kinds = sorted({k for (a, b), ks in how.items() if a in members for k in ks})
        labels = sorted({records[i].label for i in members})
        splits = sorted({records[i].split for i in members})
        sims = unit[members] @ unit[members].T
        best = float(sims[np.triu_indices(len(members), 1)].min())  # the least similar pair
        groups.append({"members": members, "found_by": kinds, "labels": labels, "splits": splits,
                       "crosses_splits": len(splits) > 1, "label_conflict": len(labels) > 1,
                       "score": 1.0 if "exact" in kinds else round(best, 4)})
    groups.sort(key=lambda g: (-g["label_conflict"], -g["crosses_splits"], -g["score"], g["members"][0]))
    return groups


def robust_z(values: np.ndarray) -> np.ndarray:
    """How many (scaled) median absolute deviations each value lies above the median."""
    median = np.median(values)
    mad = np.median(np.abs(values - median)) + 1e-9
    return (values - median) / (1.4826 * mad)


def outlier_scores(distances: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """The larger of two robust z-scores: an image is an outlier when either detector finds it far away.

    - the mean Euclidean distance to the k nearest images (reduced features): catches images whose
      features differ in length (noise, blank frames), and works with random weights;
    - 1 - cosine similarity to the k-th nearest image (raw features): catches images whose features point
      elsewhere, which is what pretrained features do for junk; the k-th neighbour, not the first, so a
      group of up to k - 1 look-alike outliers cannot vouch for each other.

    On the planted sample (bench/bench_doctor.py) the first alone found 4 of 10 outliers with hed-vgg16
    features and 8 of 10 with random weights; the second alone 10 of 10 and 0 of 10; together 10 and 8.
    """
    return np.maximum(robust_z(distances.mean(axis=1)), robust_z(1.0 - similarities[:, -1]))


def flagged_outliers(scores: np.ndarray, threshold: float = OUTLIER_Z) -> np.ndarray:
    return np.flatnonzero(scores > threshold)


# libjpeg's luminance table at quality 50 (Annex K of the JPEG standard); a file's own table, divided by this
# one, gives the scale its encoder used, hence the quality setting (as ImageMagick's identify estimates it)
JPEG_LUMA_50 = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64)
LOW_JPEG_QUALITY = 30  # below this, 8x8 blocks and ringing are plainly visible


def jpeg_quality(image) -> float | None:
    """The quality (1-100) a JPEG was saved with, from its luminance quantisation table; None otherwise."""
    tables = getattr(image, "quantization", None) if image.format == "JPEG" else None
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    table = np.asarray(tables[0], np.float64)
    kept = table < 255  # entries clipped at 255 by a low quality would understate the scale
    if not kept.any():
        return 1.0
    scale = 100.0 * table[kept].sum() / JPEG_LUMA_50[kept].sum()
    return float(np.clip(5000.0 / scale if scale > 100 else (200.0 - scale) / 2.0, 1, 100))


def image_statistics(path: str) -> dict:
    """Grey-level spread of a 64-px thumbnail (cheap: JPEG draft mode decodes at 1/8 scale), and a JPEG's
    quality setting (read from its header)."""
    try:
        with Image.open(path) as image:
            quality = jpeg_quality(image)
            image.draft("L", (64, 64))
            small = image.convert("L")
            small.thumbnail((64, 64))
            pixels = np.asarray(small, np.float32)
        return {"std": float(pixels.std()), "mean": float(pixels.mean()), "jpeg_quality": quality}
    except Exception:  # noqa: BLE001 - a file that changed since the scan is judged on its header only
        return {"std": float("nan"), "mean": float("nan"), "jpeg_quality": None}


def quality_findings(records: list[Record]) -> list[dict]:
    """Tiny, near-constant (blank, black, white), extremely elongated and heavily compressed images."""
    found = []
    for i, r in enumerate(records):
        problems = []
        side = min(r.width, r.height)
        if side < TINY_SIDE:
            problems.append(("tiny", f"{r.width}x{r.height} px (under {TINY_SIDE} px)", 1.0 - side / TINY_SIDE))
        aspect = max(r.width, r.height) / max(1, side)
        if aspect >= EXTREME_ASPECT:
            problems.append(("aspect", f"aspect ratio {aspect:.1f}:1", min(1.0, aspect / 10)))
        stats = image_statistics(r.path)
        if stats["std"] == stats["std"] and stats["std"] < FLAT_STD:
            tone = "black" if stats["mean"] < 30 else "white" if stats["mean"] > 225 else "uniform"
            problems.append(("blank", f"near-constant ({tone}, grey-level spread {stats['std']:.1f})",
                             1.0 - stats["std"] / FLAT_STD))
        quality = stats.get("jpeg_quality")
        if quality is not None and quality < LOW_JPEG_QUALITY:
            problems.append(("jpeg", f"heavy JPEG compression (saved at quality ~{quality:.0f}: block artefacts)",
                             1.0 - quality / LOW_JPEG_QUALITY))
        for kind, detail, score in problems:
            found.append({"row": i, "problem": kind, "detail": detail, "score": round(float(score), 4)})
    return sorted(found, key=lambda f: -f["score"])


def diagnose(features: np.ndarray, records: list[Record], classes: list[str], folds: int = 5,
             seed: int = 0, cosine: float = DUPLICATE_COSINE) -> dict:
    """Every finding, from features aligned with records (no file is changed).

    BLAS runs on one thread here: these are small factorisations, and OpenBLAS
    threads spinning on a shared 2-core machine made a 2,000 x 138 QR take 7 s
    instead of 0.09 s (measured).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _diagnose(features, records, classes, folds, seed, cosine)


def _diagnose(features: np.ndarray, records: list[Record], classes: list[str], folds: int, seed: int,
              cosine: float) -> dict:
    timings = {}
    started = time.perf_counter()
    labels = np.array([r.label_index for r in records], np.int64)
    reduced = reduce_features(features, seed=seed)
    probs = out_of_fold_probabilities(features, labels, len(classes), folds=folds, seed=seed, reduced=reduced)
    issues = label_issues(probs, labels)
    timings["labels_s"] = round(time.perf_counter() - started, 3)

    started = time.perf_counter()
    unit = unit_rows(reduce_features(features, seed=seed, standardise=True))
    idx, sims = pairwise_neighbours(unit, DUPLICATE_NEIGHBOURS)
    groups = duplicate_groups(records, unit, idx, sims, cosine)
    timings["duplicates_s"] = round(time.perf_counter() - started, 3)

    started = time.perf_counter()
    near, distances = pairwise_neighbours(reduced, OUTLIER_NEIGHBOURS, metric="euclidean")
    _, similarities = pairwise_neighbours(unit_rows(features), OUTLIER_NEIGHBOURS)
    scores = outlier_scores(distances, similarities)
    outliers = [{"row": int(i), "score": round(float(scores[i]), 4),
                 "nearest_class": classes[int(labels[near[i, 0]])]} for i in flagged_outliers(scores)]
    outliers.sort(key=lambda f: -f["score"])
    quality = quality_findings(records)
    timings["outliers_quality_s"] = round(time.perf_counter() - started, 3)
    return {
        "labels": [{**f, "given_label": classes[f["given"]], "suggested_label": classes[f["suggested"]]}
                   for f in issues],
        "duplicates": groups, "outliers": outliers, "quality": quality,
        "outlier_scores": scores, "probabilities": probs, "timings": timings,
    }


def issue_rows(findings: dict, records: list[Record]) -> list[dict]:
    """One editable row per flagged file, with a proposed action (exclude | relabel | keep)."""
    rows = []

    def row(i: int, kind: str, action: str, score: float, suggested: str = "", group: str = "", detail: str = ""):
        r = records[i]
        rows.append({"path": r.path, "relpath": r.relpath, "kind": kind, "action": action, "given_label": r.label,
                     "suggested_label": suggested, "score": f"{score:.4f}", "split": r.split, "group": group,
                     "detail": detail})

    for f in findings["labels"]:
        row(f["row"], "label", "relabel", f["score"], f["suggested_label"],
            detail=f"p(given)={f['p_given']:.2f} p(suggested)={f['p_suggested']:.2f}")
    for n, g in enumerate(findings["duplicates"], 1):
        notes = ", ".join(x for x in ("crosses splits" if g["crosses_splits"] else "",
                                      "labels differ" if g["label_conflict"] else "") if x)
        for position, i in enumerate(g["members"]):
            row(i, "duplicate", "keep" if position == 0 else "exclude", g["score"], group=f"dup-{n}",
                detail=f"found by {'+'.join(g['found_by'])}" + (f"; {notes}" if notes else ""))
    for f in findings["outliers"]:
        row(f["row"], "outlier", "exclude", f["score"], detail=f"nearest class {f['nearest_class']}")
    for f in findings["quality"]:
        row(f["row"], f"quality:{f['problem']}", "exclude", f["score"], detail=f["detail"])
    return rows


def write_issues_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ISSUE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


def report_dict(findings: dict, records: list[Record], classes: list[str], stats: dict) -> dict:
    """doctor.json: every finding with its score, files named by path."""
    def who(i: int) -> dict:
        r = records[i]
        return {"path": r.path, "relpath": r.relpath, "label": r.label, "split": r.split}

    return {
        "classes": classes, "images": len(records), "stats": stats,
        "counts": {"labels": len(findings["labels"]), "duplicate_groups": len(findings["duplicates"]),
                   "duplicate_groups_crossing_splits": sum(g["crosses_splits"] for g in findings["duplicates"]),
                   "duplicate_groups_with_label_conflict": sum(g["label_conflict"] for g in findings["duplicates"]),
                   "outliers": len(findings["outliers"]), "quality": len(findings["quality"])},
        "labels": [{**who(f["row"]), **{k: f[k] for k in ("given_label", "suggested_label", "score", "p_given",
                                                           "p_suggested")}} for f in findings["labels"]],
        "duplicates": [{**{k: g[k] for k in ("found_by", "labels", "splits", "crosses_splits", "label_conflict",
                                             "score")}, "members": [who(i) for i in g["members"]]}
                       for g in findings["duplicates"]],
        "outliers": [{**who(f["row"]), "score": f["score"], "nearest_class": f["nearest_class"]}
                     for f in findings["outliers"]],
        "quality": [{**who(f["row"]), "problem": f["problem"], "detail": f["detail"], "score": f["score"]}
                    for f in findings["quality"]],
    }


def doctor(config: Config, out: str | Path | None = None, echo: Callable | None = print, folds: int = 5,
           cosine: float = DUPLICATE_COSINE, page: bool = True) -> dict:
    """Check the configured dataset; write doctor.json, issues.csv and doctor.html under ``out``."""
    out = Path(out) if out else Path(config.train.runs_dir) / "doctor"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    feature_set = extract_features(config, echo=echo)
    extracted = time.perf_counter() - started
    records, classes = feature_set.records, feature_set.classes
    findings = diagnose(np.asarray(feature_set.features), records, classes, folds=folds,
                        seed=config.data.split_seed, cosine=cosine)
    stats = {"features_s": round(extracted, 3), **findings["timings"],
             "computed": feature_set.stats.get("computed"), "cached": feature_set.stats.get("cached"),
             "backbone": config.backbone.name, "weights": config.backbone.weights}
    report = report_dict(findings, records, classes, stats)
    rows = issue_rows(findings, records)
    paths = {"json": out / "doctor.json", "csv": out / "issues.csv"}
    write_issues_csv(paths["csv"], rows)
    if page:
        paths["html"] = write_page(out / "doctor.html", report, config.data.root)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_text(paths["json"], json.dumps(report, indent=2))
    report["outputs"] = {k: str(v) for k, v in paths.items()}
    report["findings"] = findings
    if echo:
        c = report["counts"]
        echo(f"doctor: {len(records)} images; {c['labels']} label issue(s), {c['duplicate_groups']} duplicate "
             f"group(s) ({c['duplicate_groups_crossing_splits']} across splits, "
             f"{c['duplicate_groups_with_label_conflict']} with different labels), {c['outliers']} outlier(s), "
             f"{c['quality']} quality problem(s) ({stats['seconds']:.1f}s)")
        echo(f"wrote {paths['json']}, {paths['csv']}" + (f", {paths['html']}" if page else ""))
    return report
