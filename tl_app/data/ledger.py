"""The split ledger: once an image has a split, it keeps it, whatever is added, removed or copied.

The hash rule alone is not enough: the "every class gets a validation image"
rule depends on what else is in the class, and a file edited in place gets a
new content hash. The ledger remembers each image's split by content hash (a
copy, a renamed file or the whole folder moved elsewhere keep their split) and
by relative path under the dataset's real path (an edited file keeps its
split). It lives next to the scan cache, one file per split setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tl_app.core.files import atomic_write_text

LEDGER_VERSION = 1


class SplitLedger:
    """Remembered splits of one (seed, fractions) setting; ``remember`` then ``save`` after assigning."""

    def __init__(self, directory: str | Path, root: str | Path, seed: int, val_fraction: float,
                 test_fraction: float):
        setting = f"{LEDGER_VERSION}|{seed}|{val_fraction!r}|{test_fraction!r}"
        self.path = Path(directory) / f"splits-{hashlib.sha256(setting.encode()).hexdigest()[:16]}.json"
        self.root = os.path.realpath(root)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.by_hash: dict[str, str] = dict(data.get("by_hash") or {})
        self.by_path: dict[str, dict[str, str]] = dict(data.get("by_path") or {})

    def lookup(self, sha256: str, relpaths: list[str]) -> str | None:
        """The remembered split of a content hash, else of any of its relative paths; None when new."""
        if sha256 in self.by_hash:
            return self.by_hash[sha256]
        paths = self.by_path.get(self.root, {})
        for relpath in sorted(relpaths):
            if relpath in paths:
                return paths[relpath]
        return None

    def remember(self, sha256: str, relpath: str, split: str) -> None:
        self.by_hash[sha256] = split
        self.by_path.setdefault(self.root, {})[relpath] = split

    def save(self) -> None:
        """Merged with what another process saved meanwhile (its entries kept for images it saw first)."""
        try:
            current = json.loads(self.path.read_text())
        except (OSError, ValueError):
            current = {}
        by_hash = {**(current.get("by_hash") or {}), **self.by_hash}
        by_path = dict(current.get("by_path") or {})
        for root, paths in self.by_path.items():
            by_path[root] = {**by_path.get(root, {}), **paths}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": LEDGER_VERSION, "by_hash": by_hash,
                                                     "by_path": by_path}))
        except OSError:
            pass  # without a ledger the content-hash rule still holds; only the small-class moves may drift
