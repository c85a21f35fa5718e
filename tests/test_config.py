import json
import tomllib
from pathlib import Path

import pytest

from tl_app.core.config import Config, load_config, to_toml
from tl_app.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_bundled_pipeline_loads_and_overrides_defaults():
    names = sorted(p.name for p in (ROOT / "pipelines").glob("*.toml"))
    assert {"quickstart.toml", "bottleneck-vgg16.toml", "finetune-resnet50.toml"} <= set(names)
    finetune = load_config(ROOT / "pipelines" / "finetune-resnet50.toml")
    assert finetune.train.strategy == "finetune"
    assert finetune.train.schedule == "cosine"
    assert finetune.data.batch_size == Config().data.batch_size  # untouched keys keep defaults


def test_unknown_key_names_the_key_and_the_closest_valid_one(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.epoch" in message and "train.epochs" in message


def test_unknown_section_is_reported(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[trian]\nepochs = 3\n")
    with pytest.raises(ConfigError, match="'train'"):
        load_config(path)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[train]\nepochs = "many"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epochs" in str(err.value) and "int" in str(err.value)


def test_invalid_choice_suggests_closest():
    with pytest.raises(ConfigError, match="adamw"):
        Config().with_overrides({"train.optimizer": "adamx"})


@pytest.mark.parametrize("value", [[300, 0, 0], [255, 255], "white", [1.5, 2, 3]])
def test_background_must_be_an_rgb_triple(value):
    with pytest.raises(ConfigError, match="data.background must be three integers"):
        Config().with_overrides({"data.background": value})
    assert Config().with_overrides({"data.background": [0, 128, 255]}).data.background == [0, 128, 255]


def test_batch_size_error_names_the_section():
    with pytest.raises(ConfigError, match="data.batch_size"):
        Config().with_overrides({"data.batch_size": 0})


def test_cli_overrides_win_over_file_and_none_means_unset(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[train]\nepochs = 3\nlearning_rate = 0.01\n")
    config = load_config(path, {"train.epochs": 7, "train.learning_rate": None})
    assert config.train.epochs == 7
    assert config.train.learning_rate == 0.01


def test_resolved_config_round_trips_through_written_files(tmp_path):
    config = Config().with_overrides({"data.class_weights": {"cats": 2.0}, "head.units": [64, 32]})
    config.write(tmp_path)
    from_json = Config.from_dict(json.loads((tmp_path / "config.json").read_text()))
    from_toml = Config.from_dict(tomllib.loads((tmp_path / "config.toml").read_text()))
    assert from_json == config
    assert from_toml == config


def test_to_toml_writes_valid_toml():
    text = to_toml(Config().to_dict())
    assert tomllib.loads(text)["backbone"]["name"] == "resnet50"
