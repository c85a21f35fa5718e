"""Run directories: one folder holds everything a training run produced.

Layout (both strategies)::

    runs/<name>/
        config.json, config.toml   resolved configuration
        manifest.json              the scanned dataset (labels, splits, hashes)
        skipped.csv, skipped.json  files that could not be used, with reasons
        run.json                   what export and inference need (classes, sizes, metrics)
        model.keras                raw pixels (0..255, input_size) -> class probabilities
        history.json, log.csv      per-epoch metrics
        metrics.json               final validation metrics
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from contextlib import contextmanager
from pathlib import Path

from tl_app.core.config import Config
from dataclasses import dataclass
from tl_app.models.backbones import BackboneSpec, get_spec, resolve_input_size
from tl_app.data.manifest import Manifest
from tl_app.data.scan import print_report
from tl_app.data.splits import class_weights
from tl_app.data.pipeline import effective_policy
from tl_app.models.weights import fingerprint
from tl_app.core.files import slug, write_json
from tl_app.data.scan import scan_dataset, too_few_classes
from tl_app.data.edits import apply_edits
from tl_app.core.errors import DataError, TlAppError
from tl_app.models.artifacts import RUN_FILE
from tl_app import __version__


def versions() -> dict:
    import keras
    import tensorflow as tf


    return {"tl_app": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


def new_run_dir(config: Config) -> Path:
    """runs/<name>; a timestamped name when none is given; never reuses a folder."""
    base = Path(config.train.runs_dir)
    name = config.train.name or f"{config.train.strategy}-{config.backbone.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    path = base / slug(name)
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{slug(name)}-{suffix}"
    path.mkdir(parents=True)
    return path


def write_run_info(run_dir: str | Path, **info) -> Path:
    """run.json: merged with what is already there."""
    path = Path(run_dir) / RUN_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(info)
    if info.get("status") in ("preparing", "training"):  # 'runs list' tells running from interrupted by these
        data.update(pid=os.getpid(), host=platform.node())
    data.setdefault("created", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    data["versions"] = versions()
    return write_json(path, data)


@contextmanager
def recording_failure(run_dir: str | Path, enabled: bool = True):
    """A run that stops on an error says so in run.json (status and reason), so 'runs list' can show it."""
    try:
        yield
    except KeyboardInterrupt:
        if enabled:
            write_run_info(run_dir, status="interrupted", error="interrupted (Ctrl-C); --resume continues it")
        raise
    except Exception as exc:
        if enabled:
            path = Path(run_dir) / RUN_FILE
            status = json.loads(path.read_text()).get("status") if path.is_file() else None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            write_run_info(run_dir, status="diverged" if status == "diverged" else "failed",
                           error=reason if isinstance(exc, TlAppError) else f"{type(exc).__name__}: {reason}")
        raise


def fmt(value) -> str:
    """A metric for the console: 4 decimals, or n/a when the run has none (no validation split)."""
    return "n/a" if value is None else f"{value:.4f}"


@dataclass
class PreparedRun:
    """What every strategy starts from."""

    config: Config
    run_dir: Path
    manifest: Manifest
    spec: BackboneSpec
    input_size: int
    resize_policy: str
    class_weights: dict[int, float]
    weights_fingerprint: str


def prepare_run(config: Config, run_dir: str | Path | None = None, echo=print) -> PreparedRun:
    """Scan the data, resolve backbone/weights/sizes, write config, manifest and bad-file report."""
    spec = get_spec(config.backbone.name)
    size = resolve_input_size(spec, config.backbone.input_size)
    weights_fp = fingerprint(spec, config.backbone.weights, config.backbone.seed,  # fails early if offline
                             memo_dir=config.features.cache_dir)
    manifest = scan_dataset(config)
    edits = apply_edits(manifest, config.data.exclude, config.data.relabel)  # the files stay as they are
    problem = too_few_classes(manifest)
    if problem:  # a softmax over one class is always "right": refuse before any work
        raise DataError(f"Cannot train on {config.data.root}: {problem}.")
    weights = class_weights(manifest, config.data.class_weights)
    run_dir = Path(run_dir) if run_dir else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write(run_dir)
    manifest.save(run_dir / "manifest.json")
    manifest.write_skipped_report(run_dir)
    policy = effective_policy(config.data.resize_policy)
    write_run_info(
        run_dir,
        status="preparing", strategy=config.train.strategy, backbone=spec.name, input_size=size, resize_policy=policy,
        preprocess=spec.preprocess, weights=config.backbone.weights, weights_fingerprint=weights_fp,
        classes=manifest.classes, dataset_fingerprint=manifest.fingerprint(), data_root=manifest.root,
        feature_layer=config.backbone.layer, pooling=config.backbone.pooling,
        class_weights={manifest.classes[i]: w for i, w in weights.items()},
        **({"data_edits": edits} if edits["exclude_file"] or edits["relabel_file"] else {}),
    )
    if echo:
        print_report(manifest, weights)
    return PreparedRun(config, run_dir, manifest, spec, size, policy, weights, weights_fp)
