"""Reading and rewriting a few-shot head inside a saved ``.keras`` file, without TensorFlow.

A ``.keras`` file is a zip of ``config.json`` (the layers and their settings),
``metadata.json`` and ``model.weights.h5`` (every weight, one HDF5 dataset
each). A k-NN or prototype head is one layer whose settings (class count,
stored examples) and weights change when a class is added; the backbone's
tens of megabytes are copied unchanged. Doing this with zipfile, json and h5py
keeps ``tl-app classes add`` on a run to about a second, where loading
TensorFlow and the model took ten (bench/bench_fewshot.py). The result loads
in Keras like any saved model; the tests compare it with the Keras route.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import h5py

from tl_app.core.errors import TlAppError
from tl_app.models.head_state import VARIABLES, HeadState, from_variables

CONFIG, WEIGHTS = "config.json", "model.weights.h5"
# Keras names a layer's group in model.weights.h5 after its class, in snake case
GROUPS = {"PrototypeHead": "prototype_head", "KnnHead": "knn_head"}


def _layer_configs(node, found: list) -> list:
    """Every few-shot layer's config dict, wherever the (nested) model config holds it."""
    if isinstance(node, dict):
        if node.get("class_name") in VARIABLES and isinstance(node.get("config"), dict):
            found.append(node)
        for value in node.values():
            _layer_configs(value, found)
    elif isinstance(node, list):
        for value in node:
            _layer_configs(value, found)
    return found


def _head_group(weights: h5py.File, kind: str) -> str:
    groups = []
    weights.visit(lambda name: groups.append(name) if name.rsplit("/", 1)[-1] == GROUPS[kind] else None)
    if len(groups) != 1:
        raise TlAppError(f"expected one {GROUPS[kind]!r} group in the saved weights, found {len(groups)}")
    return groups[0]


def read_head(path: str | Path) -> HeadState | None:
    """The few-shot head of a saved ``.keras`` model, or None when it has none (a dense or logistic head)."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read(CONFIG))
        layers = _layer_configs(config, [])
        if not layers:
            return None
        if len(layers) > 1:
            raise TlAppError(f"{path} holds {len(layers)} k-NN/prototype layers; expected one head.")
        layer = layers[0]
        with tempfile.TemporaryDirectory(prefix="tl-app-keras-") as tmp:
            archive.extract(WEIGHTS, tmp)
            with h5py.File(Path(tmp) / WEIGHTS, "r") as weights:
                group = weights[_head_group(weights, layer["class_name"])]["vars"]
                variables = [group[str(i)][()] for i in range(len(group))]
    return from_variables(layer["class_name"], layer["config"], variables)


def write_with_head(source: str | Path, target: str | Path, state: HeadState) -> Path:
    """A copy of ``source`` whose few-shot head holds ``state`` (its settings and weights); nothing else changes."""
    source, target = Path(source), Path(target)
    with tempfile.TemporaryDirectory(prefix="tl-app-keras-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
            config = json.loads(archive.read(CONFIG))
            archive.extractall(tmp)
        (layer,) = _layer_configs(config, [])
        if layer["class_name"] != state.kind:
            raise TlAppError(f"{source} has a {layer['class_name']} head, not a {state.kind}.")
        layer["config"] = dict(state.config)
        (tmp / CONFIG).write_text(json.dumps(config))
        with h5py.File(tmp / WEIGHTS, "r+") as weights:
            group = weights[_head_group(weights, state.kind)]["vars"]
            for i, value in enumerate(state.variables()):
                del group[str(i)]
                group.create_dataset(str(i), data=value)
        partial = target.with_name(f".{target.name}.partial")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as out:
            for name in names:  # the order Keras wrote: metadata, config, weights
                out.write(tmp / name, name)
        os.replace(partial, target)
    return target
