"""Every run folder at a glance ('tl-app runs list') and several runs side by side ('tl-app runs compare').

Reads only the files training leaves (run.json, metrics.json, history.json,
config.json), so listing needs no TensorFlow (nor matplotlib: the comparison
page is drawn by insight.runs_page) and works on failed or interrupted runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

from tl_app.core.errors import ModelNotFoundError
from tl_app.core.files import pid_alive
from tl_app.models.artifacts import MODEL_FILE, RUN_FILE
from tl_app.training.diagnosis import HISTORY_FILE

# config keys that differ between any two runs without saying anything about them
IGNORED_KEYS = ("train.name",)


def read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_epochs(run_dir: Path) -> list[dict]:
    data = read_json(run_dir / HISTORY_FILE)
    if isinstance(data, dict):
        data = data.get("epochs", [])
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def run_status(run_dir: Path, info: dict) -> str:
    """finished, running, interrupted, failed, diverged or incomplete (no status and no model)."""
    status = info.get("status")
    if status == "finished" or (status is None and (run_dir / MODEL_FILE).is_file()):
        return "finished"
    if status in ("failed", "diverged", "interrupted"):
        return status
    if status in ("preparing", "training"):
        here = info.get("host") == platform.node() and isinstance(info.get("pid"), int)
        return "running" if here and pid_alive(info["pid"]) else "interrupted"
    return "incomplete"


def folder_size(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def created_at(run_dir: Path, info: dict) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(info["created"])
    except (KeyError, TypeError, ValueError):
        return dt.datetime.fromtimestamp(run_dir.stat().st_mtime, dt.timezone.utc)


def run_row(run_dir: str | Path) -> dict:
    """One run's name, settings, best validation metric, epochs, status, age and size."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / RUN_FILE)
    info = info if isinstance(info, dict) else {}
    metrics = read_json(run_dir / "metrics.json")
    metrics = metrics if isinstance(metrics, dict) else (info.get("metrics") or {})
    epochs = read_epochs(run_dir)
    val_accuracy = metrics.get("val_accuracy")
    if val_accuracy is None and epochs:  # an unfinished run: the best epoch so far
        measured = [e["val_accuracy"] for e in epochs if e.get("val_accuracy") is not None]
        val_accuracy = max(measured) if measured else None
    created = created_at(run_dir, info)
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "name": run_dir.name, "path": str(run_dir), "status": run_status(run_dir, info),
        "error": info.get("error"), "strategy": info.get("strategy"), "backbone": info.get("backbone"),
        "weights": info.get("weights"), "val_accuracy": val_accuracy, "val_loss": metrics.get("val_loss"),
        "best_epoch": metrics.get("best_epoch"), "epochs": len(epochs), "created": created.isoformat(),
        "age_seconds": max(0.0, (now - created).total_seconds()) if created.tzinfo else None,
        "size_bytes": folder_size(run_dir),
    }


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / RUN_FILE).is_file() or (path / "config.json").is_file())


def list_runs(runs_dir: str | Path = "runs") -> list[dict]:
    """A row per run folder under ``runs_dir``, oldest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ModelNotFoundError(f"Runs folder {str(runs_dir)!r} does not exist. Train a model first "
                                 f"(tl-app train DATA) or pass --runs-dir with the folder that holds the runs.")
    rows = [run_row(child) for child in sorted(runs_dir.iterdir()) if is_run_dir(child)]
    return sorted(rows, key=lambda r: r["created"])


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def metric(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_runs(rows: list[dict]) -> str:
    """The console table of 'tl-app runs list', with the reason under each failed run."""
    if not rows:
        return "no runs yet"
    header = ["name", "status", "strategy", "backbone", "weights", "val_accuracy", "epochs", "age", "size"]
    body = [[r["name"], r["status"], r["strategy"] or "-", r["backbone"] or "-", str(r["weights"] or "-"),
             metric(r["val_accuracy"]), str(r["epochs"]), human_age(r["age_seconds"]), human_size(r["size_bytes"])]
            for r in rows]
    lines = text_table(header, body).splitlines()
    out = lines[:1]
    for row, line in zip(rows, lines[1:]):
        out.append(line)
        if row["status"] in ("failed", "diverged") and row["error"]:
            out.append(f"    {row['status']}: {row['error']}")
    return "\n".join(out)


# ---- compare --------------------------------------------------------------------
def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and not prefix:
            out.update(flatten(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(configs: list[dict]) -> dict[str, list]:
    """Dotted config keys whose values are not the same in every run (missing keys count as different)."""
    keys = sorted(set().union(*configs)) if configs else []
    out = {}
    for key in keys:
        if key in IGNORED_KEYS:
            continue
        values = [c.get(key) for c in configs]
        if any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True) for v in values[1:]):
            out[key] = values
    return out


def resolve_run(path: str | Path) -> Path:
    path = Path(path)
    if not is_run_dir(path):
        raise ModelNotFoundError(f"{str(path)!r} is not a run folder (no {RUN_FILE} or config.json). "
                                 f"Pass folders that 'tl-app train' wrote; 'tl-app runs list' shows them.")
    return path


def compare_runs(run_dirs: list[str | Path]) -> dict:
    """Metrics and the settings that differ, for several runs (insight.runs_page draws the HTML page)."""
    if len(run_dirs) < 2:
        raise ModelNotFoundError(f"runs compare needs two or more run folders, got {len(run_dirs)}.")
    dirs = [resolve_run(p) for p in run_dirs]
    rows = [run_row(d) for d in dirs]
    names = [r["name"] if [x["name"] for x in rows].count(r["name"]) == 1 else r["path"] for r in rows]
    configs = [flatten(c) if isinstance(c := read_json(d / "config.json"), dict) else {} for d in dirs]
    return {"runs": [{**row, "label": name} for row, name in zip(rows, names)],
            "differences": config_differences(configs), "out": None}


def format_comparison(result: dict) -> str:
    """The console half of 'tl-app runs compare': metrics, then the differing settings, one column per run."""
    runs = result["runs"]
    labels = [r["label"] for r in runs]
    rows = [[key, *(fmt(r) for r in runs)] for key, fmt in (
        ("status", lambda r: r["status"]), ("strategy", lambda r: str(r["strategy"])),
        ("backbone", lambda r: str(r["backbone"])), ("weights", lambda r: str(r["weights"])),
        ("val_accuracy", lambda r: metric(r["val_accuracy"])), ("val_loss", lambda r: metric(r["val_loss"])),
        ("best_epoch", lambda r: str(r["best_epoch"] if r["best_epoch"] is not None else "-")),
        ("epochs", lambda r: str(r["epochs"])))]
    text = text_table(["", *labels], rows)
    if result["differences"]:
        text += "\n\nsettings that differ:\n" + text_table(
            ["", *labels], [[k, *(json.dumps(v) for v in values)] for k, values in result["differences"].items()])
    else:
        text += "\n\nsettings: identical"
    if result["out"]:
        text += f"\n\ncomparison page: {result['out']}"
    return text
