"""Issue 13, items 6, 7, 8, 9: the pixels every tl-app path and the exported model see are training's pixels.

Real files, encoded as users' files come (EXIF-rotated JPEG, transparent PNG,
16-bit, grayscale, CMYK), decoded by the graph decoder, by Pillow, by the
training pipeline and by the exported SavedModel's byte signature.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tl_app.data.decode import decode_bytes
from tl_app.data.images import decode_pil, probe_file
from tl_app.export.parity import golden_set, source_images


def photo(width: int = 83, height: int = 61, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: gradients plus noise, so JPEG's IDCT rounding shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 3 % 256, yy * 4 % 256, (xx + yy) * 2 % 256], -1).astype(np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def encode(image, fmt, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def graph(data: bytes, background=(255, 255, 255)) -> np.ndarray:
    return decode_bytes(tf.constant(data), background).numpy()


# ---- item 6: one JPEG decoder ------------------------------------------------------------
@pytest.mark.parametrize("quality", [75, 95])
def test_training_graph_decode_of_a_plain_jpeg_equals_pillow_within_one_level(tmp_path, quality):
    from tl_app.data.pipeline import decode_file

    path = tmp_path / "plain.jpg"
    path.write_bytes(encode(photo(), "JPEG", quality=quality))
    assert probe_file(path, 10**8).fast  # training decodes this one in the graph
    ours = decode_file(tf.constant(str(path)), tf.constant(True)).numpy().astype(int)
    pillow = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(ours - pillow).max() <= 1  # the fast IDCT differed by up to 6 levels


def test_the_feature_format_version_was_bumped_for_the_new_decoder():
    from tl_app.features.recipe import FORMAT_VERSION

    assert FORMAT_VERSION >= 2  # version 1 cache entries were decoded with the fast IDCT


# ---- item 7: the graph decoder is Pillow, or refuses ----------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_decode_upright_exactly_as_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo(), "JPEG", quality=90, exif=exif.tobytes())
    ours, pillow = graph(data), decode_pil(data)
    assert ours.shape == pillow.shape and np.array_equal(ours, pillow)


@pytest.mark.parametrize("kind", ["rgba", "la", "palette-transparent", "rgb-trns", "palette-4bit", "gray",
                                  "gray16", "rgb16", "rgba16", "gray-jpeg", "gif", "bmp"])
def test_transparency_grayscale_and_16bit_decode_exactly_as_pillow(kind):
    image = photo()
    rgb = np.asarray(image)
    alpha = np.linspace(0, 255, rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[0], rgb.shape[1], 1).astype(np.uint8)
    rgba = Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    palette = image.convert("P", palette=Image.ADAPTIVE, colors=16)
    wide = rgb.astype(np.uint16) * 257 + 100
    data = {
        "rgba": lambda: encode(rgba, "PNG"),
        "la": lambda: encode(rgba.convert("LA"), "PNG"),
        "palette-transparent": lambda: encode(palette, "PNG", transparency=2),
        "rgb-trns": lambda: encode(image, "PNG", transparency=tuple(int(v) for v in rgb[0, 0])),
        "palette-4bit": lambda: encode(palette, "PNG"),
        "gray": lambda: encode(image.convert("L"), "PNG"),
        "gray16": lambda: encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 3), "PNG"),
        "rgb16": lambda: tf.io.encode_png(wide).numpy(),
        "rgba16": lambda: tf.io.encode_png(np.concatenate([wide, alpha.astype(np.uint16) * 257], -1)).numpy(),
        "gray-jpeg": lambda: encode(image.convert("L"), "JPEG"),
        "gif": lambda: encode(palette, "GIF"),
        "bmp": lambda: encode(image, "BMP"),
    }[kind]()
    background = (10, 200, 30)
    assert np.array_equal(graph(data, background), decode_pil(data, background))


@pytest.mark.parametrize("kind", ["cmyk", "gif-transparent", "webp"])
def test_what_the_graph_cannot_match_is_refused_loudly(kind):
    image = photo()
    data = {"cmyk": lambda: encode(image.convert("CMYK"), "JPEG"),
            "gif-transparent": lambda: encode(image.convert("P", palette=Image.ADAPTIVE), "GIF", transparency=0),
            "webp": lambda: encode(image, "WEBP")}[kind]()
    with pytest.raises(tf.errors.InvalidArgumentError, match="cannot be|unsupported image format"):
        graph(data)


# ---- item 9: 16-bit by the mode ---------------------------------------------------------------
def test_a_dark_16bit_image_stays_dark(tmp_path):
    values = np.full((20, 30), 1000, np.uint16)  # 1000/65535 of full scale: about level 4
    path = tmp_path / "dark16.png"
    Image.fromarray(values).save(path)
    pixels = decode_pil(path)
    assert pixels.max() == 4 and pixels.min() == 4  # scaled by its own maximum it became 255
    assert np.array_equal(graph(path.read_bytes()), pixels)


# ---- item 7 and 8: the exported model -----------------------------------------------------------
def test_the_exported_byte_signature_gives_training_pixels_for_every_golden_image(exported, keras_model):
    from tl_app.data.pipeline import resize_images

    card = json.loads((exported["version_dir"] / "model_card.json").read_text())
    loaded = tf.saved_model.load(str(exported["version_dir"]))
    golden = golden_set(source_images(exported["run_dir"])[0])
    names = {g.name.split("-", 1)[1] for g in golden}
    assert {f"jpeg-exif{o}" for o in range(1, 9)} | {"png-rgba", "png-la", "png-palette-transparent", "jpeg-gray",
                                                    "png-gray16-dark", "png-rgb16", "jpeg-cmyk"} <= names
    for g in golden:
        if g.refused:
            with pytest.raises(tf.errors.InvalidArgumentError):
                loaded.signatures["serving_default"](image_bytes=tf.constant([g.data]))
            continue
        served = loaded.signatures["serving_default"](image_bytes=tf.constant([g.data]))["probabilities"].numpy()
        pixels = resize_images(decode_pil(g.data), 32, "center_crop").numpy()[None]
        assert np.max(np.abs(served - keras_model.predict(pixels, verbose=0))) <= 1e-4, g.name
    parity = card["parity"]
    for fmt in ("savedmodel_bytes", "savedmodel", "keras", "tflite"):
        assert parity[fmt]["max_abs_diff"] <= 1e-4 and parity[fmt]["images"] >= 20, fmt
    assert "CMYK/YCCK JPEG (convert to RGB first)" in card["signatures"]["serving_default"]["refuses"]
    contract = card["input_contract"]
    assert contract["pixel_range"] == [0.0, 255.0] and contract["channel_order"] == "RGB"
    assert contract["resize"]["antialias"] is True and contract["resize"]["policy"] == "center_crop"


def test_the_gate_refuses_a_model_whose_byte_signature_is_broken(exported, keras_model, tmp_path):
    """The old bare tf.io.decode_image: EXIF ignored, transparency black, CMYK accepted."""
    from tl_app.core.errors import ExportError
    from tl_app.export.parity import parity_gate
    from tl_app.export.savedmodel import build_serving_module, save_savedmodel

    def bare(data, background):
        return tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)

    module = build_serving_module(keras_model, ["circles", "squares", "triangles"], 32, "center_crop",
                                  decode=bare)
    save_savedmodel(module, tmp_path / "broken")
    golden = golden_set(source_images(exported["run_dir"], count=1)[0])
    with pytest.raises(ExportError) as failure:
        parity_gate(keras_model, golden, 32, "center_crop", (255, 255, 255), savedmodel_dir=tmp_path / "broken")
    text = str(failure.value)
    assert "serving_default" in text and "accepted 0-jpeg-cmyk" in text
    assert "0-jpeg-exif6" in text and "0-png-rgba" in text
