"""Issue 13, items 1, 2 and 5: what the scan counts, names and reports, on real folders.

A symlink to the dataset root inside a class folder, an empty class folder, a
class folder of only bad files, and exact and near-duplicate photos across
user-given and tl-app-made splits; `tl-app datasets inspect --json` reports
each exactly once and found = used + skipped.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image

from tl_app.core.config import DataConfig
from tl_app.data.scan import scan


def smooth_photo(seed: int, size=(64, 48)) -> Image.Image:
    """Low-frequency colour blobs: like a photo, its perceptual hash survives resizing and re-encoding."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.BICUBIC)


def write(folder, name, image, **options) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, **options)


def class_folder_dataset(root):
    for k in range(4):
        write(root / "ants", f"ant_{k}.png", smooth_photo(10 + k))
        write(root / "bees", f"bee_{k}.jpg", smooth_photo(20 + k), quality=92)
    for k in range(2):
        write(root / "wasps", f"wasp_{k}.png", smooth_photo(30 + k))
    os.symlink("..", root / "wasps" / "loop")  # wasps/loop -> the dataset root
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "bad.jpg").write_bytes(b"not an image at all")
    return root


# ---- item 1: the link to the root --------------------------------------------------------
def test_a_link_to_the_root_relabels_nothing_and_counts_nothing_twice(tmp_path):
    manifest = scan(class_folder_dataset(tmp_path / "data"), DataConfig(val_fraction=0.25))
    assert len(manifest.records) == 10
    assert len({os.path.realpath(r.path) for r in manifest.records}) == 10  # no image twice
    for record in manifest.records:
        assert record.relpath.split("/")[0] == record.label and "loop" not in record.relpath  # none relabelled
    assert manifest.files_found == len(manifest.records) + len(manifest.skipped) == 12
    loops = [s for s in manifest.skipped if s.reason.startswith("symlink loop")]
    assert [os.path.basename(s.path) for s in loops] == ["loop"]
    assert sum(1 for s in manifest.skipped if "bad.jpg" in s.path) == 1  # the bad file reported once


# ---- item 2: empty class folders are named ---------------------------------------------------
def test_empty_and_all_bad_class_folders_are_named_with_the_reason(tmp_path):
    manifest = scan(class_folder_dataset(tmp_path / "data"), DataConfig(val_fraction=0.25))
    empty = {e["folder"]: e["reason"] for e in manifest.empty_classes}
    assert empty == {"empty": "no files", "broken": "1 file(s) skipped: 1 not an image (unknown file type)"}
    assert sum("'empty'" in w for w in manifest.warnings) == 1
    assert sum("'broken'" in w for w in manifest.warnings) == 1


def test_inspect_json_reports_each_problem_exactly_once(tmp_path, cli):
    root = class_folder_dataset(tmp_path / "data")
    original = smooth_photo(40, (96, 72))
    write(root / "ants", "ant_orig.png", original)
    write(root / "ants", "ant_resized.jpg", original.resize((64, 48), Image.BILINEAR), quality=85)
    result = cli("datasets", "inspect", str(root), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    totals = doc["totals"]
    assert totals["found"] == totals["used"] + totals["skipped"] == 14
    assert [s["reason"].split(":")[0] for s in doc["skipped"]].count("symlink loop") == 1
    assert sorted(e["folder"] for e in doc["empty_classes"]) == ["broken", "empty"]
    assert sum("'empty'" in w for w in doc["warnings"]) == 1
    assert doc["duplicates"] == []  # tl-app splits keep the near-duplicate pair together
    console = cli("datasets", "inspect", str(root))
    assert console.output.count("'empty'") == 1 and console.output.count("'broken'") == 1


# ---- item 5: leakage across splits ---------------------------------------------------------------
def split_folder_dataset(root):
    for split, seeds in (("train", range(50, 56)), ("val", range(60, 63))):
        for label in ("ants", "bees"):
            for k in seeds:
                write(root / split / label, f"{label}_{k}.png", smooth_photo(k + (100 if label == "bees" else 0)))
    shutil.copy(root / "train" / "ants" / "ants_50.png", root / "val" / "ants" / "copy_of_50.png")
    near = smooth_photo(51).resize((80, 60), Image.BICUBIC)
    write(root / "val" / "ants", "resized_51.jpg", near, quality=85)
    return root


def test_exact_and_near_duplicates_across_given_splits_are_reported(tmp_path, cli):
    root = split_folder_dataset(tmp_path / "data")
    manifest = scan(root)
    pairs = {(d["kind"], d["a"], d["b"]) for d in manifest.duplicates}
    assert ("exact", "train/ants/ants_50.png", "val/ants/copy_of_50.png") in pairs
    assert ("near", "train/ants/ants_51.png", "val/ants/resized_51.jpg") in pairs
    assert len(manifest.duplicates) == 2, manifest.duplicates  # the copy is not also a 'near' pair
    assert sum(w.startswith("leakage: 1 exact and 1 near-duplicate") for w in manifest.warnings) == 1
    doc = json.loads(cli("datasets", "inspect", str(root), "--json").output)
    assert len(doc["duplicates"]) == 2


def test_tl_app_splits_keep_a_near_duplicate_group_in_one_split(tmp_path):
    root = tmp_path / "data"
    for k in range(20):
        original = smooth_photo(200 + k, (96, 72))
        write(root / "a", f"img_{k:02d}.png", original)
        write(root / "a", f"small_{k:02d}.jpg", original.resize((64, 48), Image.BILINEAR), quality=85)
        write(root / "b", f"img_{k:02d}.png", smooth_photo(300 + k))
    manifest = scan(root, DataConfig(val_fraction=0.3, test_fraction=0.2))
    split = {r.relpath: r.split for r in manifest.records}
    assert all(split[f"a/img_{k:02d}.png"] == split[f"a/small_{k:02d}.jpg"] for k in range(20))
    assert len(set(split.values())) == 3 and manifest.duplicates == []
