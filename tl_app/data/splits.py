"""Train/val/test splits and class weights of a scanned dataset."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from tl_app.core.config import DataConfig
from tl_app.core.errors import ConfigError

if TYPE_CHECKING:  # annotations only: scan calls assign_splits
    from tl_app.data.ledger import SplitLedger
    from tl_app.data.manifest import Manifest, Record


def split_score(key: str, seed: int) -> float:
    """A number in [0, 1) that depends only on ``key`` (an image's content hash) and the seed."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
    return int(digest[:13], 16) / float(16 ** 13)


def hash_split(sha256: str, config: DataConfig) -> str:
    score = split_score(sha256, config.split_seed)
    return "test" if score < config.test_fraction else "val" if score < config.test_fraction + config.val_fraction \
        else "train"


def assign_splits(manifest: Manifest, config: DataConfig, ledger: SplitLedger | None = None,
                  linked: dict[str, str] | None = None) -> None:
    """Stable splits: a remembered split first, else a hash of the content (never of the name).

    Byte-identical copies share one split (they are one group) and so do the
    groups ``linked`` puts together (near-duplicates: content hash -> group key).
    A small class gets a validation image by moving a *new* train group, never
    one the ledger already placed. With a ledger, every decision is remembered.
    """
    groups: dict[str, list[Record]] = {}
    for record in manifest.records:
        groups.setdefault((linked or {}).get(record.sha256, record.sha256), []).append(record)
    remembered: set[str] = set()
    for key, members in groups.items():
        split = None
        if ledger is not None:
            for sha in sorted({r.sha256 for r in members}):
                split = ledger.lookup(sha, [r.relpath for r in members if r.sha256 == sha])
                if split:
                    break
        if split:
            remembered.add(key)
        else:
            split = hash_split(key, config)
        for record in members:
            record.split = split
    if config.val_fraction > 0:
        by_label: dict[str, list[tuple[str, Record]]] = {}
        for key, members in groups.items():
            for record in members:
                by_label.setdefault(record.label, []).append((key, record))
        for entries in by_label.values():
            keys = {k for k, _ in entries}
            if len(keys) < 2 or any(r.split == "val" for _, r in entries):
                continue
            train = sorted({k for k, r in entries if r.split == "train"})
            movable = [k for k in train if k not in remembered]
            if len(train) < 2 or not movable:
                continue  # keep another group in train; never move an image the ledger placed
            chosen = min(movable, key=lambda k: split_score(k, config.split_seed))
            for record in groups[chosen]:
                record.split = "val"
    if ledger is not None:
        for record in manifest.records:
            ledger.remember(record.sha256, record.relpath, record.split)


def class_warnings(manifest: Manifest, config: DataConfig) -> list[str]:
    out = []
    counts = manifest.counts()
    for label, by_split in counts.items():
        total = sum(by_split.values())
        if total == 0:
            continue  # named by the scan's empty-class report, with the reason
        if config.val_fraction > 0 and by_split["val"] == 0 and manifest.layout == "class-folders":
            out.append(f"class {label!r} has {total} image(s): too few for a validation image")
        elif manifest.layout == "split-folders" and by_split["val"] == 0:
            out.append(f"class {label!r} has no validation images in the given val/ folder")
    totals = [sum(v.values()) for v in counts.values() if sum(v.values()) > 0]
    if totals:
        ratio = max(totals) / min(totals)
        if ratio >= config.imbalance_warning_ratio:
            out.append(
                f"class imbalance: the largest class has {ratio:.1f}x the images of the smallest; "
                f"class weights ({config.class_weights if isinstance(config.class_weights, str) else 'explicit'}) "
                f"and per-class metrics matter here"
            )
    return out


def class_weights(manifest: Manifest, setting: str | dict = "balanced", split: str = "train") -> dict[int, float]:
    """balanced: n / (k * count_k) over the training split; none: 1; or an explicit mapping."""
    k = manifest.num_classes
    if setting == "none":
        return {i: 1.0 for i in range(k)}
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(manifest.classes))
        if unknown:
            raise ConfigError(
                f"class_weights names unknown class(es) {unknown}; classes are {manifest.classes}."
            )
        return {i: float(setting.get(c, 1.0)) for i, c in enumerate(manifest.classes)}
    if setting != "balanced":
        raise ConfigError(f"class_weights must be 'balanced', 'none' or a mapping, got {setting!r}.")
    counts = [0] * k
    for record in manifest.split(split):
        counts[record.label_index] += 1
    n = sum(counts)
    return {i: (n / (k * c) if c else 0.0) for i, c in enumerate(counts)}
