"""Scan an image folder into a manifest: labels, stable splits, bad files, weights.

Layouts: ``root/<class>/...`` (tl-app splits) or ``root/{train,val,test}/<class>/...``
(splits respected). Every file found is either used or skipped with a reason,
so ``found == used + skipped`` always holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from tl_app.core.config import DataConfig
from tl_app.core.errors import DataError
from tl_app.core.files import atomic_write_text
from tl_app.data.images import Probe, probe_file
from tl_app.data.duplicates import components, near_pairs
from tl_app.data.ledger import SplitLedger
from typing import Iterator
from tl_app.core.config import Config
from tl_app.data.manifest import SPLITS, Manifest, Record, Skipped
from tl_app.data.splits import assign_splits, class_warnings

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
SCAN_CACHE_VERSION = 3  # 2: probes carry the perceptual hash; 3: inode and ctime in the stamp
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif", ".mpo"}  # what predict picks from a folder


# ---- scanning ----------------------------------------------------------
def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


SYMLINK_LOOP = "symlink loop: the link points to a folder that contains it; not followed"
ALREADY_INCLUDED = "already included: the link points to a folder the scan covers anyway; not followed"


def walk(top: str | Path, within: str | Path | None = None,
         suffixes: set[str] | None = None) -> Iterator[tuple[Path, str]]:
    """The one folder walker: (path, "") for every non-hidden file below ``top``, sorted, lazily;
    (link, reason) for a linked folder it will not enter.

    Links are followed, and no real folder is entered twice, so files are never
    yielded twice. With ``within`` (the dataset scan, where a folder's name is
    its label), a linked folder is also never entered when it would bring in a
    folder the scan covers anyway: an ancestor (a loop) or anything inside
    ``within`` (a link from one class folder into another would relabel its images).
    """
    top = Path(top)
    covered = os.path.realpath(within) if within is not None else None
    seen: set[str] = set()

    def inside(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

    def visit(folder: str, ancestors: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
        real = os.path.realpath(folder)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            try:
                if entry.is_dir():
                    if entry.is_symlink() and covered is not None:
                        target = os.path.realpath(entry.path)
                        if any(inside(a, target) for a in ancestors + (real,)):
                            yield Path(entry.path), SYMLINK_LOOP
                            continue
                        if target in seen or inside(target, covered):
                            yield Path(entry.path), ALREADY_INCLUDED
                            continue
                    yield from visit(entry.path, ancestors + (real,))
                elif suffixes is None or Path(entry.name).suffix.lower() in suffixes:
                    yield Path(entry.path), ""
            except OSError:
                continue

    yield from visit(str(top), ())


def class_sort_key(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def scan(root: str | Path, config: DataConfig | None = None, *, cache_dir: str | Path | None = None) -> Manifest:
    """Find, probe, label and split every file below ``root``."""
    config = config or DataConfig()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"Dataset folder {str(root)!r} does not exist or is not a folder. Expected a folder "
            f"with one sub-folder per class (root/<class>/*.jpg) or root/train|val|test/<class>/*. "
            f"Create a sample with 'tl-app datasets sample datasets/sample'."
        )
    top = sorted((p for p in root.iterdir() if not is_hidden(p.name)), key=lambda p: p.name)
    top_dirs = [p for p in top if p.is_dir()]
    split_dirs = [p for p in top_dirs if p.name.lower() in SPLIT_ALIASES]
    layout = "split-folders" if split_dirs and len(split_dirs) == len(top_dirs) else "class-folders"

    entries: list[tuple[Path, str | None, str | None]] = []  # (file, label, given split)
    loose: list[Path] = [p for p in top if not p.is_dir()]
    links: list[tuple[Path, str]] = []  # linked folders not followed (loops, folders already covered)
    class_folders: list[tuple[Path, str]] = []  # (folder, label): every one is named when it yields no image
    if layout == "split-folders":
        for split_dir in split_dirs:
            split = SPLIT_ALIASES[split_dir.name.lower()]
            for child in sorted(split_dir.iterdir(), key=lambda p: p.name):
                if is_hidden(child.name):
                    continue
                if child.is_dir():
                    class_folders.append((child, child.name))
                    for path, problem in walk(child, within=root):
                        links.append((path, problem)) if problem else entries.append((path, child.name, split))
                else:
                    loose.append(child)
    else:
        for class_dir in top_dirs:
            class_folders.append((class_dir, class_dir.name))
            for path, problem in walk(class_dir, within=root):
                links.append((path, problem)) if problem else entries.append((path, class_dir.name, None))

    cache = ScanCache(cache_dir, root, config.max_pixels) if cache_dir else None
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        probes = list(pool.map(lambda e: cache.probe(e[0]) if cache else probe_file(e[0], config.max_pixels), entries))
    if cache:
        cache.save()

    classes = sorted({label for _, label, _ in entries}, key=class_sort_key)
    index = {c: i for i, c in enumerate(classes)}
    manifest = Manifest(root=str(root.resolve()), layout=layout, classes=classes)
    manifest.files_found = len(entries) + len(loose) + len(links)
    manifest.skipped += [Skipped(str(p), "not inside a class folder") for p in loose]
    manifest.skipped += [Skipped(str(p), reason) for p, reason in links]
    pending: list[tuple[Path, str, str | None, Probe]] = []
    for (path, label, split), probe in zip(entries, probes):
        if not probe.ok:
            manifest.skipped.append(Skipped(str(path), probe.reason))
            continue
        pending.append((path, label, split, probe))
    for path, label, split, probe in pending:
        manifest.records.append(Record(
            path=str(path.absolute()), relpath=path.relative_to(root).as_posix(), label=label,
            label_index=index[label], split=split or "", sha256=probe.sha256, format=probe.format,
            width=probe.width, height=probe.height, fast=probe.fast, dhash=probe.dhash,
        ))
    # classes whose every file was bad still exist as classes, but warn
    if layout == "class-folders":
        ledger = SplitLedger(cache_dir, root, config.split_seed, config.val_fraction,
                             config.test_fraction) if cache_dir else None
        near = near_pairs({r.sha256: r.dhash for r in manifest.records})
        assign_splits(manifest, config, ledger, linked=components(near))  # a near-duplicate group stays together
        if ledger is not None:
            ledger.save()
    manifest.empty_classes = empty_class_folders(manifest, root, class_folders)
    manifest.duplicates = cross_split_duplicates(manifest)
    if manifest.duplicates:
        exact = sum(1 for d in manifest.duplicates if d["kind"] == "exact")
        first = "; ".join(f"{d['a']} ({d['splits'][0]}) ~ {d['b']} ({d['splits'][1]})" for d in manifest.duplicates[:3])
        manifest.warnings.append(
            f"leakage: {exact} exact and {len(manifest.duplicates) - exact} near-duplicate pair(s) across splits, "
            f"e.g. {first} (all under 'duplicates' in inspect --json); remove or move one of each pair")
    manifest.warnings += [f"class folder {e['folder']!r} has no usable image ({e['reason']})"
                          + ("" if e["name"] in manifest.classes else ", so it is not a class")
                          for e in manifest.empty_classes]
    manifest.warnings += class_warnings(manifest, config)
    problem = too_few_classes(manifest)
    if manifest.records and problem:
        manifest.warnings.insert(0, problem)
    if config.strict and manifest.skipped:
        listing = "\n".join(f"  {s.path}: {s.reason}" for s in manifest.skipped)
        raise DataError(f"--strict: {len(manifest.skipped)} bad file(s) in {root}:\n{listing}")
    if not manifest.records and loose and not top_dirs:
        raise DataError(
            f"{len(loose)} file(s) lie directly in {root} but there are no class folders. Expected one "
            f"sub-folder per class (root/<class>/*.jpg) or root/train|val|test/<class>/*: move the images "
            f"into folders named after their classes."
        )
    if not manifest.records:
        raise DataError(
            f"No usable images in {root} ({manifest.files_found} files found, all skipped). "
            f"Expected image files (JPEG, PNG, GIF, BMP, WebP, TIFF) inside class folders."
        )
    return manifest


def too_few_classes(manifest: Manifest) -> str | None:
    """Why a folder cannot train a classifier (fewer than two classes with usable images), or None."""
    counts = {label: n for label, n in ((c, sum(v.values())) for c, v in manifest.counts().items()) if n}
    if len(counts) >= 2:
        return None
    found = ", ".join(f"{label!r} ({n} image{'s' if n != 1 else ''})" for label, n in counts.items()) or "none"
    return (f"a classifier needs at least two classes with usable images; {manifest.root} has "
            f"{len(counts)} (found: {found}). Add a folder per class (root/<class>/*.jpg)")


def cross_split_duplicates(manifest: Manifest) -> list[dict]:
    """Each pair of files in different splits with the same bytes (exact) or close perceptual hashes (near)."""
    by_hash: dict[str, list[Record]] = {}
    for record in manifest.records:
        by_hash.setdefault(record.sha256, []).append(record)
    out = []

    def add(kind: str, a: Record, b: Record, bits: int) -> None:
        if a.split != b.split:
            first, second = sorted((a, b), key=lambda r: r.relpath)
            out.append({"kind": kind, "a": first.relpath, "b": second.relpath,
                        "splits": [first.split, second.split], "distance": bits})

    for members in by_hash.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                add("exact", a, b, 0)
    for sha_a, sha_b, bits in near_pairs({sha: members[0].dhash for sha, members in by_hash.items()}):
        for a in by_hash[sha_a]:
            for b in by_hash[sha_b]:
                add("near", a, b, bits)
    return sorted(out, key=lambda d: (d["kind"], d["a"], d["b"]))


def empty_class_folders(manifest: Manifest, root: Path, class_folders: list[tuple[Path, str]]) -> list[dict]:
    """{folder, name, reason} for every class folder that gave no usable image: empty, or every file skipped."""
    depth = 1 if manifest.layout == "class-folders" else 2

    def folder_of(relpath: str) -> str:
        return "/".join(relpath.split("/")[:depth])

    used = {folder_of(r.relpath) for r in manifest.records}
    skipped: dict[str, list[str]] = {}
    for s in manifest.skipped:
        try:
            skipped.setdefault(folder_of(Path(s.path).relative_to(root).as_posix()), []).append(s.reason)
        except ValueError:
            continue
    out = []
    for folder, label in class_folders:
        relative = folder.relative_to(root).as_posix()
        if relative in used:
            continue
        reasons = skipped.get(relative, [])
        kinds: dict[str, int] = {}
        for reason in reasons:
            kinds[reason.split(":")[0]] = kinds.get(reason.split(":")[0], 0) + 1
        reason = (f"{len(reasons)} file(s) skipped: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                  if reasons else "no files")
        out.append({"folder": relative, "name": label, "reason": reason})
    return out


# ---- presentation --------------------------------------------------------
def inspect_dict(manifest: Manifest, weights: dict[int, float] | None = None) -> dict:
    """The machine-readable document behind ``tl-app datasets inspect --json``."""
    counts = manifest.counts()
    formats: dict[str, dict[str, int]] = {c: {} for c in manifest.classes}
    for r in manifest.records:
        formats[r.label][r.format] = formats[r.label].get(r.format, 0) + 1
    skipped_per_class: dict[str, int] = {}
    for s in manifest.skipped:
        label = label_of_skipped(manifest, s.path)
        if label:
            skipped_per_class[label] = skipped_per_class.get(label, 0) + 1
    return {
        "root": manifest.root,
        "layout": manifest.layout,
        "classes": [
            {
                "name": c,
                "counts": counts[c],
                "total": sum(counts[c].values()),
                "formats": formats[c],
                "skipped": skipped_per_class.get(c, 0),
                **({"class_weight": round(weights[i], 4)} if weights else {}),
            }
            for i, c in enumerate(manifest.classes)
        ],
        "splits": {s: len(manifest.split(s)) for s in SPLITS},
        "totals": {"found": manifest.files_found, "used": len(manifest.records), "skipped": len(manifest.skipped)},
        "skipped": [asdict(s) for s in manifest.skipped],
        "empty_classes": list(manifest.empty_classes),
        "duplicates": list(manifest.duplicates),
        "warnings": list(manifest.warnings),
        "fingerprint": manifest.fingerprint(),
    }


def label_of_skipped(manifest: Manifest, path: str) -> str | None:
    try:
        parts = Path(path).relative_to(manifest.root).parts
    except ValueError:
        try:
            parts = Path(path).resolve().relative_to(manifest.root).parts
        except (ValueError, OSError):
            return None
    if manifest.layout == "split-folders":
        parts = parts[1:]
    return parts[0] if len(parts) > 1 else None


def format_table(manifest: Manifest, weights: dict[int, float] | None = None) -> str:
    doc = inspect_dict(manifest, weights)
    header = ["class", "train", "val", "test", "total", "skipped", "formats"] + (["weight"] if weights else [])
    rows = []
    for c in doc["classes"]:
        fmt = ",".join(f"{k.lower()}:{v}" for k, v in sorted(c["formats"].items()))
        row = [c["name"], c["counts"]["train"], c["counts"]["val"], c["counts"]["test"], c["total"], c["skipped"], fmt]
        if weights:
            row.append(f"{c['class_weight']:.3f}")
        rows.append([str(x) for x in row])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def print_report(manifest: Manifest, weights: dict[int, float] | None = None, out=None) -> None:
    out = out or sys.stdout
    print(format_table(manifest, weights), file=out)
    for warning in manifest.warnings:
        print(f"warning: {warning}", file=out)
    print(manifest.summary_line(), file=out)
    if manifest.skipped:
        reasons: dict[str, int] = {}
        for s in manifest.skipped:
            reasons[s.reason.split(":")[0]] = reasons.get(s.reason.split(":")[0], 0) + 1
        print("skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())), file=out)


# ---- the scan cache ----------------------------------------------------------
class ScanCache:
    """Remembers probes by (path, size, mtime, inode, ctime) so a re-scan reads nothing unchanged.

    Content hashes are what every later cache keys on, so a file whose size or
    mtime changed is always hashed again.
    """

    def __init__(self, cache_dir: str | Path, root: Path, max_pixels: int):
        key = hashlib.sha256(f"{root.resolve()}|{max_pixels}|{SCAN_CACHE_VERSION}".encode()).hexdigest()[:16]
        self.path = Path(cache_dir) / f"scan-{key}.json"
        self.max_pixels = max_pixels
        self.entries: dict[str, list] = {}
        self.fresh: dict[str, list] = {}
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def probe(self, path: Path) -> Probe:
        try:
            stat = path.stat()  # size, mtime, inode and ctime: a rewrite that restores the mtime still shows
            stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]
        except OSError:
            return probe_file(path, self.max_pixels)
        key = str(path.absolute())
        hit = self.entries.get(key)
        if hit and len(hit) == 5 and hit[:4] == stamp:
            probe = Probe(**hit[4])
        else:
            probe = probe_file(path, self.max_pixels)
        if not probe.reason.startswith("unreadable"):
            self.fresh[key] = stamp + [asdict(probe)]
        return probe

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.fresh))
        except OSError:
            pass  # a cache that cannot be written only costs time


# ---- the inputs ----------------------------------------------------------------------
def scan_dataset(config: Config) -> Manifest:
    """The configured dataset, with probes remembered next to the feature cache."""
    return scan(config.data.root, config.data, cache_dir=Path(config.features.cache_dir).parent / "scan")
