"""The manifest: every usable image of a dataset folder (path, label, split, content hash, format),
the files that could not be used and why, and the warnings a run should show. Saved with every run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tl_app.core.files import atomic_write_text

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    """One usable image."""

    path: str  # absolute
    relpath: str  # relative to the dataset root, with forward slashes
    label: str
    label_index: int
    split: str
    sha256: str
    format: str
    width: int
    height: int
    fast: bool
    dhash: str = ""  # perceptual hash: near-duplicates (data.duplicates)


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Manifest:
    """Everything later stages need to know about a dataset folder."""

    root: str
    layout: str  # "class-folders" or "split-folders"
    classes: list[str]
    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    files_found: int = 0
    warnings: list[str] = field(default_factory=list)
    empty_classes: list[dict] = field(default_factory=list)  # class folders that gave no image, and why
    duplicates: list[dict] = field(default_factory=list)  # exact and near-duplicate pairs across splits

    # ---- views -------------------------------------------------------
    def split(self, name: str) -> list[Record]:
        if name == "all":
            return list(self.records)
        return [r for r in self.records if r.split == name]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, dict[str, int]]:
        """counts[class][split]"""
        table = {c: {s: 0 for s in SPLITS} for c in self.classes}
        for record in self.records:
            table[record.label][record.split] += 1
        return table

    def fingerprint(self) -> str:
        """Changes when any image, label or split changes."""
        digest = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.relpath):
            digest.update(f"{r.relpath}\0{r.sha256}\0{r.label}\0{r.split}\n".encode())
        return digest.hexdigest()[:16]

    def summary_line(self) -> str:
        return (
            f"{self.files_found} files found = {len(self.records)} images used "
            f"+ {len(self.skipped)} skipped"
        )

    # ---- persistence -------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        data["records"] = [Record(**r) for r in data.get("records", [])]
        data["skipped"] = [Skipped(**s) for s in data.get("skipped", [])]
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_skipped_report(self, directory: str | Path) -> list[Path]:
        """skipped.csv and skipped.json (path, reason) next to a run's outputs."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = [asdict(s) for s in self.skipped]
        json_path = directory / "skipped.json"
        atomic_write_text(json_path, json.dumps(rows, indent=1, ensure_ascii=False))
        csv_path = directory / "skipped.csv"
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=["path", "reason"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(csv_path, buffer.getvalue())
        return [csv_path, json_path]
