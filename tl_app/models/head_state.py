"""The numbers of a k-NN or prototype head, and adding or removing a class with them (numpy only).

A few-shot head's whole state is a handful of arrays (models.fewshot_heads
holds them as Keras weights). Editing a class is arithmetic on those arrays,
so it lives here, without TensorFlow: ``tl-app classes add`` on a run edits
the saved model file directly (models.keras_archive), and the Keras layers
are rebuilt from the same results when a model is already in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS = 1e-12
# the layers' weights in creation order: the order Keras stores them in (vars/0, vars/1, ...)
VARIABLES = {"PrototypeHead": ("center", "prototypes", "whiten_center", "whitening"),
             "KnnHead": ("center", "memory", "memory_labels")}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


@dataclass
class HeadState:
    """``kind`` is the layer's class name; ``config`` its Keras config; ``arrays`` its weights by name."""

    kind: str
    config: dict
    arrays: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def variables(self) -> list[np.ndarray]:
        """The weights in the layer's storage order (a plain prototype head has no whitening)."""
        return [self.arrays[name] for name in VARIABLES[self.kind] if name in self.arrays]

    def embed(self, features) -> np.ndarray:
        """Features in the space a prototype head's means live in (normalised, then whitened if fitted)."""
        z = l2_normalize(np.asarray(features, np.float32) - self.arrays["center"])
        if self.config.get("whitened"):
            z = (z - self.arrays["whiten_center"]) @ self.arrays["whitening"]
        return z


def from_variables(kind: str, config: dict, variables: list) -> HeadState:
    names = VARIABLES[kind]
    return HeadState(kind, dict(config), {name: np.asarray(v, np.float32) for name, v in zip(names, variables)})


def added(state: HeadState, features) -> HeadState:
    """``state`` with one more class, from the new class's features only: the old space and classes are kept."""
    features = np.asarray(features, np.float32)
    arrays, config = dict(state.arrays), dict(state.config)
    config["num_classes"] = state.num_classes + 1
    if state.kind == "KnnHead":
        labels = np.concatenate([state.arrays["memory_labels"].argmax(1),
                                 np.full(len(features), state.num_classes)])
        arrays["memory"] = np.concatenate([state.arrays["memory"], l2_normalize(features - arrays["center"])])
        arrays["memory_labels"] = np.eye(config["num_classes"], dtype=np.float32)[labels]
        config["size"] = int(len(labels))
    else:
        z = state.embed(features)
        new = z.mean(0) if config.get("whitened") else l2_normalize(z.mean(0, keepdims=True))[0]
        arrays["prototypes"] = np.concatenate([state.arrays["prototypes"], new[None]]).astype(np.float32)
    return HeadState(state.kind, config, arrays)


def removed(state: HeadState, index: int) -> HeadState:
    """``state`` without class ``index``; the other classes keep their order."""
    arrays, config = dict(state.arrays), dict(state.config)
    config["num_classes"] = state.num_classes - 1
    if state.kind == "KnnHead":
        labels = state.arrays["memory_labels"].argmax(1)
        keep = labels != index
        labels = labels[keep] - (labels[keep] > index)
        arrays["memory"] = state.arrays["memory"][keep]
        arrays["memory_labels"] = np.eye(config["num_classes"], dtype=np.float32)[labels]
        config["size"] = int(keep.sum())
    else:
        arrays["prototypes"] = np.delete(state.arrays["prototypes"], index, axis=0)
    return HeadState(state.kind, config, arrays)
