"""Grad-CAM and occlusion heat maps on real Keras models.

The localisation tests train a real classifier on a synthetic task where the
class is decided only by the colour of a patch at a known place (top-left
quadrant), with clutter elsewhere. ImageNet weights cannot be downloaded here,
and the deep blocks of a random-weight backbone mix the whole image, so the
model uses a backbone truncated at conv3 (``backbone.layer``), whose last
convolutional block keeps an 8x8 spatial map at 64x64 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_app.core.errors import ConfigError

SIZE = 64
PATCH = (8, 24)  # rows and columns [8, 24): inside the top-left quadrant


def synthetic_image(label: int, rng: np.random.Generator) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), rng.integers(90, 170, 3), np.float32)
    image += rng.normal(0, 12, image.shape)
    side = SIZE // 6
    for _ in range(3):  # clutter, outside the informative quadrant
        if rng.uniform() < 0.5:
            y, x = rng.integers(SIZE // 2, SIZE - side), rng.integers(0, SIZE - side)
        else:
            y, x = rng.integers(0, SIZE - side), rng.integers(SIZE // 2, SIZE - side)
        image[y:y + side, x:x + side] = [[40, 160, 40], [220, 220, 40], [30, 30, 30]][rng.integers(3)]
    lo, hi = PATCH
    image[lo:hi, lo:hi] = [230, 30, 30] if label == 0 else [30, 60, 230]
    return np.clip(image, 0, 255)


@pytest.fixture(scope="module")
def patch_model():
    """A classifier that has really learned the patch task (checked on fresh images)."""
    import keras

    from tl_app.models.backbones import build_feature_model, get_spec
    from tl_app.core.config import HeadConfig
    from tl_app.models.surgery import assemble
    from tl_app.models.heads import build_head

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = np.stack([synthetic_image(i % 2, rng) for i in range(96)])
    labels = np.arange(96) % 2
    features_model = build_feature_model(get_spec("resnet50"), SIZE, "none", 0, layer="conv3_block4_out")
    features = features_model.predict(images, verbose=0, batch_size=32)
    head = build_head(2, features.shape[1], HeadConfig(units=[32], dropout=0.0, batch_norm=True))
    head.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"])
    head.fit(features, labels, epochs=40, batch_size=16, verbose=0)
    model = assemble(features_model, head)
    test_images = np.stack([synthetic_image(i % 2, rng) for i in range(16)])
    test_labels = np.arange(16) % 2
    accuracy = float((model.predict(test_images, verbose=0).argmax(axis=1) == test_labels).mean())
    assert accuracy >= 0.9, f"the synthetic task was not learned (held-out accuracy {accuracy})"
    return model, test_images, test_labels


def in_patch_quadrant(heat: np.ndarray) -> bool:
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return row < heat.shape[0] / 2 and col < heat.shape[1] / 2


def test_gradcam_peaks_on_the_informative_patch(patch_model):
    from tl_app.insight.explain import GradCam

    model, images, labels = patch_model
    cam = GradCam(model, "resnet50")
    assert cam.conv_layer == "conv3_block4_out"  # the last block of the (truncated) backbone
    heats, probs = cam(images, labels)
    assert heats.shape == (len(images), 8, 8)
    assert probs.shape == (len(images), 2)
    assert heats.min() >= 0 and heats.max() <= 1
    assert all(in_patch_quadrant(h) for h in heats)
    quadrant = heats[:, :4, :4].mean()
    elsewhere = (heats.sum(axis=(1, 2)) - heats[:, :4, :4].sum(axis=(1, 2))).mean() / 48
    assert quadrant > 2 * elsewhere


def test_occlusion_peaks_on_the_informative_patch(patch_model):
    from tl_app.insight.explain import occlusion_map

    model, images, labels = patch_model
    for image, label in zip(images[:4], labels[:4]):
        heat, base = occlusion_map(model, image, int(label), patch=16, stride=8)
        assert heat.shape == (SIZE, SIZE)
        assert base > 0.5
        assert in_patch_quadrant(heat)


def test_explain_writes_overlays_for_the_top_class_and_a_chosen_class(patch_model, tmp_path):
    from tl_app.models.opener import Predictor, keras_function
    from tl_app.insight.explain import explain

    model, images, _ = patch_model
    paths = []
    for n, image in enumerate(images[:2]):
        path = tmp_path / f"img{n}.png"
        Image.fromarray(image.astype(np.uint8)).save(path)
        paths.append(path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    loaded = Predictor(["red", "blue"], SIZE, "stretch", tmp_path, "keras", keras_function(model, SIZE), model=model,
                       card={"backbone": "resnet50"})
    summary = explain(None, [*paths, bad], "gradcam", out_dir=tmp_path / "out", echo=None, loaded=loaded)
    assert [r["class"] for r in summary["results"]] == ["red", "blue"]
    assert summary["skipped"] and summary["skipped"][0]["path"] == str(bad)
    for result in summary["results"]:
        with Image.open(result["png"]) as png:
            assert png.format == "PNG" and png.width > 400
        assert result["peak"][0] < 0.5 and result["peak"][1] < 0.5
    chosen = explain(None, paths[:1], "occlusion", class_name="blue", patch=16, stride=8,
                     out_dir=tmp_path / "out", echo=None, loaded=loaded)
    assert chosen["results"][0]["class"] == "blue"
    assert json.loads((tmp_path / "out" / "explanations_occlusion.json").read_text())["method"] == "occlusion"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_dir):
    """A real run directory (resnet50, 32x32, untrained head)."""
    from factories import make_run_dir, small_config

    config = small_config(tmp_path_factory.mktemp("explain"), sample_dir)
    return make_run_dir(config)


def test_gradcam_on_a_run_dir_uses_the_registry_conv_layer(run_dir, sample_dir, cli, tmp_path):
    from tl_app.models.opener import open_model
    from tl_app.insight.explain import GradCam

    run = run_dir
    cam = GradCam(open_model(run).model, "resnet50")
    assert cam.conv_layer == "conv5_block3_out"
    image = next(sample_dir.glob("circles/*"))
    result = cli("explain", run, image, "--method", "gradcam", "--out", tmp_path / "x", "--json")
    summary = json.loads(result.output)
    assert result.exit_code == 0
    assert Path(summary["results"][0]["png"]).is_file()
    assert "1x1" in summary["warning"]  # 32x32 input: conv5 has no spatial detail, and we say so


def test_unknown_class_and_method_are_clear_errors(run_dir, sample_dir, cli):
    run = run_dir
    image = next(sample_dir.glob("circles/*"))
    result = cli("explain", run, image, "--class", "circle")
    assert result.exit_code != 0 and "Did you mean 'circles'" in result.output
    result = cli("explain", run, image, "--method", "saliency")
    assert result.exit_code != 0 and "gradcam" in result.output and "Traceback" not in result.output
    from tl_app.insight.explain import explain

    with pytest.raises(ConfigError, match="gradcam"):  # the library checks too, for callers from Python
        explain(run, [image], "saliency", echo=None)
