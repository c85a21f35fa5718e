"""Files that are never half-written: write a temporary sibling, then rename it over the target.

A reader sees the old file or the new one, never a torn one; a killed
process leaves at most a hidden temporary file named after its pid, which
``remove_stale_temporaries`` clears once that process is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def temporary_sibling(path: str | Path) -> Path:
    """A hidden, unique name next to ``path`` that carries this process's pid."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary siblings (files or folders) left in ``directory`` by processes that no longer run."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.glob(f"{TEMP_PREFIX}*-*"):
        pid = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not (pid.isascii() and pid.isdigit()) or pid_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def write_json(path: Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))
