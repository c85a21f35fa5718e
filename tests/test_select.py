"""tl-app select and train --backbone auto: a K-fold logistic probe per backbone chooses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tl_app.core.errors import ConfigError
from tl_app.insight.select import candidate_list, parse_budget, probe_scores, weights_for


def test_budgets_and_candidates_parse_or_say_what_is_expected():
    assert parse_budget("90s") == 90 and parse_budget("10m") == 600 and parse_budget("1h") == 3600
    assert parse_budget(30) == 30
    with pytest.raises(ConfigError, match="90s, 10m or 1h"):
        parse_budget("soon")
    assert candidate_list("resnet50,vgg16") == ["vgg16", "resnet50"]  # cheapest first
    with pytest.raises(ConfigError, match="backbone"):
        candidate_list("vgg16,alexnet")


def test_per_backbone_weights_give_each_candidate_its_own():
    assert weights_for("none", "vgg16") == "none"
    assert weights_for("vgg16=hed-vgg16,none", "vgg16") == "hed-vgg16"
    assert weights_for("vgg16=hed-vgg16,none", "resnet50") == "none"
    assert weights_for("vgg16=hed-vgg16", "resnet50") == "imagenet"  # no unnamed entry: the default
    with pytest.raises(ConfigError, match="backbone"):
        weights_for("alexnet=x,none", "vgg16")
    with pytest.raises(ConfigError, match="names no weights"):
        weights_for("vgg16=,none", "vgg16")


def test_select_with_per_backbone_weights_probes_each_with_its_own_and_auto_trains_with_the_winners(
        tiny_config, cli, hed_vgg16_weights):
    """Offline only VGG16 has pretrained weights: 'vgg16=hed-vgg16,none' probes it with them and the rest with
    random weights, and train --backbone auto then trains the winner with the weights it was probed with."""
    config = tiny_config
    cache = ["--set", f"features.cache_dir={json.dumps(config.features.cache_dir)}"]
    result = cli("train", config.data.root, "--backbone", "auto", "--weights", "vgg16=hed-vgg16,none",
                 "--input-size", 32, "--epochs", 1, "--runs-dir", config.train.runs_dir, "--name", "auto", *cache,
                 "--set", 'backbone.candidates=["vgg16", "resnet50"]', "--set", 'backbone.select_budget="5m"')
    assert result.exit_code == 0, result.output
    run = json.loads((Path(config.train.runs_dir) / "auto" / "run.json").read_text())
    table = {row["backbone"]: row for row in run["backbone_selection"]["table"]}
    assert table["vgg16"]["weights"] == "hed-vgg16" and table["resnet50"]["weights"] == "none"
    assert "weights hed-vgg16" in result.output and "weights none" in result.output
    winner = run["backbone_selection"]["recommended"]
    assert run["backbone"] == winner and run["backbone_selection"]["recommended_weights"] == table[winner]["weights"]
    assert run["weights"] == table[winner]["weights"]  # the run trained with them, not the per-backbone list


def test_the_probe_tells_informative_features_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    informative = np.eye(3)[labels] * 2 + rng.normal(0, 0.5, (60, 3))
    noise = rng.normal(0, 1, (60, 3))
    good = probe_scores(np.hstack([informative, noise]), labels, 3, folds=5)
    bad = probe_scores(rng.normal(0, 1, (60, 6)), labels, 3, folds=5)
    assert good["probe_accuracy"] > 0.9 and bad["probe_accuracy"] < 0.6
    assert good["folds"] == 5 and 0 <= good["probe_accuracy_sd"] < 0.2 and good["macro_f1"] > 0.9


def test_select_ranks_backbones_and_train_auto_trains_the_winner(tiny_config, cli):
    config = tiny_config
    cache = ["--set", f"features.cache_dir={json.dumps(config.features.cache_dir)}"]
    result = cli("select", config.data.root, "--backbones", "resnet50,vgg16", "--weights", "none",
                 "--input-size", 32, "--folds", 3, "--json", *cache)
    assert result.exit_code == 0, result.output
    selection = json.loads(result.output[result.output.index("{"):])
    table = {row["backbone"]: row for row in selection["table"]}
    assert list(table) == ["vgg16", "resnet50"] and all(row["status"] == "probed" for row in table.values())
    best = max(row["probe_accuracy"] for row in table.values())
    assert table[selection["recommended"]]["probe_accuracy"] >= best - 0.005
    assert all(row["images_per_second"] > 0 and row["params"] > 14_000_000 for row in table.values())

    # train --backbone auto reuses the cached features (nothing extracted again) and records the choice
    result = cli("train", config.data.root, "--backbone", "auto", "--weights", "none", "--input-size", 32,
                 "--epochs", 1, "--runs-dir", config.train.runs_dir, "--name", "auto", *cache,
                 "--set", 'backbone.candidates=["vgg16", "resnet50"]', "--set", 'backbone.select_budget="5m"')
    assert result.exit_code == 0, result.output
    run = json.loads((Path(config.train.runs_dir) / "auto" / "run.json").read_text())
    assert run["backbone"] == run["backbone_selection"]["recommended"] == selection["recommended"]
    assert all(row["features"]["computed"] == 0 for row in run["backbone_selection"]["table"])
    assert "recommended" in result.output and "probe accuracy" in result.output
    from tl_app.insight.report import build_report

    page = build_report(Path(config.train.runs_dir) / "auto", evaluate_missing=False, echo=None).read_text()
    assert f"Backbone <b>{selection['recommended']}</b>: " in page and "(chosen)" in page


def test_a_budget_spent_leaves_the_rest_untried_and_says_so(tiny_config, cli):
    result = cli("select", tiny_config.data.root, "--backbones", "vgg16,resnet50", "--weights", "none",
                 "--input-size", 32, "--folds", 3, "--budget", "0.001s",
                 "--set", f"features.cache_dir={json.dumps(tiny_config.features.cache_dir)}")
    assert result.exit_code == 0, result.output
    assert "resnet50     not tried: the 0.001 s budget was spent" in result.output
