"""The shard cache of bottleneck features, keyed by recipe and image content hash.

Append-only shards with row checksums; small shards are compacted; a killed
run loses at most the batch it was writing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Sequence
import numpy as np
from tl_app.core.files import atomic_write_bytes
from tl_app.features.recipe import Recipe


SHARD_PREFIX = "shard-"


COMPACT_ABOVE = 64  # shards per recipe before they are merged


COMPACT_BYTES = 64 << 20  # the largest merged shard


STALE_TEMP_SECONDS = 3600


# ---- the cache ---------------------------------------------------------------
def shard_dtype(dim: int) -> np.dtype:
    return np.dtype([("sha256", "S64"), ("view", "<i4"), ("features", "<f4", (dim,)), ("crc", "<u4")])


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of every row's bytes except its own crc field."""
    raw = rows.view(np.uint8).reshape(len(rows), rows.dtype.itemsize)[:, :-4]
    return np.fromiter((zlib.crc32(r.tobytes()) for r in raw), np.uint32, len(rows))


def shard_size(path: Path) -> int:
    """Bytes of a shard; a shard another process just merged away counts as large (left alone)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return COMPACT_BYTES


def recipe_dir(root: str | Path, recipe: Recipe) -> Path:
    """The folder of one recipe's shards (and of the backbone converted for it, features.runtime)."""
    return Path(root) / f"v{recipe.format_version}" / recipe.key()


class FeatureCache:
    """Append-only shards of one recipe; safe under SIGKILL and concurrent writers."""

    def __init__(self, root: str | Path, recipe: Recipe):
        self.recipe = recipe
        self.dir = recipe_dir(root, recipe)
        self.dir.mkdir(parents=True, exist_ok=True)
        recipe_file = self.dir / "recipe.json"
        if not recipe_file.exists():
            atomic_write_bytes(recipe_file, json.dumps(asdict(recipe), indent=1, sort_keys=True).encode())
        self.corrupt_rows = 0
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.dir.glob(".tmp-*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob(f"{SHARD_PREFIX}*.npy"))

    def open_shard(self, path: Path) -> np.ndarray | None:
        """The shard's rows (memory-mapped), or None when it is not a readable shard."""
        try:
            rows = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError):
            return None  # truncated or not an .npy file: its rows are recomputed
        names = rows.dtype.names or ()
        if rows.ndim != 1 or names != ("sha256", "view", "features", "crc"):
            return None
        if rows.dtype != shard_dtype(rows.dtype["features"].shape[0]):
            return None
        return rows

    def dim(self) -> int | None:
        """The feature width, from the first readable shard (None for an empty cache)."""
        for path in self.shards():
            try:
                rows = self.open_shard(path)
            except FileNotFoundError:
                continue
            if rows is not None:
                return int(rows.dtype["features"].shape[0])
        return None

    def fill(self, keys: Sequence[tuple[str, int]], out: np.ndarray) -> np.ndarray:
        """Copy the cached features of ``keys`` into the rows of ``out``; returns the found mask.

        The index is rebuilt from the shards on every call; only rows whose
        checksum holds are served. A shard that another job merged away while
        we read is found again by listing once more.
        """
        wanted: dict[tuple[bytes, int], list[int]] = {}
        for position, (sha, view) in enumerate(keys):
            wanted.setdefault((sha.encode(), int(view)), []).append(position)
        found = np.zeros(len(keys), bool)
        dim = out.shape[1] if out.ndim == 2 else None
        self.corrupt_rows = 0
        for _attempt in range(3):
            vanished = False
            for path in self.shards():
                if not wanted:
                    return found
                try:
                    rows = self.open_shard(path)
                except FileNotFoundError:
                    vanished = True
                    continue
                if rows is None or (dim is not None and rows.dtype["features"].shape[0] != dim):
                    continue
                shas = np.asarray(rows["sha256"])
                views = np.asarray(rows["view"])
                hits = [i for i, key in enumerate(zip(shas.tolist(), views.tolist())) if key in wanted]
                if not hits:
                    continue
                chunk = np.asarray(rows[hits])
                good = row_checksums(chunk) == chunk["crc"]
                self.corrupt_rows += int((~good).sum())
                for row, ok in zip(chunk, good):
                    key = (bytes(row["sha256"]), int(row["view"]))
                    if not ok or key not in wanted:
                        continue
                    positions = wanted.pop(key)
                    out[positions] = row["features"]
                    found[positions] = True
            if not vanished:
                break
        return found

    def write(self, shas: Sequence[str], views: Sequence[int], features: np.ndarray) -> Path | None:
        """Append one shard atomically (temporary file, then rename)."""
        if len(shas) == 0:
            return None
        features = np.asarray(features, np.float32)
        rows = np.zeros(len(shas), shard_dtype(features.shape[1]))
        rows["sha256"] = [s.encode() for s in shas]
        rows["view"] = views
        rows["features"] = features
        rows["crc"] = row_checksums(rows)
        return self._write_rows(rows)

    def _write_rows(self, rows: np.ndarray) -> Path:
        name = f"{SHARD_PREFIX}{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        tmp = self.dir / f".tmp-{name}"
        with open(tmp, "wb") as handle:
            np.save(handle, rows, allow_pickle=False)
        os.replace(tmp, self.dir / name)
        return self.dir / name

    def compact(self, above: int = COMPACT_ABOVE) -> int:
        """Merge many small shards into few (merged shards are not rewritten); concurrent readers and compactors
        stay correct.

        Rows are written to new shards before the old ones are removed, so at
        every moment each row is in at least one complete shard. Returns the
        number of shards removed.
        """
        paths = [path for path in self.shards() if shard_size(path) < COMPACT_BYTES // 2]  # merged ones stay
        if len(paths) <= above:
            return 0
        seen: set[tuple[bytes, int]] = set()
        pending: list[np.ndarray] = []
        pending_bytes = 0
        merged: list[Path] = []
        dim = None
        for path in paths:
            try:
                rows = self.open_shard(path)
            except FileNotFoundError:
                continue
            merged.append(path)
            if rows is None:
                continue
            if dim is None:
                dim = rows.dtype["features"].shape[0]
            if rows.dtype["features"].shape[0] != dim:
                continue
            rows = np.asarray(rows)
            rows = rows[row_checksums(rows) == rows["crc"]]
            keep = []
            for i, key in enumerate(zip(rows["sha256"].tolist(), rows["view"].tolist())):
                if key not in seen:
                    seen.add(key)
                    keep.append(i)
            if keep:
                pending.append(rows[keep])
                pending_bytes += pending[-1].nbytes
            if pending_bytes >= COMPACT_BYTES:
                self._write_rows(np.concatenate(pending))
                pending, pending_bytes = [], 0
        if pending:
            self._write_rows(np.concatenate(pending))
        for path in merged:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        return len(merged)
