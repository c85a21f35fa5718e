"""tf.data input pipelines and the one resize definition shared with export.

Images leave this module as float32 RGB pixels in 0..255 at the model's input
size; the backbone's own preprocessing runs inside the model.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from tl_app.data.manifest import Record
from tl_app.data.images import decode_pil
from tl_app.data.decode import decode_bytes
from tl_app.data.pixel_rules import DEFAULT_RESIZE_POLICY, effective_policy  # noqa: F401  (re-exported)


def resize_images(images: tf.Tensor, size: int, policy: str) -> tf.Tensor:
    """Resize an HxWx3 image or an NxHxWx3 batch to size x size (float32 out)."""
    policy = effective_policy(policy)
    images = tf.cast(images, tf.float32)
    if policy == "stretch":
        out = tf.image.resize(images, (size, size), antialias=True)
    elif policy == "letterbox":
        out = tf.image.resize_with_pad(images, size, size, antialias=True)
    elif policy == "center_crop":
        shape = tf.shape(images)
        height, width = shape[-3], shape[-2]
        side = tf.minimum(height, width)
        top = (height - side) // 2
        left = (width - side) // 2
        cropped = images[..., top:top + side, left:left + side, :]
        out = tf.image.resize(cropped, (size, size), antialias=True)
    else:
        raise ValueError(f"unknown resize policy {policy!r}")
    return tf.clip_by_value(out, 0.0, 255.0)


def _pil_decode(path, background: np.ndarray) -> np.ndarray:
    if isinstance(path, np.ndarray):
        path = path.item()
    return decode_pil(os.fsdecode(path), tuple(int(v) for v in background))


def decode_file(path: tf.Tensor, fast: tf.Tensor, background: Sequence[int] = (255, 255, 255)) -> tf.Tensor:
    """Graph decode (data.decode) for plain JPEG/PNG; Pillow (EXIF, alpha, CMYK, 16-bit, GIF...) otherwise."""
    bg = tf.constant(list(background), tf.uint8)

    def graph_decode():  # the exported byte signature's decoder: the same pixels as Pillow, exactly
        return decode_bytes(tf.io.read_file(path), bg)

    def python_decode():
        image = tf.numpy_function(_pil_decode, [path, bg], tf.uint8, stateful=False)
        return tf.ensure_shape(image, [None, None, 3])

    image = tf.cond(fast, graph_decode, python_decode)
    image.set_shape([None, None, 3])
    return image


def _sha256(data) -> bytes:
    return hashlib.sha256(data if isinstance(data, bytes) else data.item()).hexdigest().encode()


def _pil_decode_bytes(data, background: np.ndarray) -> np.ndarray:
    return decode_pil(data if isinstance(data, bytes) else data.item(), tuple(int(v) for v in background))


def decode_checked(path: tf.Tensor, fast: tf.Tensor, sha256: tf.Tensor,
                   background: Sequence[int] = (255, 255, 255)) -> tf.Tensor:
    """decode_file from one read of the bytes, failing when they are not the scanned ones (changed since).

    Features and training then never attach new pixels to an old content hash;
    make_dataset drops the failing file like any other undecodable one.
    """
    bg = tf.constant(list(background), tf.uint8)
    data = tf.io.read_file(path)
    digest = tf.numpy_function(_sha256, [data], tf.string, stateful=False)
    check = tf.debugging.Assert(tf.equal(digest, sha256), ["file changed since the scan:", path])
    with tf.control_dependencies([check]):
        data = tf.identity(data)

    def python_decode():
        image = tf.numpy_function(_pil_decode_bytes, [data, bg], tf.uint8, stateful=False)
        return tf.ensure_shape(image, [None, None, 3])

    image = tf.cond(fast, lambda: decode_bytes(data, bg), python_decode)
    image.set_shape([None, None, 3])
    return image


def load_image(path: tf.Tensor, fast: tf.Tensor, size: int, policy: str,
               background: Sequence[int] = (255, 255, 255)) -> tf.Tensor:
    """One file to a [size, size, 3] float image: the decode and resize every tl-app path shares."""
    image = resize_images(decode_file(path, fast, background), size, policy)
    image.set_shape([size, size, 3])
    return image


def make_dataset(
    records: Sequence[Record],
    input_size: int,
    resize_policy: str = "auto",
    batch_size: int = 32,
    *,
    num_classes: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    with_index: bool = False,
    background: Sequence[int] = (255, 255, 255),
) -> tf.data.Dataset:
    """Batches of (images, one-hot labels[, record index]) or (images[, index]).

    Deterministic order unless ``shuffle``; parallel decode and resize; prefetch.
    A file that fails to decode here, or whose bytes are not the scanned ones
    (changed since the scan), is dropped, not fatal: callers that need
    alignment ask for ``with_index``.
    """
    paths = [r.path for r in records]
    fast = [bool(r.fast) for r in records]
    labels = [r.label_index for r in records]
    digests = [r.sha256 for r in records]
    index = list(range(len(records)))
    ds = tf.data.Dataset.from_tensor_slices((paths, fast, labels, index, digests))
    if shuffle:
        ds = ds.shuffle(max(1, len(records)), seed=seed, reshuffle_each_iteration=True)

    def load(path, is_fast, label, idx, sha256):
        image = resize_images(decode_checked(path, is_fast, sha256, background), input_size, resize_policy)
        image.set_shape([input_size, input_size, 3])
        return image, label, idx

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    ds = ds.ignore_errors()

    def arrange(image, label, idx):
        items = [image]
        if num_classes is not None:
            items.append(tf.one_hot(label, num_classes))
        if with_index:
            items.append(idx)
        return tuple(items) if len(items) > 1 else items[0]

    ds = ds.map(arrange, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_images(paths_or_records, input_size: int, resize_policy: str = "auto",
                background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """Decode a few images to one array, the same way the pipeline does (for tests, explain)."""
    out = []
    for item in paths_or_records:
        path = item.path if isinstance(item, Record) else str(item)
        image = decode_pil(path, background)
        out.append(resize_images(image, input_size, resize_policy).numpy())
    return np.stack(out) if out else np.zeros((0, input_size, input_size, 3), np.float32)
