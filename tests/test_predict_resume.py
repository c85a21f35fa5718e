"""Issue 17: `tl-app predict` flushes its rows as each batch finishes, and `--resume` answers only the rest.

A real run (a VGG16 run directory at 32 px, random weights) is killed in a
subprocess once its first rows reach the file; `--resume` then completes the
file, and every image has exactly one row, equal to a clean run's.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from factories import make_run_dir, small_config  # noqa: E402

IMAGES = 60


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_dir):
    config = small_config(tmp_path_factory.mktemp("resume-run"), sample_dir, backbone="vgg16")
    return make_run_dir(config)


def write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(17)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"img_{k:03d}.png"
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def data_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_a_killed_predict_keeps_its_rows_and_resume_answers_each_image_once(run_dir, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: the whole file stays under one write buffer (8 KiB), so rows
    folder = Path("photos")      # seen before the end were flushed per batch, not spilled by a full buffer
    images = write_images(folder, IMAGES)
    broken = folder / "000_copying.png"  # still being copied during the first run: an error row, retried later
    broken.write_bytes(b"")
    out = Path("preds.csv")

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [sys.executable, "-m", "tl_app", "predict", str(run_dir), str(folder), "--out", str(out),
            "--batch-size", "1", "--quiet"]
    process = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while complete_lines(out) < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        still_running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert still_running, process.stderr.read().decode()[-2000:]
    kept = data_rows(out)
    # rows reached the file while the run was going, not only when it closed the file
    assert 3 <= len(kept) < IMAGES + 1, "the killed run had written every row: rows are not flushed per batch"
    assert kept[0]["path"] == str(broken) and kept[0]["error"] == "empty file (0 bytes)"

    with open(out, "a", newline="") as handle:  # a kill in the middle of a write: half a row, no newline
        handle.write(f"{images[40]},circles,0.3")
    broken.write_bytes(images[0].read_bytes())  # the copy finished

    resumed = cli("predict", run_dir, folder, "--out", out, "--batch-size", "4", "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    skipped = len(kept) - 1  # the error row is predicted again
    assert f"skipped {skipped} already in it" in resumed.output
    assert f"predicted {IMAGES + 1 - skipped} image(s)" in resumed.output

    clean_out = Path("clean.csv")
    clean = cli("predict", run_dir, folder, "--out", clean_out, "--batch-size", "4", "--quiet")
    assert clean.exit_code == 0, clean.output
    rows, reference = data_rows(out), data_rows(clean_out)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in reference)  # each image exactly once
    assert len(rows) == IMAGES + 1 and not any(r["error"] for r in rows)
    assert len(clean_out.read_bytes()) < 8192  # (the premise of the flush check above)
    assert list(rows[0]) == list(reference[0])  # the same columns
    by_path = {r["path"]: r for r in reference}
    for row in rows:
        expected = by_path[row["path"]]
        for i in (1, 2, 3):
            assert row[f"label_{i}"] == expected[f"label_{i}"]
            assert float(row[f"probability_{i}"]) == pytest.approx(float(expected[f"probability_{i}"]), rel=1e-5)

    # nothing left to do: the model is not even loaded (a copy whose model.keras is garbage still answers)
    unloadable = tmp_path / "unloadable-run"
    shutil.copytree(run_dir, unloadable)
    (unloadable / "model.keras").write_bytes(b"not a model")
    again = cli("predict", unloadable, folder, "--out", out, "--quiet", "--resume", "--json")
    assert again.exit_code == 0, again.output
    assert '"skipped": 61' in again.output and '"predicted": 0' in again.output
    assert data_rows(out) == rows  # the file is unchanged
    with pytest.raises(Exception):  # (the copy really cannot be loaded)
        cli("predict", unloadable, folder, "--out", tmp_path / "other.csv", "--quiet")


def test_resume_refuses_a_file_with_other_columns_and_needs_an_out_file(run_dir, tmp_path, cli):
    folder = tmp_path / "photos"
    write_images(folder, 3)
    out = tmp_path / "preds.csv"
    assert cli("predict", run_dir, folder, "--out", out, "--top-k", "2", "--quiet").exit_code == 0
    before = out.read_bytes()

    other = cli("predict", run_dir, folder, "--out", out, "--top-k", "3", "--quiet", "--resume")
    assert other.exit_code != 0 and "Traceback" not in other.output
    assert "--resume" in other.output and "label_2,probability_2,error" in other.output
    assert "--top-k" in other.output, other.output
    assert out.read_bytes() == before  # refused before touching the file

    jsonl = tmp_path / "preds.jsonl"
    assert cli("predict", run_dir, folder, "--out", jsonl, "--top-k", "2", "--quiet").exit_code == 0
    other = cli("predict", run_dir, folder, "--out", jsonl, "--top-k", "1", "--quiet", "--resume")
    assert other.exit_code != 0 and "2 classes" in other.output and "1 classes" in other.output
    # JSON lines resume too: the first row kept, the second's half line dropped, the rest predicted
    complete = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text(complete[0] + complete[1][:25])
    resumed = cli("predict", run_dir, folder, "--out", jsonl, "--top-k", "2", "--quiet", "--resume")
    assert resumed.exit_code == 0 and "skipped 1 already in it" in resumed.output, resumed.output
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(json.loads(line)["path"] for line in complete)
    assert rows[0] == json.loads(complete[0]) and all(len(r["predictions"]) == 2 for r in rows)

    no_out = cli("predict", run_dir, folder, "--resume")
    assert no_out.exit_code != 0 and "--out" in no_out.output and "Traceback" not in no_out.output
