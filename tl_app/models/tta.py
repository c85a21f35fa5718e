"""Test-time augmentation: a classifier's probabilities averaged over fixed views of each image.

The views, in this order (``--tta N`` takes the first N): the image itself, its
horizontal flip, five crops of side ``round(CROP_FRACTION * size)`` (centre,
top-left, top-right, bottom-left, bottom-right) resized back to the input size
(bilinear), then the flips of those five crops. They are deterministic, so an
exported model and ``tl-app predict --tta`` answer the same.

The OOD score (and the "unknown" verdict) is the first view's, the image itself:
its threshold was chosen on un-augmented validation images, and an average over
crops would move the score away from what that threshold measured.

One view function serves both paths: the Python path (predict/evaluate: one
model call per view, so memory stays that of one pass) and the in-graph path
(``with_tta``: a Keras model whose layers build the views, run the classifier on
all of them as one batch and average; saved in .keras, SavedModel, TFLite, ONNX).
"""

from __future__ import annotations

import keras
import numpy as np

from tl_app.core.config import TTA_VIEWS
from tl_app.core.errors import ConfigError
from tl_app.models.ood import LAYER_NAME as OOD_SCORE, PROBABILITIES, split_outputs

CROP_FRACTION = 0.875  # the side of each crop, as a share of the input size (224 of 256, the usual ten-crop)
CROPS = ("centre", "top-left", "top-right", "bottom-left", "bottom-right")
VIEW_NAMES = ("image", "flip", *(f"crop-{c}" for c in CROPS), *(f"flip-crop-{c}" for c in CROPS))
assert len(VIEW_NAMES) == TTA_VIEWS


def view_names(views: int) -> list[str]:
    return list(VIEW_NAMES[:views])


def check_views(views, what: str = "--tta") -> int:
    """The number of views, or a clear error (what was expected, what was received)."""
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or not 1 <= int(views) <= TTA_VIEWS:
        raise ConfigError(f"{what} must be a whole number from 1 to {TTA_VIEWS} (the views: "
                          f"{', '.join(VIEW_NAMES)}; 1 = a single pass), got {views!r}.")
    return int(views)


def crop_box(size: int, crop: str) -> tuple[int, int, int]:
    """(top, left, side) of one named crop of a size x size image."""
    side = max(1, int(round(CROP_FRACTION * size)))
    far = size - side
    top = {"centre": far // 2, "top-left": 0, "top-right": 0, "bottom-left": far, "bottom-right": far}[crop]
    left = {"centre": far // 2, "top-left": 0, "top-right": far, "bottom-left": 0, "bottom-right": far}[crop]
    return top, left, side


def view(images, index: int):
    """View ``index`` of a batch of square images [N, size, size, 3] (any backend tensor or array)."""
    name = VIEW_NAMES[index]
    size = int(images.shape[1])
    x = keras.ops.convert_to_tensor(images, "float32")
    if "crop" in name:
        top, left, side = crop_box(size, name.rsplit("crop-", 1)[1])
        x = x[:, top:top + side, left:left + side, :]
        x = keras.ops.image.resize(x, (size, size), interpolation="bilinear", antialias=False)
    if name.startswith("flip"):
        x = keras.ops.flip(x, axis=2)
    return x


def average_views(run, images, views: int):
    """The Python path: ``run`` (images -> probabilities, or {probabilities, ood_score}) once per view;
    the mean probabilities, and the first view's ood_score when ``run`` gives one."""
    total, score = None, None
    for index in range(views):
        probabilities, found = split_outputs(run(view(images, index) if index else images))
        probabilities = np.asarray(probabilities, np.float64)
        total = probabilities if total is None else total + probabilities
        if index == 0:
            score = found
    mean = (total / views).astype(np.float32)
    return mean if score is None else {PROBABILITIES: mean, OOD_SCORE: np.asarray(score)}


def tta_function(run, views: int):
    """``run`` averaged over ``views`` views (``run`` itself for one view: today's single pass)."""
    if views <= 1:
        return run
    return lambda images: average_views(run, images, views)


# ---- in the graph --------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tl_app")
class TtaViews(keras.layers.Layer):
    """[N, size, size, 3] -> [views * N, size, size, 3]: the views stacked view after view."""

    def __init__(self, views: int = 1, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.views = check_views(views, "views")

    def call(self, images):
        return keras.ops.concatenate([view(images, k) if k else images for k in range(self.views)], axis=0)

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "views": self.views}


@keras.saving.register_keras_serializable(package="tl_app")
class TtaReduce(keras.layers.Layer):
    """[views * N, ...] -> [N, ...]: the mean over the views ("mean"), or the first view's rows ("first")."""

    def __init__(self, views: int = 1, reduce: str = "mean", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.views = check_views(views, "views")
        if reduce not in ("mean", "first"):
            raise ValueError(f"reduce must be 'mean' or 'first', got {reduce!r}")
        self.reduce = reduce

    def call(self, values):
        x = keras.ops.cast(values, "float32")
        grouped = keras.ops.reshape(x, (self.views, -1, *x.shape[1:]))
        return keras.ops.mean(grouped, axis=0) if self.reduce == "mean" else grouped[0]

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "views": self.views, "reduce": self.reduce}


def with_tta(model, views: int):
    """The classifier with its views built, run as one batch and averaged inside the graph (``model`` itself
    for one view). A scored model keeps its two named outputs; ood_score is the first view's."""
    views = check_views(views, "export.tta")
    if views == 1:
        return model
    inputs = keras.Input(shape=tuple(model.input_shape[1:]), dtype="float32", name="images")
    probabilities, score = split_outputs(model(TtaViews(views, name="tta_views")(inputs)))
    mean = TtaReduce(views, "mean", name="tta_mean")(probabilities)
    if score is None:
        return keras.Model(inputs, mean, name=f"{model.name}_tta")
    first = TtaReduce(views, "first", name="tta_first_view")(score)
    return keras.Model(inputs, {PROBABILITIES: mean, OOD_SCORE: first}, name=f"{model.name}_tta")


def tta_of(model) -> int:
    """The views a model averages in its graph (1 when it has no TtaViews layer)."""
    for layer in getattr(model, "layers", []):
        if isinstance(layer, TtaViews):
            return layer.views
    return 1


def without_tta(model):
    """The single-pass classifier inside a TTA model (the model itself when it has none)."""
    if tta_of(model) == 1:
        return model
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def card_views(card: dict | None) -> int:
    """The views an exported model averages in its graph, as its card records them (1: single pass)."""
    record = (card or {}).get("tta") or {}
    return int(record.get("views", 1)) if isinstance(record, dict) else 1


def tta_card(views: int) -> dict:
    """What the model card says about test-time augmentation."""
    if views <= 1:
        return {"views": 1, "description": "single pass (exported without --tta)"}
    return {"views": views, "order": view_names(views), "crop_fraction": CROP_FRACTION,
            "description": ("probabilities averaged over these views inside every exported format (SavedModel, "
                            ".keras, TFLite, ONNX); crops are resized back to input_size (bilinear); flips are "
                            "horizontal"),
            "ood_score": "the first view's (the image itself), so the threshold means what it meant at training",
            "cost": f"{views} model passes per image"}


def views_to_run(requested: int, card: dict | None) -> int:
    """Views the Python path must average: ``requested``, unless the model already averages in its graph
    (then 1, and asking for more is refused: it would average averages)."""
    requested = check_views(requested)
    built_in = card_views(card)
    if built_in > 1 and requested > 1:
        raise ConfigError(f"This model already averages {built_in} views in its graph (exported with --tta "
                          f"{built_in}); --tta {requested} would average again. Drop --tta, or export the run "
                          f"again without --tta to choose the views at prediction time.")
    return requested
