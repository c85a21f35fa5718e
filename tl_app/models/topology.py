"""Weight import by topology: a file's tensors mapped onto a model's layers in order.

Layer names only help when a file was saved from the same Keras model class.
Weights exported from another framework or another model (HED's VGG16 trunk
stores ``block1/layers/conv2d/vars/0``) carry the right tensors under other
names; here they are matched by position and checked by shape instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from tl_app.core.errors import TlAppError


def _natural(text: str) -> list:
    """conv2d_2 before conv2d_10: numbers inside names compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def file_layers(path: str | Path) -> list[tuple[str, list[np.ndarray]]]:
    """(layer name, tensors) in the file's order.

    Legacy Keras files list their layers and weights in attributes; other HDF5
    files are read as groups of tensors, in natural order of their paths
    (the trailing ``vars`` of Keras-3 files is dropped from the name).
    """
    with h5py.File(path, "r") as handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" in root.attrs:
            layers = []
            for raw in root.attrs["layer_names"]:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                group = root[name]
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
                if names:
                    layers.append((name, [np.asarray(group[n]) for n in names]))
            return layers
        tensors: dict[str, list[tuple[str, np.ndarray]]] = {}

        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                parent, _, leaf = name.rpartition("/")
                tensors.setdefault(parent, []).append((leaf, np.asarray(item)))

        root.visititems(visit)
    layers = []
    for parent in sorted(tensors, key=_natural):
        items = sorted(tensors[parent], key=lambda item: _natural(item[0]))
        name = parent[: -len("/vars")] if parent.endswith("/vars") else parent
        layers.append((name or "/", [array for _, array in items]))
    return layers


def model_layers(model) -> list:
    """The model's layers that hold weights, in the model's order (nested models flattened)."""
    found = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            found.extend(model_layers(layer))
        elif layer.weights:
            found.append(layer)
    return found


def _shapes(arrays) -> str:
    return " ".join("x".join(str(d) for d in shape) or "scalar" for shape in arrays)


def mismatch_table(pairs: list[tuple], at: int) -> str:
    """The rows around the first mismatch, the mismatching one marked."""
    rows = [f"  {'#':>3}  {'model layer':<22} {'model shapes':<28} {'file layer':<34} file shapes"]
    for index in range(max(0, at - 3), min(len(pairs), at + 2)):
        model_name, model_shapes, file_name, file_shapes = pairs[index]
        mark = ">>" if index == at else "  "
        rows.append(f"{mark}{index:>3}  {model_name:<22} {model_shapes:<28} {file_name:<34} {file_shapes}")
    return "\n".join(rows)


def assign_by_order(model, path: str | Path, label: str = "the model") -> dict:
    """Set every weighted layer of ``model`` from the file's layers, in order.

    Every shape is checked before anything is set; file layers left over once
    the model is full are skipped and reported by name. A topology that differs
    is refused with a table of the first mismatch.
    """
    source = file_layers(path)
    targets = model_layers(model)
    pairs, chosen = [], []
    for index, layer in enumerate(targets):
        expected = [tuple(w.shape) for w in layer.weights]
        if index >= len(source):
            pairs.append((layer.name, _shapes(expected), "(nothing left in the file)", ""))
            raise TlAppError(_refusal(path, label, pairs, index, len(targets), len(source)))
        name, arrays = source[index]
        got = [tuple(a.shape) for a in arrays]
        pairs.append((layer.name, _shapes(expected), name, _shapes(got)))
        if got != expected:
            raise TlAppError(_refusal(path, label, pairs, index, len(targets), len(source)))
        chosen.append((layer, arrays))
    for layer, arrays in chosen:
        layer.set_weights(arrays)
    skipped = [name for name, _ in source[len(targets):]]
    return {"matched": len(targets), "skipped": skipped,
            "pairs": [(model_name, file_name) for model_name, _, file_name, _ in pairs]}


def _refusal(path, label, pairs, at, n_model, n_file) -> str:
    return (
        f"{path} does not have the topology of {label}: its weighted layers, taken in order, stop "
        f"matching at layer {at} ({n_model} weighted layers in the model, {n_file} in the file).\n"
        f"{mismatch_table(pairs, at)}\n"
        f"Expected a file whose layers come in the model's order with the same shapes "
        f"(extra layers may follow at the end). If the file was saved from the same Keras model "
        f"class, import it with --match name instead."
    )
