"""A metric run's projection (features -> embedding) as plain numpy arrays, applied without TensorFlow.

``train --strategy metric`` learns a projection (Dense -> ReLU -> Dense -> unit
length) whose space gathers the images of a class. The similarity index, the
2-D maps and their queries use that space when pointed at the run; they read
it from ``projection.npz`` (written beside ``model.keras``, copied into exports
and into an index built with it), so a fully cached ``tl-app index`` or
``tl-app embed`` over embeddings still never imports TensorFlow. The arrays are
the trained layers' weights after the input standardisation was folded in:
``Projection(features)`` equals the Keras projection's output (tested).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tl_app.core.errors import TlAppError

PROJECTION_FILE = "projection.npz"
# a metric run that also trained backbone blocks (train.metric_backbone) keeps that backbone's weights here, so
# features for its projection come from the trained backbone, never from the pretrained one's feature cache
BACKBONE_FILE = "backbone.weights.h5"
ARRAYS = ("hidden_kernel", "hidden_bias", "embedding_kernel", "embedding_bias")


@dataclass(frozen=True)
class Projection:
    hidden_kernel: np.ndarray
    hidden_bias: np.ndarray
    embedding_kernel: np.ndarray
    embedding_bias: np.ndarray

    @property
    def input_dim(self) -> int:
        return int(self.hidden_kernel.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embedding_kernel.shape[1])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Unit-length embeddings, N x dim, of N x input_dim features (float32)."""
        x = np.asarray(features, np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise TlAppError(f"the projection expects {self.input_dim} features per image, got array of shape "
                             f"{x.shape}; the features must come from the backbone recipe the metric run used.")
        hidden = np.maximum(x @ self.hidden_kernel + self.hidden_bias, 0.0)
        z = hidden @ self.embedding_kernel + self.embedding_bias
        norms = np.sqrt(np.maximum(np.sum(z * z, axis=1, keepdims=True), 1e-12))  # as keras UnitNormalization
        return (z / norms).astype(np.float32)

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in ARRAYS:
            array = np.ascontiguousarray(getattr(self, name), np.float32)
            h.update(name.encode() + str(array.shape).encode() + array.tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Written to a temporary file and renamed, so a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".projection-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **{name: np.asarray(getattr(self, name), np.float32) for name in ARRAYS})
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Projection":
        try:
            with np.load(path) as data:
                return cls(*(np.asarray(data[name], np.float32) for name in ARRAYS))
        except (OSError, KeyError, ValueError) as exc:
            raise TlAppError(f"{path} is not a readable projection ({exc}); train the metric run again "
                             f"(tl-app train DATA --strategy metric).") from exc


def projection_in(*folders: str | Path | None) -> Projection | None:
    """The projection saved in the first of ``folders`` that has one (a run, a model version, an index)."""
    for folder in folders:
        if folder is not None and (Path(folder) / PROJECTION_FILE).is_file():
            return Projection.load(Path(folder) / PROJECTION_FILE)
    return None
