"""tl-app datasets doctor: confident learning, duplicates, outliers, quality, its outputs and page,
and train --exclude/--relabel applied to a run's manifest. Real files, a real (random-weight) backbone."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_app.core.errors import DataError
from tl_app.insight.confident_learning import (confident_classes, label_issues, out_of_fold_probabilities,
                                               per_class_thresholds)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_thresholds_and_candidates_follow_northcutt():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9],  # row 2: labelled 0, confidently 1
                      [0.3, 0.7], [0.2, 0.8], [0.5, 0.5]])  # row 5: passes neither threshold
    thresholds = per_class_thresholds(probs, labels)
    assert thresholds == pytest.approx([0.6, (0.7 + 0.8 + 0.5) / 3])
    assert confident_classes(probs, thresholds).tolist() == [0, 0, 1, 1, 1, -1]
    issues = label_issues(probs, labels)
    assert [(f["row"], f["given"], f["suggested"]) for f in issues] == [(2, 0, 1)]
    assert issues[0]["score"] == pytest.approx(0.8)


def test_out_of_fold_heads_rank_flipped_labels_first():
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(3), 40)
    features = np.eye(3)[true] * 4 + rng.normal(0, 1, (120, 3))
    features = np.hstack([features, rng.normal(0, 1, (120, 20))]).astype(np.float32)
    given = true.copy()
    flipped = rng.choice(120, 8, replace=False)
    given[flipped] = (true[flipped] + 1) % 3
    probs = out_of_fold_probabilities(features, given, 3, folds=5)
    issues = label_issues(probs, given)
    top = {f["row"] for f in issues[:8]}
    assert len(top & set(flipped.tolist())) >= 6  # chance: 8 * 8/120 = 0.53
    assert all(f["suggested"] == true[f["row"]] for f in issues[:8] if f["row"] in set(flipped.tolist()))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, sample_dir):
    """The sample in split folders plus planted problems: an exact copy across splits with another
    label, a resized copy, a black frame, a tiny image, a 6:1 strip and a JPEG saved at quality 8."""
    root = tmp_path_factory.mktemp("doctor") / "data"
    for path in sorted(sample_dir.rglob("*.*")):
        split = "val" if int(re.findall(r"\d+", path.stem)[-1]) % 4 == 0 else "train"
        target = root / split / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    shutil.copy2(root / "train/circles/circles_001.png", root / "val/squares/copy_of_circle.png")
    with Image.open(root / "train/squares/squares_001.jpg") as image:
        image.resize((image.width * 3 // 4, image.height * 3 // 4)).save(root / "train/squares/resized.jpg",
                                                                          quality=70)
    Image.new("RGB", (80, 80), (0, 0, 0)).save(root / "train/triangles/black.png")
    with Image.open(root / "train/triangles/triangles_001.jpg") as image:
        image.save(root / "train/triangles/blocky.jpg", quality=8)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 20, 3), np.uint8)).save(
        root / "train/circles/tiny.png")
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 240, 3), np.uint8)).save(
        root / "train/circles/strip.png")
    return root


@pytest.fixture(scope="module")
def doctor_run(tmp_path_factory, dirty):
    from factories import small_config

    from tl_app.api import doctor

    base = tmp_path_factory.mktemp("doctor-out")
    config = small_config(base, dirty, backbone="vgg16")
    report = doctor(config, out=base / "out", echo=None, folds=3)
    return config, report, base / "out"


def test_duplicates_are_grouped_with_leakage_and_label_conflicts(doctor_run):
    _, report, _ = doctor_run
    groups = {frozenset(m["relpath"] for m in g["members"]): g for g in report["duplicates"]}
    exact = next(g for members, g in groups.items() if "val/squares/copy_of_circle.png" in members)
    assert "train/circles/circles_001.png" in {m["relpath"] for m in exact["members"]}
    assert "exact" in exact["found_by"] and exact["crosses_splits"] and exact["label_conflict"]
    resized = next(g for members, g in groups.items() if "train/squares/resized.jpg" in members)
    assert "train/squares/squares_001.jpg" in {m["relpath"] for m in resized["members"]}
    assert not resized["crosses_splits"] and not resized["label_conflict"]
    assert report["duplicates"][0]["label_conflict"]  # the certain conflict is listed first


def test_quality_problems_are_named(doctor_run):
    _, report, _ = doctor_run
    problems = {(q["relpath"], q["problem"]) for q in report["quality"]}
    assert ("train/triangles/black.png", "blank") in problems
    assert ("train/circles/tiny.png", "tiny") in problems
    assert ("train/circles/strip.png", "aspect") in problems
    assert ("train/triangles/blocky.jpg", "jpeg") in problems
    blocky = next(q for q in report["quality"] if q["relpath"] == "train/triangles/blocky.jpg")
    assert "quality ~8" in blocky["detail"]
    assert not any(relpath.startswith(("train/circles/circles", "val/")) for relpath, _ in problems)


def test_jpeg_quality_is_read_from_the_quantisation_table(tmp_path):
    from tl_app.insight.doctor import jpeg_quality

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for quality in (3, 8, 25, 50, 75, 90):
        Image.fromarray(pixels).save(tmp_path / f"q{quality}.jpg", quality=quality)
        with Image.open(tmp_path / f"q{quality}.jpg") as image:
            assert jpeg_quality(image) == pytest.approx(quality, abs=1.0)
    Image.fromarray(pixels).save(tmp_path / "lossless.png")
    with Image.open(tmp_path / "lossless.png") as image:
        assert jpeg_quality(image) is None


def test_outputs_hold_every_finding_and_an_editable_csv(doctor_run):
    _, report, out = doctor_run
    saved = json.loads((out / "doctor.json").read_text())
    assert saved["counts"] == report["counts"] and saved["images"] == 36 + 6
    assert all("score" in f for kind in ("labels", "outliers", "quality") for f in saved[kind])
    with open(out / "issues.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kinds = {r["kind"] for r in rows}
    assert {"duplicate", "quality:blank", "quality:tiny"} <= kinds
    assert all(r["action"] in ("exclude", "relabel", "keep") for r in rows)
    copies = [r for r in rows if r["kind"] == "duplicate" and r["relpath"] == "val/squares/copy_of_circle.png"]
    assert copies and copies[0]["action"] == "exclude"  # the first member of a group is kept, the rest excluded
    assert len(saved["outliers"]) == report["counts"]["outliers"]


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", f"--user-data-dir={user_data}", *args],
                          capture_output=True, text=True, timeout=120)


def test_page_renders_thumbnails_in_headless_chromium(doctor_run, tmp_path):
    assert CHROMIUM, "headless Chromium is missing: make test installs it (make browser)"
    _, report, out = doctor_run
    page = out / "doctor.html"
    text = page.read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert images and all(src.startswith("data:image/jpeg;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|file:|//)', text)
    dom = chromium("--dump-dom", page.as_uri(), user_data=tmp_path / "dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in ("summary", "labels", "duplicates", "outliers", "quality"):
        assert f'id="{section}"' in dom.stdout
    assert "copy_of_circle.png" in dom.stdout and "different labels" in dom.stdout
    shot = tmp_path / "doctor.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri(), user_data=tmp_path / "shot")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels[:50].reshape(-1, 3).mean(axis=0).max() < 90  # the dark header
    # the thumbnails were decoded and painted: many distinct colours, beyond the page's few flat ones
    assert len(np.unique(pixels.reshape(-1, 3)[::53], axis=0)) > 200


def test_a_rerun_reads_the_feature_cache(doctor_run):
    from tl_app.api import doctor

    config, _, out = doctor_run
    again = doctor(config, out=out, echo=None, folds=3, page=False)
    assert again["stats"]["computed"] == 0 and again["stats"]["cached"] == 42


def test_exclude_and_relabel_change_only_the_runs_manifest(doctor_run, tmp_path, dirty):
    from tl_app.data.manifest import Manifest
    from tl_app.training.runs import prepare_run

    config, _, out = doctor_run
    issues = tmp_path / "issues.csv"
    with open(out / "issues.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["kind"] != "label"]
    rows.append({**rows[0], "relpath": "train/circles/circles_002.jpg", "path": "", "kind": "label",
                 "action": "relabel", "suggested_label": "squares"})
    with open(issues, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = sorted(p.relative_to(dirty).as_posix() for p in dirty.rglob("*.*"))
    config.data.exclude = config.data.relabel = str(issues)
    prepared = prepare_run(config, tmp_path / "run", echo=None)
    manifest = Manifest.load(tmp_path / "run" / "manifest.json")
    used = {r.relpath: r for r in manifest.records}
    excluded = {r["relpath"] for r in rows if r["action"] == "exclude"}
    assert excluded and not excluded & set(used)
    assert used["train/circles/circles_002.jpg"].label == "squares"
    assert used["train/circles/circles_002.jpg"].label_index == manifest.classes.index("squares")
    assert any("excluded by issues.csv" in s.reason for s in manifest.skipped)
    edits = json.loads((tmp_path / "run" / "run.json").read_text())["data_edits"]
    assert len(edits["excluded"]) == len(excluded)
    assert edits["relabelled"] == [{"relpath": "train/circles/circles_002.jpg", "from": "circles", "to": "squares"}]
    assert prepared.manifest.records == manifest.records
    assert sorted(p.relative_to(dirty).as_posix() for p in dirty.rglob("*.*")) == before  # nothing moved


def test_bad_issue_files_are_explained(doctor_run, tmp_path):
    from tl_app.data.edits import apply_edits
    from tl_app.data.scan import scan

    config, _, _ = doctor_run
    manifest = scan(config.data.root)
    with pytest.raises(DataError, match="does not exist.*tl-app datasets doctor"):
        apply_edits(manifest, exclude=tmp_path / "missing.csv")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("relpath,action,suggested_label\ntrain/circles/circles_002.jpg,relabel,hexagons\n")
    with pytest.raises(DataError, match="classes are circles, squares, triangles"):
        apply_edits(manifest, relabel=wrong)
    plain = tmp_path / "plain.csv"
    plain.write_text("relpath\ntrain/circles/circles_002.jpg\nnot/there.jpg\n")
    count = len(manifest.records)
    done = apply_edits(manifest, exclude=plain)
    assert len(manifest.records) == count - 1 and done["not_found"] == ["not/there.jpg"]


def test_cli_doctor_json_and_missing_folder(doctor_run, cli, tmp_path):
    config, _, _ = doctor_run
    result = cli("datasets", "doctor", config.data.root, "--out", tmp_path / "o", "--backbone", "vgg16",
                 "--weights", "none", "--input-size", 32, "--cache-dir", config.features.cache_dir, "--folds", 3,
                 "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["images"] == 42 and summary["stats"]["computed"] == 0
    assert (tmp_path / "o" / "doctor.html").is_file()
    result = cli("datasets", "doctor", tmp_path / "nowhere")
    assert result.exit_code != 0 and "does not exist" in result.output


def test_outliers_that_come_in_look_alike_groups_are_flagged_on_pretrained_features(hed_vgg16_weights, tmp_path):
    """Out-of-class images planted in class folders, three noise images, three stripe textures and two
    identical checkerboards, so that they are each other's nearest neighbours (as real junk often is):
    every one is flagged, and few shapes with them.

    Features are hed-vgg16 (edge-tuned HED VGG16 convolutions, not ImageNet). The mean Euclidean k-NN
    distance alone flagged 3 of these 8 (measured): look-alike outliers hide each other, and their
    features do not stand out by length; the cosine distance to the 10th neighbour finds them."""
    from factories import small_config

    from tl_app.api import doctor
    from tl_app.data.sample import write_sample_dataset

    root = tmp_path / "data"
    write_sample_dataset(root, seed=1, counts={"circles": 30, "squares": 30, "triangles": 30})
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:96, 0:96]
    planted = []
    for n in range(8):
        if n < 3:
            pixels, kind = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), "noise"
        elif n < 6:
            on = ((np.sin(xx * rng.uniform(0.3, 0.9) + yy * rng.uniform(0.1, 0.5)) > 0) * 255).astype(np.uint8)
            pixels, kind = np.stack([on, 255 - on, on // 2], -1), "stripes"
        else:
            pixels, kind = np.stack([(((xx // 6 + yy // 6) % 2) * 200 + 30).astype(np.uint8)] * 3, -1), "checker"
        label = ("circles", "squares", "triangles")[n % 3]
        Image.fromarray(pixels).save(root / label / f"junk_{kind}_{n}.png")
        planted.append(f"{label}/junk_{kind}_{n}.png")
    config = small_config(tmp_path, root, backbone="vgg16")
    config.backbone.weights = "hed-vgg16"
    config.backbone.input_size = 64
    report = doctor(config, out=tmp_path / "out", echo=None, folds=3, page=False)
    flagged = [o["relpath"] for o in report["outliers"]]
    assert sorted(set(planted) - set(flagged)) == []  # every planted outlier
    assert len(flagged) <= len(planted) + 4, flagged  # and at most a few of the 90 shapes
