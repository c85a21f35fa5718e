"""Publishing into the model repository: formats, the per-model lock and the atomic
rename that makes a version folder appear whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from tl_app.core.errors import ConfigError, closest
from tl_app.models.artifacts import CARD_FILE, list_versions


FORMATS = ("savedmodel", "keras", "tflite", "onnx")



# ---- atomic publication ---------------------------------------------------------
def parse_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = [f for f in re.split(r"[,\s]+", formats) if f]
    out = []
    for fmt in formats or ["savedmodel", "keras"]:
        fmt = fmt.strip().lower()
        if fmt not in FORMATS:
            hint = closest(fmt, FORMATS)
            raise ConfigError(f"Unknown export format {fmt!r}; expected some of: {', '.join(FORMATS)}."
                              + (f" Did you mean {hint!r}?" if hint else ""))
        if fmt not in out:
            out.append(fmt)
    return out


@contextlib.contextmanager
def publication_lock(model_dir: Path):
    """Serialises version numbering between concurrent exports of one model."""
    import fcntl

    with open(model_dir / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fsync_tree(directory: Path) -> None:
    """Data reaches the disk before the rename makes it visible."""
    for folder, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, model_dir: Path) -> int:
    """Rename the finished build to the next version number; returns the number."""
    with publication_lock(model_dir):
        version = (list_versions(model_dir) or [0])[-1] + 1
        card_path = temp / CARD_FILE
        card = json.loads(card_path.read_text())
        card["version"] = version
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        fsync_tree(temp)
        os.rename(temp, model_dir / str(version))
        fsync_dir(model_dir)
    return version
