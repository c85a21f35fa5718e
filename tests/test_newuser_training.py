"""What a new user trips over when training (issue 21): one-class folders, late argument errors,
unreadable logs, half-made run folders, and no way to list or compare runs. All through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

TINY = ["--backbone", "vgg16", "--weights", "none", "--input-size", "32", "--batch-size", "8"]


def write_folder(root: Path, classes: dict[str, int], size: int = 40) -> Path:
    """Real JPEGs: one colour per class, with a little noise."""
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            colour = ((c * 90 + i * 7) % 256, (c * 50) % 256, (255 - c * 80 - i * 5) % 256)
            Image.new("RGB", (size, size), colour).save(root / name / f"{i}.jpg")
    return root


def tl_app(*args, cwd=None, stdout=None, env=None):
    """The installed command as a user runs it (stdout to a file or a pipe, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "tl_app", *map(str, args)], cwd=cwd, stdout=stdout or subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, timeout=600)


# ---- 1. one class ------------------------------------------------------------------------
def test_train_refuses_a_folder_with_one_class_before_any_work(cli, tmp_path):
    data = write_folder(tmp_path / "onecls", {"cats": 6})
    result = cli("train", data, *TINY, "--runs-dir", tmp_path / "runs", "--set", f"features.cache_dir='{tmp_path}'")
    assert result.exit_code == 2
    assert "at least two classes" in result.output and "'cats' (6 images)" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # no run folder, no training


def test_inspect_warns_about_one_class_and_names_the_layout(cli, tmp_path):
    data = write_folder(tmp_path / "onecls", {"cats": 6})
    result = cli("datasets", "inspect", data)
    assert result.exit_code == 0
    assert "warning: a classifier needs at least two classes" in result.output
    assert "layout: class folders" in result.output
    split = write_folder(tmp_path / "split" / "train", {"a": 3, "b": 3}).parent
    write_folder(split / "val", {"a": 1, "b": 1})
    result = cli("datasets", "inspect", split)
    assert "layout: split folders" in result.output and "at least two classes" not in result.output


def test_loose_images_without_class_folders_say_so(cli, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 80, 0, 0)).save(loose / f"{i}.jpg")
    result = cli("datasets", "inspect", loose)
    assert result.exit_code == 2
    assert "2 file(s) lie directly in" in result.output and "no class folders" in result.output
    assert "all skipped" not in result.output


# ---- 2. argument errors before TensorFlow ------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["train", "x", "--input-size", "7"], "must be at least 32 pixels"),
    (["train", "nosuch-folder"], "does not exist or is not a folder"),
    (["extract", "nosuch-folder"], "does not exist or is not a folder"),
    (["train", "x", "--lr", "-1"], "train.learning_rate = -1.0 is out of range"),
    (["datasets", "inspect", "nosuch-folder", "--val-fraction", "2"], "data.val_fraction must be in [0, 1)"),
])
def test_argument_errors_answer_without_loading_tensorflow(tmp_path, args, message):
    code = ("import sys\nfrom tl_app.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n"
            "    print('exit', exit.code, 'tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert message in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "exit 2 False"


# ---- 3 and 4. plain logs; failed runs marked ------------------------------------------------------
ANSI = re.compile(r"\x1b\[|\r")


def test_finetune_log_written_to_a_file_is_plain_with_one_line_per_epoch(tmp_path):
    data = write_folder(tmp_path / "data", {"red": 8, "blue": 8})
    log = tmp_path / "train.log"
    with log.open("w") as out:
        result = tl_app("train", data, "--strategy", "finetune", *TINY, "--epochs", "2", "--finetune-epochs", "1",
                        "--unfreeze-blocks", "1", "--runs-dir", tmp_path / "runs", "--name", "ft", stdout=out,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert not ANSI.search(text), repr(text[:500])
    epochs = [line for line in text.splitlines() if re.match(r"phase \d epoch \d+/\d+: loss ", line)]
    assert [line.split(":")[0] for line in epochs] == ["phase 1 epoch 1/2", "phase 1 epoch 2/2", "phase 2 epoch 1/1"]
    assert "step" not in text  # no Keras progress bar lines ("4/4 - 1s - 250ms/step")


def test_a_train_that_fails_is_marked_failed_with_its_reason_and_listed(cli, tmp_path):
    data = write_folder(tmp_path / "data", {"red": 4, "blue": 4})
    bad = tmp_path / "broken.weights.h5"
    bad.write_bytes(os.urandom(4096))
    result = cli("train", data, "--strategy", "finetune", "--backbone", "vgg16", "--weights", bad,
                 "--input-size", "32", "--runs-dir", tmp_path / "runs", "--set", f"features.cache_dir='{tmp_path}'")
    assert result.exit_code == 2 and "does not fit the vgg16 backbone" in result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "does not fit the vgg16 backbone" in info["error"]
    listing = cli("runs", "list", "--runs-dir", tmp_path / "runs")
    assert re.search(rf"{run_dir.name}\s+failed\s+finetune\s+vgg16", listing.output)
    assert "failed: " in listing.output and "does not fit" in listing.output
    rows = json.loads(cli("runs", "list", "--runs-dir", tmp_path / "runs", "--json").output)
    assert [r["status"] for r in rows] == ["failed"]


# ---- 5. runs list / compare ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from tl_app.cli import main

    base = tmp_path_factory.mktemp("two-runs")
    data = write_folder(base / "data", {"red": 6, "blue": 6})
    runner = CliRunner()
    for name, epochs in (("short", "1"), ("long", "3")):
        result = runner.invoke(main, ["train", str(data), "--strategy", "bottleneck", *TINY, "--epochs", epochs,
                                      "--runs-dir", str(base / "runs"), "--name", name,
                                      "--set", f"features.cache_dir='{base / 'cache'}'"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return base / "runs"


def test_runs_list_shows_every_run_with_status_metrics_and_size(cli, two_runs):
    result = cli("runs", "list", "--runs-dir", two_runs)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "status", "strategy", "backbone", "weights", "val_accuracy", "epochs", "age",
                                "size"]
    assert re.match(r"short\s+finished\s+bottleneck\s+vgg16\s+none\s+\d\.\d{4}\s+1\s+\d+[smhd]\s+[\d.]+ [KM]B", lines[1])
    assert re.match(r"long\s+finished\s+bottleneck\s+vgg16\s+none\s+\d\.\d{4}\s+[1-3]\s", lines[2])
    rows = json.loads(cli("runs", "list", "--runs-dir", two_runs, "--json").output)
    assert [r["name"] for r in rows] == ["short", "long"] and all(r["size_bytes"] > 0 for r in rows)


def test_runs_compare_shows_differences_metrics_and_curves(cli, two_runs, tmp_path):
    page = tmp_path / "compare.html"
    result = cli("runs", "compare", two_runs / "short", two_runs / "long", "--out", page)
    assert result.exit_code == 0, result.output
    assert re.search(r"train\.epochs\s+1\s+3", result.output)  # the one setting that differs
    assert "data.root" not in result.output  # identical settings are left out
    assert re.search(r"val_accuracy\s+\d\.\d{4}\s+\d\.\d{4}", result.output)
    text = page.read_text()
    assert "<td>train.epochs</td><td>1</td><td>3</td>" in text
    assert text.count("data:image/png;base64,") == 1 and "short" in text and "long" in text
    alone = cli("runs", "compare", two_runs / "short")
    assert alone.exit_code == 2 and "two or more run folders" in alone.output
