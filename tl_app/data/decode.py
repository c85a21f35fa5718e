"""The one in-graph decoder: encoded bytes to the pixels ``images.decode_pil`` gives.

Training decodes plain files with it in the tf.data graph, and the exported
SavedModel's byte signature is built from it, so a client of TensorFlow
Serving sends the same bytes a user trained on and the model sees the same
pixels. It matches Pillow exactly for:

* JPEG: accurate integer IDCT (Pillow's libjpeg default), EXIF orientation 1-8
  read from the APP1 segment, grayscale;
* PNG: 8 and 16 bit, gray, RGB, palette, with transparency (alpha, LA, tRNS)
  composited onto the run's background with ``images.composite``'s rounding;
  16-bit gray scaled by the mode (``images.scale_16bit``), 16-bit colour by
  its high byte as Pillow reads it;
* GIF (first frame) and BMP without transparency.

What it cannot match, it refuses with an InvalidArgument error naming the
file kind, never guessing: CMYK/YCCK JPEG, GIF with a transparent colour,
32-bit BMP (alpha), and every other format.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from tl_app.data.pixel_rules import DECODER_RULE  # noqa: F401  (re-exported; part of the feature-cache key)

CMYK_REFUSED = ("CMYK/YCCK JPEG cannot be decoded in the graph the way training decodes it; "
                "convert it to RGB before sending (tl-app predict and tl-app serve do this)")
GIF_REFUSED = ("GIF with a transparent colour cannot be composited in the graph; send it as PNG "
               "(tl-app predict and tl-app serve accept it)")
BMP_REFUSED = "32-bit BMP (alpha) cannot be decoded in the graph; send it as PNG"
FORMAT_REFUSED = "unsupported image format: the byte signature takes JPEG, PNG, GIF or BMP"
SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def _byte(raw: tf.Tensor, index) -> tf.Tensor:
    """raw[index] as int32, 0 past the end (a corrupt header must not raise an index error)."""
    n = tf.shape(raw, out_type=tf.int32)[0]
    index = tf.cast(index, tf.int32)
    safe = tf.clip_by_value(index, 0, tf.maximum(n - 1, 0))
    value = tf.cast(tf.gather(raw, safe), tf.int32)
    return tf.where(tf.logical_and(index >= 0, index < n), value, 0)


def _u16(raw, index, little) -> tf.Tensor:
    a, b = _byte(raw, index), _byte(raw, index + 1)
    return tf.where(little, a + b * 256, a * 256 + b)


def _u32(raw, index, little) -> tf.Tensor:
    lo, hi = _u16(raw, index, little), _u16(raw, index + 2, little)
    return tf.where(little, lo + hi * 65536, lo * 65536 + hi)


def jpeg_header(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(EXIF orientation, colour components) of a JPEG, walking its segments up to the scan."""
    n = tf.shape(raw, out_type=tf.int32)[0]
    sof = tf.constant(SOF_MARKERS, tf.int32)

    def cond(pos, exif, components, done):
        return tf.logical_and(tf.logical_not(done), pos + 4 <= n)

    def body(pos, exif, components, done):
        if_marker = tf.equal(_byte(raw, pos), 0xFF)
        marker = _byte(raw, pos + 1)
        fill = tf.logical_and(if_marker, tf.equal(marker, 0xFF))
        length = _u16(raw, pos + 2, tf.constant(False))
        is_exif = tf.logical_and(tf.equal(marker, 0xE1), tf.logical_and(
            tf.equal(exif, 0), tf.reduce_all(tf.equal(
                tf.stack([_byte(raw, pos + 4 + i) for i in range(6)]),
                tf.constant([0x45, 0x78, 0x69, 0x66, 0, 0], tf.int32)))))
        exif = tf.where(is_exif, pos + 10, exif)
        is_sof = tf.reduce_any(tf.equal(marker, sof))
        components = tf.where(tf.logical_and(is_sof, tf.equal(components, 0)), _byte(raw, pos + 9), components)
        stop = tf.logical_or(tf.logical_not(if_marker),
                             tf.logical_or(tf.equal(marker, 0xDA), tf.equal(marker, 0xD9)))
        stop = tf.logical_or(stop, tf.logical_and(tf.logical_not(fill), length < 2))
        next_pos = tf.where(fill, pos + 1, pos + 2 + length)
        return next_pos, exif, components, stop

    _, exif, components, _ = tf.while_loop(
        cond, body, (tf.constant(2), tf.constant(0), tf.constant(0), tf.constant(False)))
    return tiff_orientation(raw, exif), components


def tiff_orientation(raw: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """Tag 0x0112 of IFD0 of the TIFF block at ``start`` (0: none); 1 when absent or not 1..8."""
    little = tf.logical_and(tf.equal(_byte(raw, start), 0x49), tf.equal(_byte(raw, start + 1), 0x49))
    ifd = start + _u32(raw, start + 4, little)
    count = tf.clip_by_value(_u16(raw, ifd, little), 0, 512)
    entries = ifd + 2 + 12 * tf.range(count)
    tags = _u16(raw, entries, little)
    values = _u16(raw, entries + 8, little)
    found = tf.equal(tags, 0x0112)
    value = tf.cond(tf.reduce_any(found), lambda: tf.gather(values, tf.argmax(tf.cast(found, tf.int32),
                                                                              output_type=tf.int32)),
                    lambda: tf.constant(1))
    value = tf.where(tf.equal(start, 0), 1, value)
    return tf.where(tf.logical_and(value >= 1, value <= 8), value, 1)


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Pillow's ImageOps.exif_transpose for orientation 1..8."""
    transpose = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,
        lambda: image,
        lambda: tf.image.flip_left_right(image),
        lambda: tf.image.rot90(image, 2),
        lambda: tf.image.flip_up_down(image),
        lambda: transpose(image),
        lambda: tf.image.rot90(image, 3),
        lambda: tf.image.rot90(transpose(image), 2),
        lambda: tf.image.rot90(image, 1),
    ]
    return tf.switch_case(orientation, branches)


def composite(rgba: tf.Tensor, background: tf.Tensor) -> tf.Tensor:
    """RGBA uint8 onto an opaque background: round((c*a + bg*(255-a)) / 255), as images.composite."""
    values = tf.cast(rgba, tf.int32)
    alpha = values[..., 3:4]
    bg = tf.cast(background, tf.int32)
    out = (values[..., :3] * alpha + bg * (255 - alpha) + 127) // 255
    return tf.cast(out, tf.uint8)


def decode_png(data: tf.Tensor, raw: tf.Tensor, background: tf.Tensor) -> tf.Tensor:
    depth, colour = _byte(raw, 24), _byte(raw, 25)

    def sixteen():
        wide = tf.cast(tf.io.decode_png(data, channels=4, dtype=tf.uint16), tf.int32)
        gray = (wide * 255 + 32767) // 65535  # images.scale_16bit: by the mode, never by the content
        high = wide // 256  # Pillow reads 16-bit colour and alpha by their high byte
        rgb = tf.where(tf.equal(colour, 0), gray[..., :3], high[..., :3])
        alpha = tf.where(tf.equal(colour, 0), tf.fill(tf.shape(high[..., 3:]), 255), high[..., 3:])
        return tf.cast(tf.concat([rgb, alpha], -1), tf.uint8)

    def eight_alpha():
        return composite(tf.io.decode_png(data, channels=4, dtype=tf.uint8), background)

    def opaque():  # TF's filler alpha is wrong below 8 bits (15 for a 4-bit palette): no alpha unless there is one
        return tf.io.decode_png(data, channels=3, dtype=tf.uint8)

    return tf.case([(tf.equal(depth, 16), lambda: composite(sixteen(), background)),
                    (png_transparent(raw, colour), eight_alpha)], default=opaque)


def png_transparent(raw: tf.Tensor, colour: tf.Tensor) -> tf.Tensor:
    """An alpha channel (colour types 4, 6) or a tRNS chunk before the image data."""
    n = tf.shape(raw, out_type=tf.int32)[0]
    trns = tf.constant([0x74, 0x52, 0x4E, 0x53], tf.int32)
    idat = tf.constant([0x49, 0x44, 0x41, 0x54], tf.int32)

    def cond(pos, found, done):
        return tf.logical_and(tf.logical_not(done), pos + 8 <= n)

    def body(pos, found, done):
        kind = tf.stack([_byte(raw, pos + 4 + i) for i in range(4)])
        length = _u32(raw, pos, tf.constant(False))
        found = tf.logical_or(found, tf.reduce_all(tf.equal(kind, trns)))
        done = tf.logical_or(tf.reduce_all(tf.equal(kind, idat)), length < 0)
        return pos + 12 + length, found, done

    _, found, _ = tf.while_loop(cond, body, (tf.constant(8), tf.constant(False), tf.constant(False)))
    return tf.logical_or(found, tf.logical_or(tf.equal(colour, 4), tf.equal(colour, 6)))


def decode_jpeg(data: tf.Tensor, raw: tf.Tensor) -> tf.Tensor:
    orientation, components = jpeg_header(raw)
    check = tf.debugging.Assert(tf.not_equal(components, 4), [tf.constant(CMYK_REFUSED)])
    with tf.control_dependencies([check]):
        image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    return orient(image, orientation)


def gif_transparent(raw: tf.Tensor) -> tf.Tensor:
    """Whether a Graphic Control Extension (21 F9 04) sets the transparency flag (a false alarm only refuses)."""
    n = tf.shape(raw)[0]
    ints = tf.cast(raw, tf.int32)
    if_short = tf.less(n, 4)
    a, b, c, d = (ints[i:tf.maximum(n - 3 + i, i)] for i in range(4))
    hits = tf.logical_and(tf.logical_and(tf.equal(a, 0x21), tf.equal(b, 0xF9)),
                          tf.logical_and(tf.equal(c, 4), tf.equal(d % 2, 1)))
    return tf.logical_and(tf.logical_not(if_short), tf.reduce_any(hits))


def decode_other(data: tf.Tensor, raw: tf.Tensor) -> tf.Tensor:
    is_gif = tf.logical_and(tf.equal(_byte(raw, 0), 0x47), tf.equal(_byte(raw, 1), 0x49))
    is_bmp = tf.logical_and(tf.equal(_byte(raw, 0), 0x42), tf.equal(_byte(raw, 1), 0x4D))
    checks = [
        tf.debugging.Assert(tf.logical_or(is_gif, is_bmp), [tf.constant(FORMAT_REFUSED)]),
        tf.debugging.Assert(tf.logical_not(tf.logical_and(is_gif, gif_transparent(raw))), [tf.constant(GIF_REFUSED)]),
        tf.debugging.Assert(tf.logical_not(tf.logical_and(is_bmp, tf.equal(_u16(raw, 28, tf.constant(True)), 32))),
                            [tf.constant(BMP_REFUSED)]),
    ]
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    return image


def decode_bytes(data: tf.Tensor, background: Sequence[int] | tf.Tensor = (255, 255, 255)) -> tf.Tensor:
    """Encoded image bytes (scalar string) to HxWx3 uint8, the pixels decode_pil gives, or an error."""
    raw = tf.io.decode_raw(data, tf.uint8)
    bg = tf.cast(tf.reshape(background, [3]), tf.int32)
    is_jpeg = tf.logical_and(tf.equal(_byte(raw, 0), 0xFF), tf.equal(_byte(raw, 1), 0xD8))
    is_png = tf.logical_and(tf.equal(_byte(raw, 0), 0x89), tf.equal(_byte(raw, 1), 0x50))
    image = tf.case([(is_jpeg, lambda: decode_jpeg(data, raw)), (is_png, lambda: decode_png(data, raw, bg))],
                    default=lambda: decode_other(data, raw))
    image.set_shape([None, None, 3])
    return image
