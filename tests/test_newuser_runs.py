"""Issue 21, items 6-10 through the CLI: extending a finished run, one labelled validation number,
non-zero exits when every input is unusable, and similar leaving the query out of its own neighbours."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from test_newuser_training import TINY, write_folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A fine-tuning run (1 + 1 epochs) as 'tl-app train' leaves it, and the output it printed."""
    from tl_app.cli import main

    base = tmp_path_factory.mktemp("finished")
    data = write_folder(base / "data", {"red": 6, "blue": 6})
    result = CliRunner().invoke(main, ["train", str(data), "--strategy", "finetune", *TINY, "--epochs", "1",
                                       "--finetune-epochs", "1", "--unfreeze-blocks", "1", "--name", "ft",
                                       "--runs-dir", str(base / "runs"),
                                       "--set", f"features.cache_dir='{base / 'cache'}'"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"run_dir": base / "runs" / "ft", "data": data, "output": result.output, "base": base}


def test_a_finished_run_can_be_trained_longer_and_records_the_continuation(cli, finished_run):
    run_dir = finished_run["run_dir"]
    again = cli("train", "--resume", run_dir)
    assert again.exit_code == 0 and "already finished training; nothing to resume" in again.output
    assert "--finetune-epochs N (more than 1)" in again.output
    lower = cli("train", "--resume", run_dir, "--finetune-epochs", "0")
    assert lower.exit_code == 2 and "can only raise" in lower.output
    phase1 = cli("train", "--resume", run_dir, "--epochs", "3")
    assert phase1.exit_code == 2 and "already in phase 2" in phase1.output
    other = cli("train", "--resume", run_dir, "--finetune-epochs", "2", "--lr", "0.1")
    assert other.exit_code == 2 and "Only --epochs and --finetune-epochs may be raised" in other.output

    result = cli("train", "--resume", run_dir, "--finetune-epochs", "2")
    assert result.exit_code == 0, result.output
    assert "resuming phase 2 at epoch 2 of 2" in result.output
    epochs = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert [(e["epoch"], e["phase"]) for e in epochs] == [(1, 1), (2, 2), (3, 2)]
    assert json.loads((run_dir / "config.json").read_text())["train"]["finetune_epochs"] == 2
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished"
    (continuation,) = info["continuations"]
    assert continuation["from"]["finetune_epochs"] == 1 and continuation["to"]["finetune_epochs"] == 2
    assert continuation["after_epochs"] == 2 and continuation["previous_status"] == "finished"


def test_the_diagnosis_labels_its_averaged_validation_number(finished_run):
    output = finished_run["output"]
    headline = re.search(r"fine-tuned: val_accuracy (\d\.\d{4})", output)
    assert headline, output
    line = next(line for line in output.splitlines() if line.startswith("diagnosis: "))
    assert re.search(r"validation \d\.\d\d(; | \()means of the last 2 epochs", line), line


# ---- 8. every input unusable: non-zero exit ---------------------------------------------------
def test_explain_exits_non_zero_when_no_input_is_an_image_and_counts_partial_skips(cli, finished_run, tmp_path):
    text = tmp_path / "README.md"
    text.write_text("# not an image\n")
    result = cli("explain", finished_run["run_dir"], text, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "None of the 1 images could be used" in result.output and "Traceback" not in result.output
    good = next((finished_run["data"] / "red").iterdir())
    partial = cli("explain", finished_run["run_dir"], good, text, "--out", tmp_path / "out")
    assert partial.exit_code == 0
    assert "1 of 2 images skipped" in partial.output


@pytest.fixture(scope="module")
def index_dir(finished_run):
    from tl_app.cli import main

    out = finished_run["base"] / "index"
    result = CliRunner().invoke(main, ["index", str(finished_run["data"]), "--backbone", "vgg16", "--weights", "none",
                                       "--input-size", "32", "--out", str(out),
                                       "--cache-dir", str(finished_run["base"] / "cache")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_similar_exits_non_zero_when_no_query_is_usable(cli, index_dir, tmp_path):
    result = cli("similar", index_dir, tmp_path / "nosuch.jpg")
    assert result.exit_code == 2 and "None of the 1 query images could be used" in result.output


# ---- 10. the query is not its own neighbour -------------------------------------------------------
def test_similar_leaves_the_query_out_unless_asked(cli, index_dir, finished_run, tmp_path):
    query = finished_run["data"] / "red" / "0.jpg"
    copy = tmp_path / "renamed-copy.jpg"
    copy.write_bytes(query.read_bytes())  # same content, another name: still "itself"
    result = json.loads(cli("similar", index_dir, copy, "-k", "3", "--json").output)
    hits = result["queries"][0]["neighbours"]
    assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
    assert str(query.resolve()) not in {str(Path(h["path"]).resolve()) for h in hits}
    kept = json.loads(cli("similar", index_dir, copy, "-k", "3", "--include-self", "--json").output)
    first = kept["queries"][0]["neighbours"][0]
    assert Path(first["path"]).resolve() == query.resolve() and first["similarity"] == pytest.approx(1.0, abs=1e-4)
    sheet = tmp_path / "sheet.png"
    assert cli("similar", index_dir, copy, "-k", "2", "--out", sheet).exit_code == 0
    assert Image.open(sheet).size[0] > 0


# ---- 9. embed on a run folder ------------------------------------------------------------------
def test_embed_accepts_a_run_folder_and_uses_its_recipe(cli, finished_run, tmp_path):
    out = tmp_path / "map.png"
    result = cli("embed", finished_run["run_dir"], "--out", out, "--cache-dir", finished_run["base"] / "cache")
    assert result.exit_code == 0, result.output
    assert "vgg16 features (the recipe of" in result.output and str(finished_run["data"]) in result.output
    assert out.is_file() and len(out.with_suffix(".csv").read_text().splitlines()) == 1 + 12


# ---- 11. small slips ------------------------------------------------------------------------------
def test_unknown_names_are_listed_with_right_plurals(cli, finished_run, tmp_path):
    image = next((finished_run["data"] / "red").iterdir())
    result = cli("explain", finished_run["run_dir"], image, "--class", "purple", "--out", tmp_path)
    assert result.exit_code == 2 and "Valid classes: blue, red." in result.output and "classs" not in result.output
    layer = cli("extract", finished_run["data"], *TINY[:6], "--layer", "block9_pool", "--out", tmp_path / "f",
                "--cache-dir", tmp_path / "cache")
    assert layer.exit_code == 2 and "Valid layers of vgg16:" in layer.output and "vgg16s" not in layer.output


def test_extraction_meta_records_its_time(cli, finished_run, tmp_path):
    result = cli("extract", finished_run["data"], *TINY[:6], "--out", tmp_path / "feats",
                 "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "feats" / "meta.json").read_text())
    assert meta["stats"]["computed"] == 12 and meta["stats"]["seconds"] > 0


def test_evaluate_leaves_out_top_k_when_k_covers_every_class(cli, finished_run, tmp_path):
    result = cli("evaluate", finished_run["run_dir"], "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert re.search(r"accuracy \d\.\d{4}  nll", result.output) and "top-" not in result.output


def test_report_marks_split_settings_unused_and_curves_mark_the_restored_epoch(cli, tmp_path):
    root = tmp_path / "split"
    write_folder(root / "train", {"red": 5, "blue": 5})
    write_folder(root / "val", {"red": 2, "blue": 2})
    result = cli("train", root, "--strategy", "bottleneck", *TINY, "--epochs", "3", "--name", "split",
                 "--runs-dir", tmp_path / "runs", "--set", f"features.cache_dir='{tmp_path / 'cache'}'")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "split"
    best = json.loads((run_dir / "metrics.json").read_text())["best_epoch"]
    assert json.loads((run_dir / "diagnosis.json").read_text())["restored_epoch"] == best
    assert cli("report", run_dir, "--no-evaluate").exit_code == 0
    page = (run_dir / "report.html").read_text()
    assert re.search(r"val_fraction = [\d.]+  # unused: the dataset&#x27;s own train/val/test folders", page)
