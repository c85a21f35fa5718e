"""The user's decisions on the doctor's findings, applied to a run's manifest (never to the files).

``issues.csv`` (written by ``tl-app datasets doctor``, edited by the user)
names files by ``path`` (absolute) or ``relpath`` (relative to the dataset
root), with an ``action`` column: ``exclude`` leaves the file out of the run,
``relabel`` gives it ``suggested_label``, ``keep`` (or anything else) does
nothing. ``--exclude`` applies only the exclude rows and ``--relabel`` only the
relabel rows, so one file can serve both. A CSV without an ``action`` column
is a plain list: ``--exclude`` leaves out every file it names.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tl_app.core.errors import DataError
from tl_app.data.manifest import Manifest, Skipped


def read_issue_rows(path: str | Path) -> list[dict]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Issues file {str(path)!r} does not exist. Expected the issues.csv written by "
                        f"'tl-app datasets doctor DATA --out DIR' (DIR/issues.csv), or a CSV with a path column.")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    if rows and not columns & {"path", "relpath"}:
        raise DataError(f"Issues file {str(path)!r} has no 'path' or 'relpath' column (columns: "
                        f"{', '.join(sorted(c for c in columns if c))}). Use the issues.csv that "
                        f"'tl-app datasets doctor' writes, or add a path column.")
    return rows


def _index(manifest: Manifest) -> dict[str, int]:
    index = {}
    for i, r in enumerate(manifest.records):
        index[str(Path(r.path).resolve())] = i
        index[r.relpath] = i
    return index


def _find(row: dict, index: dict[str, int]) -> int | None:
    for key in ((row.get("relpath") or "").strip(), (row.get("path") or "").strip()):
        if not key:
            continue
        for candidate in (key, str(Path(key).expanduser().resolve())):
            if candidate in index:
                return index[candidate]
    return None


def apply_edits(manifest: Manifest, exclude: str | Path = "", relabel: str | Path = "") -> dict:
    """Leave out (into ``skipped``) and relabel records in place; returns what was done, for run.json.

    A relabel to a class the dataset does not have is refused: a new class
    would need images of its own to be learned.
    """
    done = {"exclude_file": str(exclude or ""), "relabel_file": str(relabel or ""), "excluded": [],
            "relabelled": [], "not_found": []}
    if not exclude and not relabel:
        return done
    index = _index(manifest)
    drop: dict[int, str] = {}
    if exclude:
        rows = read_issue_rows(exclude)
        plain = bool(rows) and "action" not in rows[0]
        for row in rows:
            if not plain and (row.get("action") or "").strip().lower() != "exclude":
                continue
            i = _find(row, index)
            if i is None:
                done["not_found"].append(row.get("relpath") or row.get("path"))
            elif i not in drop:
                drop[i] = (row.get("kind") or "listed").strip()
    if relabel:
        classes = {c: k for k, c in enumerate(manifest.classes)}
        for row in read_issue_rows(relabel):
            if (row.get("action") or "").strip().lower() != "relabel":
                continue
            i = _find(row, index)
            if i is None:
                done["not_found"].append(row.get("relpath") or row.get("path"))
                continue
            label = (row.get("suggested_label") or "").strip()
            if label not in classes:
                raise DataError(
                    f"{relabel}: cannot relabel {row.get('relpath') or row.get('path')} as {label!r}: the dataset's "
                    f"classes are {', '.join(manifest.classes)}. Fix suggested_label or set action to keep.")
            record = manifest.records[i]
            if i in drop or record.label == label:
                continue
            done["relabelled"].append({"relpath": record.relpath, "from": record.label, "to": label})
            record.label, record.label_index = label, classes[label]
    for i in sorted(drop):
        record = manifest.records[i]
        done["excluded"].append({"relpath": record.relpath, "kind": drop[i]})
        manifest.skipped.append(Skipped(record.path, f"excluded by {Path(exclude).name} ({drop[i]})"))
    manifest.records = [r for i, r in enumerate(manifest.records) if i not in drop]
    if done["excluded"] or done["relabelled"]:
        moves = ", ".join(f"{m['relpath']} {m['from']}->{m['to']}" for m in done["relabelled"][:5])
        manifest.warnings.append(
            f"edits: {len(done['excluded'])} image(s) excluded by {exclude or '-'}, {len(done['relabelled'])} "
            f"relabelled by {relabel or '-'}" + (f" ({moves}{', ...' if len(done['relabelled']) > 5 else ''})"
                                                  if moves else ""))
    if done["not_found"]:
        manifest.warnings.append(f"edits: {len(done['not_found'])} listed file(s) are not in the dataset "
                                 f"(first: {done['not_found'][0]})")
    return done
