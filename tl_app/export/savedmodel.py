"""The SavedModel module: a byte signature (encoded images) and a pixel signature,
with resize and backbone preprocessing inside the graph.
"""

from __future__ import annotations

from pathlib import Path
from tl_app.models.artifacts import BYTES_SIGNATURE, PIXELS_SIGNATURE
from tl_app.data.pipeline import effective_policy, resize_images
from tl_app.data.decode import decode_bytes
from tl_app.models.ood import UNKNOWN_LABEL, ood_layer_of, split_outputs


# ---- the SavedModel -----------------------------------------------------------
def build_serving_module(model, classes: list[str], input_size: int, resize_policy: str,
                         background=(255, 255, 255), decode=decode_bytes):
    """A tf.Module whose tf.functions carry decode + resize + the model.

    The byte signature decodes with data.decode, training's own graph decoder:
    EXIF orientation, transparency on the run's background, 16-bit and
    grayscale give training's pixels; what it cannot match (CMYK JPEG,
    transparent GIF, other formats) is refused with an InvalidArgument error.
    ``decode`` exists for the parity gate's own test (a deliberately broken decoder).
    """
    import tensorflow as tf


    layer = ood_layer_of(model)
    threshold = None if layer is None or layer.threshold is None else float(layer.threshold)
    policy = effective_policy(resize_policy)
    background = tuple(int(v) for v in background)
    size = int(input_size)

    class ServingModule(tf.Module):
        def __init__(self):
            super().__init__(name="tl_app_classifier")
            self.model = model
            self.class_list = tf.constant(list(classes), dtype=tf.string)

        def _outputs(self, images):
            probabilities, score = split_outputs(self.model(images, training=False))
            probabilities = tf.cast(probabilities, tf.float32)
            index = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
            n = tf.shape(probabilities)[0]
            out = {
                "probabilities": probabilities,
                "class_index": index,
                "class_name": tf.gather(self.class_list, index),
                "class_names": tf.tile(self.class_list[tf.newaxis, :], tf.stack([n, 1])),
            }
            if score is not None:  # the OOD scorer: a score per image, and the verdict at the card's threshold
                score = tf.cast(score, tf.float32)
                unknown = score > threshold if threshold is not None else tf.zeros_like(score, tf.bool)
                out.update(ood_score=score, unknown=unknown,
                           label=tf.where(unknown, tf.constant(UNKNOWN_LABEL), out["class_name"]))
            return out

        def _resize_batch(self, images):
            images = tf.cast(images, tf.float32)
            shape = tf.shape(images)
            same = tf.logical_and(tf.equal(shape[1], size), tf.equal(shape[2], size))
            out = tf.cond(same, lambda: tf.clip_by_value(images, 0.0, 255.0),
                          lambda: resize_images(images, size, policy))
            out.set_shape([None, size, size, 3])
            return out

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve_bytes(self, image_bytes):
            def decode_one(data):
                image = decode(data, tf.constant(list(background), tf.int32))
                resized = resize_images(image, size, policy)
                resized.set_shape([size, size, 3])
                return resized

            # A few images decode at once: parallel enough, and full-size decodes stay bounded in memory.
            images = tf.map_fn(decode_one, image_bytes, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
                               parallel_iterations=8)
            return self._outputs(images)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        def serve_pixels(self, images):
            return self._outputs(self._resize_batch(images))

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
        def plain_outputs(self, images):
            """The model for the ONNX converter: fixed size, numbers only (probabilities, ood_score, unknown)."""
            probabilities, score = split_outputs(self.model(images, training=False))
            out = {"probabilities": tf.cast(probabilities, tf.float32)}
            if score is not None and threshold is not None:
                out.update(ood_score=tf.cast(score, tf.float32), unknown=tf.cast(score, tf.float32) > threshold)
            return out

    return ServingModule()


def save_savedmodel(module, directory: Path) -> None:
    import tensorflow as tf

    signatures = {
        BYTES_SIGNATURE: module.serve_bytes.get_concrete_function(),
        PIXELS_SIGNATURE: module.serve_pixels.get_concrete_function(),
    }
    tf.saved_model.save(module, str(directory), signatures=signatures)
