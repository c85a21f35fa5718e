"""The out-of-distribution scorer carried by a model, as a Keras layer: k-NN cosine or Mahalanobis distance.

Both are fitted on the training split's backbone features (the output of the
layer that feeds the head):
- ``knn`` (the default): 1 - cosine similarity to the k-th nearest training
  feature (models.knn_score);
- ``mahalanobis``: the smallest squared Mahalanobis distance to a class mean,
  one shared (shrunk) covariance.
On the sample's out-of-distribution family with hed-vgg16 features (bench/bench_ood.py,
128 px) k-NN reached AUROC 0.91 against 0.75 for Mahalanobis and 0.49 for max-softmax:
it assumes no Gaussian shape per class, which a few dozen images of 512 features
cannot pin down. Training stores the scorer in ``ood.npz`` next to run.json and a
threshold chosen on validation; export adds the score as a second named output,
so every format that can carry it answers "unknown" the same way. A layer (not a
Lambda) keeps the model loadable in Keras safe mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tl_app.core.config import OODS  # noqa: F401  (the choices live with the defaults)
from tl_app.models.knn_score import Knn, KnnScore, fit_knn, knn_layer  # noqa: F401  (fit_knn: a scorer's fitter)

OOD_FILE = "ood.npz"  # next to run.json: the scorer's bank (k-NN) or means and precision (Mahalanobis)
SCORED = ("knn", "mahalanobis")  # the methods that put a score in the model
ACCEPTANCE = 0.95  # the share of in-distribution images the threshold lets through
SHRINKAGE = None  # None: Ledoit-Wolf's, at least dim / (images + dim), towards the mean variance
LAYER_NAME = "ood_score"
PROBABILITIES = "probabilities"
UNKNOWN_LABEL = "unknown"
VERDICT = "unknown"  # the bool output: ood_score above the threshold


@dataclass
class Mahalanobis:
    """Class means and the precision matrix of their shared (shrunk) covariance."""

    means: np.ndarray  # [C, D]
    precision: np.ndarray  # [D, D]
    shrinkage: float | None = None  # the covariance's shrinkage when it was fitted here

    def score(self, features) -> np.ndarray:
        """Smallest squared distance to a class mean (float64): (x - m)^T P (x - m) via P = L L^T."""
        y = np.asarray(features, np.float64) @ self.factor()
        centres = self.means @ self.factor()
        return np.min(((y[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1), axis=1)

    def factor(self) -> np.ndarray:
        return precision_factor(self.precision)


def precision_factor(precision) -> np.ndarray:
    """L with L L^T = precision (Cholesky, or the symmetric square root for a semi-definite one)."""
    p = np.asarray(precision, np.float64)
    p = (p + p.T) / 2.0
    try:
        return np.linalg.cholesky(p)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(p)
        return vectors * np.sqrt(np.clip(values, 0.0, None))


def ledoit_wolf_shrinkage(centred) -> float:
    """Ledoit-Wolf's intensity towards mu*I for the covariance of ``centred`` rows (1 when it cannot tell).

    With more feature dimensions than images (the usual case here) the sample covariance is
    mostly noise, and a fixed small shrinkage makes held-out images look as far as outliers.
    """
    x = np.asarray(centred, np.float64)
    n, p = x.shape
    if n < 2:
        return 1.0
    s = x.T @ x / n
    mu = np.trace(s) / p
    s2 = float(np.sum(s * s))
    d2 = (s2 - p * mu * mu) / p
    if not d2 > 0:
        return 1.0
    b2 = (float(np.sum(np.sum(x * x, axis=1) ** 2)) - n * s2) / (n * n * p)
    return float(np.clip(min(b2, d2) / d2, 0.0, 1.0))


def fit_mahalanobis(features, labels, shrinkage: float | None = None) -> Mahalanobis:
    """Class means and a shared covariance shrunk towards its mean variance.

    Unless given, the shrinkage is Ledoit-Wolf's but at least dim / (images + dim): with 31 images
    of 512 features (the tests' sample) held-out shapes looked farther than noise at 0.1 (AUROC 0.63
    on hed-vgg16 features) and were separated at 0.95 (AUROC 1.0).
    """
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels, int)
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    covariance = centred.T @ centred / max(1, len(x))
    target = np.trace(covariance) / covariance.shape[0]
    if not target > 0:  # identical features (e.g. a constant backbone): any positive scale keeps P finite
        target = 1.0
    if shrinkage is None:  # at least p / (n + p): with few images per dimension, most directions are unseen
        shrinkage = max(ledoit_wolf_shrinkage(centred), x.shape[1] / (len(x) + x.shape[1]))
    covariance = (1 - shrinkage) * covariance + shrinkage * target * np.eye(covariance.shape[0])
    return Mahalanobis(means, np.linalg.pinv(covariance, hermitian=True), float(shrinkage))


def acceptance_threshold(inside, acceptance: float = ACCEPTANCE) -> float:
    """The score at or below which ``acceptance`` of the in-distribution images fall."""
    return float(np.quantile(np.asarray(inside, np.float64), acceptance, method="higher"))


def save_scorer(scorer: Mahalanobis | Knn, path: Path) -> None:
    if isinstance(scorer, Knn):
        np.savez(path, bank=scorer.bank.astype(np.float32), k=np.int64(scorer.k))
        return
    np.savez(path, means=scorer.means.astype(np.float64), precision=scorer.precision.astype(np.float64))


def load_scorer(path: Path) -> Mahalanobis | Knn:
    with np.load(path) as data:
        if "bank" in data:
            return Knn(np.asarray(data["bank"]), int(data["k"]))
        return Mahalanobis(np.asarray(data["means"]), np.asarray(data["precision"]))


# ---- in the graph ---------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tl_app")
class MahalanobisScore(keras.layers.Layer):
    """features [N, D] -> min over classes of ||x L - m L||^2 [N]; holds L (D x D) and the projected means.

    The difference is taken before squaring (no x^T P x - 2 x^T P m cancellation), so float32
    formats agree with each other to the parity gate's tolerance. ``threshold`` travels in the config.
    """

    def __init__(self, num_classes: int, dim: int, threshold: float | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.threshold = None if threshold is None else float(threshold)
        self.factor = self.add_weight(name="factor", shape=(self.dim, self.dim), initializer="zeros",
                                      trainable=False)
        self.centres = self.add_weight(name="centres", shape=(self.num_classes, self.dim), initializer="zeros",
                                       trainable=False)

    def call(self, features):
        x = keras.ops.cast(features, "float32")
        y = keras.ops.matmul(x, self.factor)
        diff = keras.ops.expand_dims(y, 1) - keras.ops.expand_dims(self.centres, 0)
        return keras.ops.min(keras.ops.sum(diff * diff, axis=-1), axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dim": self.dim,
                "threshold": self.threshold}


def feature_output(model):
    """The output of the layer that feeds the head, or None (a model with no 'head' layer)."""
    names = [layer.name for layer in model.layers]
    if "head" not in names or names.index("head") == 0:
        return None
    return model.layers[names.index("head") - 1].output


def feature_model(model):
    """image -> backbone features (what the head sees), or None for a model without a 'head' layer."""
    base = without_ood(model)
    out = feature_output(base)
    return None if out is None else keras.Model(base.input, out)


def ood_layer_of(model) -> MahalanobisScore | KnnScore | None:
    for layer in getattr(model, "layers", []):
        if isinstance(layer, (MahalanobisScore, KnnScore)):
            return layer
    for layer in getattr(model, "layers", []):  # a wrapper (test-time augmentation) holds the scored model
        if isinstance(layer, keras.Model):
            found = ood_layer_of(layer)
            if found is not None:
                return found
    return None


def without_ood(model):
    """The probabilities-only classifier inside a scored one (the model itself when it has no score)."""
    layer = ood_layer_of(model)
    if layer is None:
        return model
    outputs = model.output
    probabilities = outputs[PROBABILITIES] if isinstance(outputs, dict) else outputs[0]
    return keras.Model(model.input, probabilities, name=model.name)


def with_ood(model, scorer: Mahalanobis | Knn, threshold: float):
    """The classifier with two named outputs: ``probabilities`` and ``ood_score`` (one per image)."""
    base = without_ood(model)
    features = feature_output(base)
    if features is None:
        raise ValueError("the model has no 'head' layer after its backbone features: no OOD score can be attached")
    if isinstance(scorer, Knn):
        score = knn_layer(scorer, threshold, LAYER_NAME)(features)
    else:
        layer = MahalanobisScore(scorer.means.shape[0], scorer.means.shape[1], threshold, name=LAYER_NAME)
        score = layer(features)
        factor = scorer.factor()
        layer.factor.assign(factor.astype(np.float32))
        layer.centres.assign((scorer.means @ factor).astype(np.float32))
    return keras.Model(base.input, {PROBABILITIES: base.output, LAYER_NAME: score}, name=base.name)


def with_verdict(model):
    """For the converters (TFLite, ONNX-free Keras path): a scored model plus ``unknown`` (score > threshold).

    A model without a scorer, or whose scorer has no threshold, is returned as it is.
    """
    layer = ood_layer_of(model)
    if layer is None or layer.threshold is None:
        return model
    probabilities, score = split_outputs(model.output)
    unknown = keras.ops.greater(score, float(layer.threshold))
    return keras.Model(model.input, {PROBABILITIES: probabilities, LAYER_NAME: score, VERDICT: unknown},
                       name=model.name)


def split_outputs(outputs) -> tuple:
    """(probabilities, ood_score or None) of whatever a classifier returned."""
    if isinstance(outputs, dict):
        return outputs[PROBABILITIES], outputs.get(LAYER_NAME)
    if isinstance(outputs, (list, tuple)):
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)
    return outputs, None


def recorded_ood(info: dict, run_dir: Path | None) -> tuple[Mahalanobis | Knn, float] | None:
    """(scorer, threshold) of a run that recorded one in run.json and ood.npz, else None."""
    record = (info or {}).get("ood") or {}
    if record.get("method") not in SCORED or run_dir is None or not (Path(run_dir) / OOD_FILE).is_file():
        return None
    return load_scorer(Path(run_dir) / OOD_FILE), float(record["threshold"])


def unknown_flags(scores, threshold: float) -> np.ndarray:
    return np.asarray(scores, np.float64) > float(threshold)
