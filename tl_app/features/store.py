"""The export format of extracted features (features.npy, index.csv, views.npy, meta.json)
and its loader, which needs numpy alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
import numpy as np
from tl_app.data.manifest import Manifest, Record, Skipped
from tl_app.core.errors import TlAppError
from tl_app.core.files import atomic_write_bytes, atomic_write_text, temporary_sibling
from tl_app.features.recipe import FORMAT_VERSION


INDEX_COLUMNS = ["row", "path", "relpath", "label", "label_index", "split", "sha256", "format",
                 "width", "height", "fast", "view_row"]


# ---- extraction -------------------------------------------------------------------
@dataclass
class FeatureSet:
    """Features aligned with records; ``views`` holds cached augmented views of training images."""

    features: np.ndarray  # [N, D]
    records: list[Record]
    classes: list[str]
    out_dir: Path | None = None
    stats: dict = field(default_factory=dict)
    views: np.ndarray | None = None  # [T, K, D]
    view_rows: np.ndarray | None = None  # [N]: row in views, -1 for none
    recipe: dict = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    feature_model: Any = field(default=None, repr=False)  # the backbone model, when this run built one

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label_index for r in self.records], np.int64)

    def rows(self, split: str) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r.split == split], np.int64)


class OutputArrays:
    """Where features land: memory, or memory-mapped temporary files in the export folder."""

    def __init__(self, out_dir: Path | None, count: int, dim: int):
        self.out_dir = out_dir
        self.dim = dim
        self.temps: list[Path] = []
        self.features = self._allocate("features.npy", (count, dim))
        self.views: np.ndarray | None = None

    def _allocate(self, name: str, shape: tuple) -> np.ndarray:
        if self.out_dir is None:
            return np.zeros(shape, np.float32)
        tmp = temporary_sibling(self.out_dir / name)
        self.temps.append(tmp)
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)

    def allocate_views(self, count: int, k: int) -> None:
        self.views = self._allocate("views.npy", (count, k, self.dim))

    def temp_for(self, array: np.ndarray) -> Path | None:
        return Path(array.filename) if isinstance(array, np.memmap) and array.filename else None

    def cleanup(self) -> None:
        for tmp in self.temps:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def _finish_array(store: OutputArrays, array: np.ndarray, rows: list[int] | None, target: Path,
                  dtype: str) -> None:
    """Move a temporary float32 array into place as ``target`` (dropping rows, converting dtype) in chunks."""
    source_path = store.temp_for(array)
    count = len(rows) if rows is not None else len(array)
    if source_path is not None and rows is None and dtype == "float32":
        array.flush()
        os.replace(source_path, target)
        return
    tmp = temporary_sibling(target)
    store.temps.append(tmp)  # removed by store.cleanup() if this is interrupted
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(count,) + array.shape[1:])
    chunk = 1024
    index = np.asarray(rows if rows is not None else range(len(array)), np.int64)
    for start in range(0, count, chunk):
        out[start:start + chunk] = np.asarray(array[index[start:start + chunk]]).astype(dtype)
    out.flush()
    del out
    os.replace(tmp, target)


def write_export(feature_set: FeatureSet, store: OutputArrays, kept: list[int], manifest: Manifest,
                 dtype: str) -> FeatureSet:
    """Write features.npy, views.npy, index.csv, meta.json and the skipped report (each file atomically)."""
    out_dir = feature_set.out_dir
    all_rows = None if len(kept) == len(manifest.records) else kept
    try:
        _finish_array(store, store.features, all_rows, out_dir / "features.npy", dtype)
        if store.views is not None:
            _finish_array(store, store.views, None, out_dir / "views.npy", dtype)
        elif (out_dir / "views.npy").exists():
            (out_dir / "views.npy").unlink()
    finally:
        store.cleanup()
    lines = []
    for row, (record, view_row) in enumerate(zip(feature_set.records, feature_set.view_rows)):
        lines.append({"row": row, **{k: getattr(record, k) for k in INDEX_COLUMNS[1:-1]}, "view_row": int(view_row)})
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS)
    writer.writeheader()
    writer.writerows(lines)
    atomic_write_text(out_dir / "index.csv", buffer.getvalue())
    partial = Manifest(root=manifest.root, layout=manifest.layout, classes=manifest.classes,
                       skipped=feature_set.skipped)
    partial.write_skipped_report(out_dir)
    meta = {
        "format_version": FORMAT_VERSION, "classes": feature_set.classes, "root": manifest.root,
        "shape": [len(feature_set.records), int(store.dim)], "dtype": dtype,
        "views_shape": list(store.views.shape) if store.views is not None else None,
        "recipe": feature_set.recipe, "stats": feature_set.stats,
        "files": {"features": "features.npy", "index": "index.csv", "meta": "meta.json",
                  "skipped": "skipped.csv", **({"views": "views.npy"} if store.views is not None else {})},
    }
    atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=1, default=str).encode())
    loaded = load_feature_dir(out_dir)
    loaded.stats = feature_set.stats
    loaded.feature_model = feature_set.feature_model
    loaded.skipped = feature_set.skipped
    return loaded


def export_paths(out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    names = ["features.npy", "index.csv", "meta.json", "skipped.csv", "skipped.json", "views.npy"]
    return {name.replace(".", "_"): str(out_dir / name) for name in names if (out_dir / name).exists()}


def load_feature_dir(out_dir: str | Path, mmap: bool = True) -> FeatureSet:
    """Read an export written by ``tl-app extract`` back into a FeatureSet."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file() or not (out_dir / "features.npy").is_file():
        raise TlAppError(
            f"{out_dir} is not a tl-app feature folder (meta.json and features.npy expected). "
            f"Create one with 'tl-app extract DATA --out {out_dir}'."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise TlAppError(f"{out_dir} has feature format {meta.get('format_version')}; this tl-app reads "
                         f"format {FORMAT_VERSION}. Extract again with 'tl-app extract'.")
    features = np.load(out_dir / "features.npy", mmap_mode="r" if mmap else None)
    records, view_rows = [], []
    with open(out_dir / "index.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            records.append(Record(
                path=row["path"], relpath=row["relpath"], label=row["label"], label_index=int(row["label_index"]),
                split=row["split"], sha256=row["sha256"], format=row["format"], width=int(row["width"]),
                height=int(row["height"]), fast=row["fast"] == "True"))
            view_rows.append(int(row["view_row"]))
    if len(records) != len(features):
        raise TlAppError(f"{out_dir} is inconsistent: {len(features)} feature rows, {len(records)} index rows. "
                         f"Extract again with 'tl-app extract'.")
    views = None
    if (out_dir / "views.npy").is_file():
        views = np.load(out_dir / "views.npy", mmap_mode="r" if mmap else None)
    skipped = []
    if (out_dir / "skipped.json").is_file():
        skipped = [Skipped(**s) for s in json.loads((out_dir / "skipped.json").read_text())]
    return FeatureSet(features=features, records=records, classes=list(meta["classes"]), out_dir=out_dir,
                      stats=dict(meta.get("stats", {})), views=views, view_rows=np.array(view_rows, np.int64),
                      recipe=dict(meta.get("recipe", {})), skipped=skipped)
