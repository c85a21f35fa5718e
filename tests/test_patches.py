"""tl-app patches: receptive fields mapped back to the original image, the streaming top-K, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tl_app.cli import main
from tl_app.insight.patches import TopK, patches, to_original
from tl_app.models.backbones import build_base, get_spec
from tl_app.models.receptive_field import receptive_field

HEIGHT, WIDTH, SQUARE = 40, 64, 4  # originals are wider than tall, so each resize policy maps differently
# (class, top, left) of the bright square; all inside the central 40 x 40 crop (columns 12..51)
SQUARES = [("a", 5, 14), ("a", 30, 40), ("a", 17, 25), ("b", 2, 45), ("b", 33, 13), ("b", 20, 30)]


@pytest.fixture(scope="module")
def square_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    for n, (label, top, left) in enumerate(SQUARES):
        pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        pixels[top:top + SQUARE, left:left + SQUARE] = 255
        (root / label).mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / label / f"img{n}.png")
    return root


def square_detector(size: int = 32):
    """One conv layer (7x7, stride 2, 'same'): +1 on a bright 3x3 centre, a dark ring around it."""
    import keras

    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(1, 7, strides=2, padding="same", name="detector")
    model = keras.Model(inputs, conv(inputs), name="squares")
    kernel = np.full((7, 7, 3, 1), -0.5 / (40 * 3 * 255), np.float32)
    kernel[2:5, 2:5] = 1 / (9 * 3 * 255)
    conv.set_weights([kernel, np.zeros(1, np.float32)])
    return model


@pytest.mark.parametrize("policy", ["stretch", "center_crop", "letterbox"])
def test_boxes_contain_the_bright_squares(square_folder, tmp_path, policy):
    summary = patches(square_detector(), square_folder, layer="detector", unit_ids=[0], per_unit=len(SQUARES),
                      resize_policy=policy, out=tmp_path / "sheet.png", echo=None)
    found = summary["units"][0]["patches"]
    assert len(found) == len(SQUARES)
    scale = {"stretch": WIDTH / 32, "center_crop": HEIGHT / 32, "letterbox": WIDTH / 32}[policy]
    for entry in found:
        n = int(entry["file"].rsplit("img", 1)[1].split(".")[0])
        _, top, left = SQUARES[n]
        y0, x0, y1, x1 = entry["box"]
        assert y0 <= top and top + SQUARE <= y1 and x0 <= left and left + SQUARE <= x1, (entry, SQUARES[n])
        assert (x1 - x0) <= 7 * scale + 2  # the 7-pixel field, not the whole image
    assert (tmp_path / "sheet.png").stat().st_size > 0
    listed = json.loads((tmp_path / "sheet.json").read_text())
    assert {"file", "unit", "value", "box"} <= set(listed["patches"][0])


def test_letterbox_padding_maps_outside_the_image_away():
    # a 20x40 image letterboxed to 32: resized to 16x32, 8 rows of padding on top
    assert to_original((8, 0, 24, 32), 32, 20, 40, "letterbox") == (0, 0, 20, 40)
    assert to_original((0, 0, 8, 32), 32, 20, 40, "letterbox")[2] <= 1  # the padding band is (almost) no image


def test_receptive_field_of_vgg16_block5_conv3_is_196_pixels():
    field = receptive_field(build_base(get_spec("vgg16"), 32), "block5_conv3")
    assert field.size == (196, 196) and field.jump == (16, 16)


def test_top_k_streams_the_same_winners_as_sorting_everything():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(50, 3, 4, 5)).astype(np.float32)
    top = TopK(5, 4)
    for start in range(0, 50, 7):
        top.add(acts[start:start + 7], np.arange(start, min(start + 7, 50)))
    peaks = acts.reshape(50, 12, 5).max(axis=1)
    for unit in range(5):
        assert list(top.images[unit]) == list(np.argsort(-peaks[:, unit])[:4])
    assert np.allclose(top.variance, peaks.var(axis=0), atol=1e-5)


def test_cli_writes_sheet_and_json_for_a_backbone(square_folder, tmp_path):
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(main, ["patches", "vgg16", str(square_folder), "--layer", "block1_conv2",
                                       "--input-size", "32", "--units", "2", "--per-unit", "3",
                                       "--out", str(out), "--json", "--no-cache"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert len(summary["units"]) == 2 and all(len(u["patches"]) == 3 for u in summary["units"])
    assert summary["source"].startswith("vgg16 (random weights)") and out.is_file()


def test_cli_user_mistakes_are_plain_errors(square_folder, tmp_path):
    runner = CliRunner()
    bad_unit = runner.invoke(main, ["patches", "vgg16", str(square_folder), "--layer", "block1_conv2",
                                    "--input-size", "32", "--unit", "999", "--out", str(tmp_path / "s.png")])
    assert bad_unit.exit_code != 0 and "0..63" in bad_unit.output and "Traceback" not in bad_unit.output
    no_head = runner.invoke(main, ["patches", "vgg16", str(square_folder), "--input-size", "32",
                                   "--for-class", "a", "--out", str(tmp_path / "s.png")])
    assert no_head.exit_code != 0 and "trained model" in no_head.output


@pytest.fixture(scope="module")
def logistic_run(tmp_path_factory, sample_dir):
    """A run (vgg16, random weights, 32 px) whose head is one Dense layer on the pooled block5 features."""
    from factories import make_run_dir, small_config

    config = small_config(tmp_path_factory.mktemp("patches-run"), sample_dir, backbone="vgg16")
    config.head.kind = "logistic"
    return make_run_dir(config)


def test_for_class_shows_the_units_with_the_largest_head_weights(logistic_run, sample_dir, tmp_path):
    from tl_app.models.opener import load_run_model

    kernel = np.asarray(load_run_model(logistic_run).get_layer("head").get_layer("probabilities").kernel)
    classes = json.loads((logistic_run / "run.json").read_text())["classes"]
    column = kernel[:, classes.index("squares")]
    summary = patches(logistic_run, sample_dir, for_class="squares", units=3, per_unit=2,
                      out=tmp_path / "squares.png", echo=None)
    assert summary["layer"] == "block5_conv3"
    assert [row["unit"] for row in summary["units"]] == list(np.argsort(-column)[:3])
    assert all(column[row["unit"]] > 0 for row in summary["units"])


def test_report_shows_what_the_features_see_for_each_class(logistic_run):
    from tl_app.insight.report import build_report

    text = build_report(logistic_run, evaluate_missing=False, explanations=0, echo=None).read_text()
    section = text.split('id="features-see"', 1)[1].split("</section>", 1)[0]
    classes = json.loads((logistic_run / "run.json").read_text())["classes"]
    assert all(f"<h3>{name}</h3>" in section for name in classes)
    assert section.count('src="data:image/png;base64,') == len(classes)
    assert (logistic_run / "patches" / "report" / "features.json").is_file()


def test_a_second_pass_comes_from_the_cache_unless_the_layer_or_k_changes(square_folder, tmp_path):
    cache = tmp_path / "cache"
    common = dict(input_size=32, units=2, out=tmp_path / "s.png", echo=None, cache_dir=cache)
    first = patches("vgg16", square_folder, layer="block1_conv2", per_unit=4, **common)
    again = patches("vgg16", square_folder, layer="block1_conv2", per_unit=3, **common)
    assert not first["cached"] and again["cached"] and len(list(cache.iterdir())) == 1
    assert again["units"][0]["patches"] == first["units"][0]["patches"][:3]
    assert not patches("vgg16", square_folder, layer="block1_conv1", per_unit=3, **common)["cached"]
    assert not patches("vgg16", square_folder, layer="block1_conv2", per_unit=5, **common)["cached"]
