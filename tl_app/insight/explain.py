"""Heat maps that show which pixels a prediction rests on: Grad-CAM and occlusion.

Grad-CAM weights the last convolutional block of the backbone
(``BackboneSpec.last_conv_layer``) by the gradient of the class score (the
pre-softmax logit); occlusion slides a grey patch over the image and records
how much the class probability drops.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tl_app.core.errors import ConfigError, TlAppError, unknown_choice
from tl_app.models.backbones import REGISTRY
from tl_app.models.opener import open_model
from tl_app.data.images import decode_pil
from tl_app.data.pipeline import resize_images
from tl_app.insight.plots import explanation_figure

METHODS = ("gradcam", "occlusion")
DISPLAY_SIZE = 224


class GradCam:
    """Grad-CAM for the assembled classifier (image -> preprocess -> backbone -> pool -> head)."""

    def __init__(self, model, backbone_name: str = "", conv_layer: str = ""):
        import keras

        self.model = model
        backbone = self._find_backbone(model, backbone_name)
        names = [layer.name for layer in backbone.layers]
        if not conv_layer:
            conv_layer = self._default_conv_layer(backbone, backbone_name)
        if conv_layer not in names:
            raise ConfigError(unknown_choice(f"layer of {backbone.name}", conv_layer, names))
        self.conv_layer = conv_layer
        self.inner = keras.Model(backbone.inputs, [backbone.get_layer(conv_layer).output, backbone.output])
        self.preprocess = self._optional(model, "preprocess")
        self.pool = self._optional(model, "pool")
        head = self._optional(model, "head")
        if head is None:
            raise TlAppError(
                f"Model {model.name!r} has no 'head' layer: Grad-CAM expects a tl-app classifier "
                f"(image -> preprocess -> backbone -> pool -> head). Use --method occlusion instead."
            )
        self.head = head
        self.logits = self._logit_fn(head)

    @property
    def map_shape(self) -> tuple[int, int]:
        """Height and width of the heat map (the conv layer's output)."""
        return tuple(int(d) for d in self.inner.outputs[0].shape[1:3])

    @staticmethod
    def _optional(model, name):
        try:
            return model.get_layer(name)
        except ValueError:
            return None

    @staticmethod
    def _find_backbone(model, name: str):
        import keras

        if name:
            try:
                return model.get_layer(name)
            except ValueError:
                pass
        nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "head"]
        if not nested:
            raise TlAppError(f"Model {model.name!r} has no nested backbone model; Grad-CAM cannot find its convolutions.")
        return nested[0]

    @staticmethod
    def _default_conv_layer(backbone, backbone_name: str) -> str:

        spec = REGISTRY.get(backbone_name or backbone.name)
        names = [layer.name for layer in backbone.layers]
        if spec is not None and spec.last_conv_layer in names:
            return spec.last_conv_layer
        spatial = [layer.name for layer in backbone.layers if len(layer.output.shape) == 4]
        return spatial[-1]

    @staticmethod
    def _logit_fn(head):
        """Pre-softmax class scores: softmax saturates, logits keep a usable gradient."""
        import keras
        from keras import ops

        try:
            last = head.get_layer("probabilities")
        except ValueError:
            return lambda features: ops.log(ops.clip(head(features, training=False), 1e-7, 1.0))
        penultimate = keras.Model(head.inputs, last.input)

        def logits(features):
            hidden = penultimate(features, training=False)
            out = ops.matmul(ops.cast(hidden, "float32"), ops.cast(last.kernel, "float32"))
            return out + ops.cast(last.bias, "float32") if last.use_bias else out

        return logits

    def __call__(self, images: np.ndarray, class_indices=None) -> tuple[np.ndarray, np.ndarray]:
        """Heat maps in [0, 1] (N x h x w of the conv block) and the class probabilities.

        ``class_indices`` None explains each image's top class (one forward pass either way).
        """
        import tensorflow as tf
        from keras import ops

        x = tf.convert_to_tensor(np.asarray(images, np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            inputs = self.preprocess(x) if self.preprocess is not None else x
            conv, features = self.inner(inputs, training=False)
            pooled = self.pool(features) if self.pool is not None else features
            scores = self.logits(pooled)
            targets = (tf.argmax(scores, axis=1, output_type=tf.int32) if class_indices is None
                       else tf.constant(np.asarray(class_indices), tf.int32))
            chosen = tf.gather(scores, targets, axis=1, batch_dims=1)
        grads = tape.gradient(chosen, conv)
        probs = ops.convert_to_numpy(self.head(pooled, training=False))
        conv = tf.cast(conv, tf.float32)
        weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1)).numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
        cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
        return cam, probs


def occlusion_map(model, image: np.ndarray, class_index: int, patch: int = 16, stride: int = 8,
                  batch_size: int = 64) -> tuple[np.ndarray, float]:
    """Mean drop of the class probability when a patch covers each pixel; scaled to [0, 1].

    Returns (heat map at the image size, probability of the class on the intact image).
    """
    height, width = image.shape[:2]
    if patch < 1 or stride < 1:
        raise ConfigError(f"--patch and --stride must be positive pixel counts, got {patch} and {stride}.")
    patch = min(patch, height, width)

    def starts(size):
        values = list(range(0, size - patch + 1, stride))
        if values[-1] != size - patch:
            values.append(size - patch)
        return values

    positions = [(y, x) for y in starts(height) for x in starts(width)]
    fill = image.reshape(-1, 3).mean(axis=0)
    base = float(np.asarray(model.predict_on_batch(image[None].astype(np.float32)))[0, class_index])
    drop = np.zeros((height, width), np.float64)
    count = np.zeros((height, width), np.float64)
    for begin in range(0, len(positions), batch_size):
        chunk = positions[begin:begin + batch_size]
        batch = np.repeat(image[None].astype(np.float32), len(chunk), axis=0)
        for n, (y, x) in enumerate(chunk):
            batch[n, y:y + patch, x:x + patch] = fill
        probs = np.asarray(model.predict_on_batch(batch))[:, class_index]
        for (y, x), p in zip(chunk, probs):
            drop[y:y + patch, x:x + patch] += base - float(p)
            count[y:y + patch, x:x + patch] += 1
    drop = np.divide(drop, count, out=np.zeros_like(drop), where=count > 0)
    heat = np.clip(drop, 0, None)
    peak = heat.max()
    return (heat / peak if peak > 0 else heat).astype(np.float32), base


def explain(model_path, images, method: str = "gradcam", class_name: str | None = None, patch: int = 16,
            stride: int = 8, out_dir: str | Path | None = None, echo=print, loaded=None) -> dict:
    """Write one PNG per image (input | heat map | overlay); bad files are listed, not fatal."""
    say = echo or (lambda *a, **k: None)
    if method not in METHODS:
        raise ConfigError(unknown_choice("explanation method", method, METHODS))
    loaded = loaded or open_model(model_path, keras=True)
    if class_name is not None and class_name not in loaded.classes:
        raise ConfigError(unknown_choice("class", class_name, loaded.classes))
    out = Path(out_dir) if out_dir else (
        loaded.run_dir / "explanations" if loaded.run_dir is not None else Path("explanations") / loaded.label)
    out.mkdir(parents=True, exist_ok=True)
    cam = GradCam(loaded.model, loaded.backbone) if method == "gradcam" else None
    background = tuple(loaded.config.data.background) if loaded.config is not None else (255, 255, 255)
    results, skipped = [], []
    for n, path in enumerate(images):
        try:
            decoded = decode_pil(str(path), background=background)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            skipped.append({"path": str(path), "reason": f"could not be read as an image: {exc}"})
            continue
        model_input = resize_images(decoded, loaded.input_size, loaded.resize_policy).numpy()
        display = resize_images(decoded, max(DISPLAY_SIZE, loaded.input_size), loaded.resize_policy).numpy()
        wanted = loaded.classes.index(class_name) if class_name else None
        if cam is not None:
            heats, probs = cam(model_input[None], None if wanted is None else [wanted])
            heat, probs = heats[0], probs[0]
            index = int(np.argmax(probs)) if wanted is None else wanted
        else:
            probs = np.asarray(loaded.model.predict_on_batch(model_input[None]))[0]
            index = int(np.argmax(probs)) if wanted is None else wanted
            heat, _ = occlusion_map(loaded.model, model_input, index, patch, stride)
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        name = f"{n:03d}_{Path(path).stem}_{method}.png"
        title = (f"{Path(path).name}: {method} for {loaded.classes[index]!r} (p={probs[index]:.2f}); "
                 f"top class {loaded.classes[int(np.argmax(probs))]!r}")
        explanation_figure(display, heat, out / name, title)
        results.append({
            "image": str(path), "method": method, "class": loaded.classes[index],
            "probability": float(probs[index]), "predicted": loaded.classes[int(np.argmax(probs))],
            "heatmap_shape": list(heat.shape),
            "peak": [float((peak[0] + 0.5) / heat.shape[0]), float((peak[1] + 0.5) / heat.shape[1])],
            "png": str(out / name),
        })
        say(f"{path}: {loaded.classes[index]} p={probs[index]:.3f} -> {out / name}")
    summary = {"model": str(loaded.source), "method": method, "out_dir": str(out), "results": results,
               "skipped": skipped}
    if cam is not None:
        summary["conv_layer"] = cam.conv_layer
        if results and results[0]["heatmap_shape"] == [1, 1]:
            summary["warning"] = (f"{cam.conv_layer} is 1x1 at input size {loaded.input_size}: Grad-CAM has no "
                                  f"spatial detail here; use --method occlusion or a larger input size.")
            say("warning: " + summary["warning"])
    for item in skipped:
        say(f"skipped {item['path']}: {item['reason']}")
    (out / f"explanations_{method}.json").write_text(json.dumps(summary, indent=2))
    return summary
