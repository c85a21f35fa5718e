"""Train/val/test splits and class weights of a scanned dataset."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from tl_app.core.config import DataConfig
from tl_app.core.errors import ConfigError

if TYPE_CHECKING:  # annotations only: scan calls assign_splits
    from tl_app.data.scan import Manifest, Record


def split_score(relpath: str, seed: int) -> float:
    """A number in [0, 1) that depends only on the relative path and the seed."""
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).hexdigest()
    return int(digest[:13], 16) / float(16 ** 13)


def assign_splits(manifest: Manifest, config: DataConfig) -> None:
    """Stable hash splits; byte-identical duplicates follow one member; small classes get a val image."""
    test_cut = config.test_fraction
    val_cut = config.test_fraction + config.val_fraction
    groups: dict[str, list[Record]] = {}
    for record in manifest.records:
        groups.setdefault(record.sha256, []).append(record)
    for members in groups.values():
        anchor = min(members, key=lambda r: r.relpath)
        score = split_score(anchor.relpath, config.split_seed)
        split = "test" if score < test_cut else "val" if score < val_cut else "train"
        for record in members:
            record.split = split
    if config.val_fraction <= 0:
        return
    by_label: dict[str, list[Record]] = {}
    for record in manifest.records:
        by_label.setdefault(record.label, []).append(record)
    for records in by_label.values():
        if len({r.sha256 for r in records}) < 2 or any(r.split == "val" for r in records):
            continue
        # move the train group whose score is closest to the val range, keeping another group in train
        train = [r for r in records if r.split == "train"]
        if len({r.sha256 for r in train}) < 2:
            continue
        chosen = min(train, key=lambda r: split_score(r.relpath, config.split_seed))
        for record in groups[chosen.sha256]:
            record.split = "val"


def class_warnings(manifest: Manifest, config: DataConfig) -> list[str]:
    out = []
    counts = manifest.counts()
    for label, by_split in counts.items():
        total = sum(by_split.values())
        if total == 0:
            out.append(f"class {label!r} has no usable images")
        elif config.val_fraction > 0 and by_split["val"] == 0 and manifest.layout == "class-folders":
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
