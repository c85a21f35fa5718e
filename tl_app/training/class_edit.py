"""Adding or removing a class of a k-NN or prototype model without training, and without TensorFlow.

The head's state is its examples (k-NN) or class means (prototype), so a class
is added from its own images' features alone: the other classes' prototypes or
stored neighbours are not touched, which is why their accuracy cannot drop
except where the new class is genuinely closer. The new model file is the old
one with the head's settings and weights rewritten (models.keras_archive);
TensorFlow loads only if a new image's features are not in the cache
(``extractor_class`` is then built) or when an export is published (api).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.config import Config
from tl_app.core.errors import ConfigError, DataError, TlAppError
from tl_app.core.files import slug, write_json
from tl_app.data.images import probe_file
from tl_app.data.manifest import Manifest, Record, Skipped
from tl_app.data.scan import walk
from tl_app.features.gather import extract_features
from tl_app.models.artifacts import (CARD_FILE, KERAS_FILE, MODEL_FILE, RUN_FILE, read_card, read_run_info,
                                     resolve_version_dir)
from tl_app.models.head_state import added, removed
from tl_app.models.keras_archive import read_head, write_with_head

NOT_FEWSHOT = ("{source} has a {kind!r} head: its classes are the outputs of trained weights, so a class cannot be "
               "added or removed without training again. Train a head that stores its examples instead: "
               "tl-app train DATA --strategy bottleneck --head prototype (or --head knn); the features are cached, "
               "so this takes seconds. Then use 'tl-app classes add' on that run or its export.")

METRIC_RUN = ("{source} was trained with --strategy metric: its head sits on learned embeddings, and 'classes' "
              "does not project a new class's images into them yet. Train it again with the new class folder "
              "(tl-app train DATA --strategy metric), or use a bottleneck prototype/k-NN model "
              "(--strategy bottleneck --head prototype), whose classes can be edited.")


def folder_manifest(folder: Path, name: str, config: Config) -> Manifest:
    """The images of one folder as a one-class manifest (content hashes: the feature cache's keys)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} is not a folder. Expected a folder of images of the new class "
                        f"{name!r}, e.g. tl-app classes add MODEL {name} photos/{name}/")
    manifest = Manifest(root=str(folder.resolve()), layout="class-folders", classes=[name])
    for path, problem in walk(folder, within=folder):
        if problem:
            continue
        manifest.files_found += 1
        probe = probe_file(path, config.data.max_pixels)
        if not probe.ok:
            manifest.skipped.append(Skipped(str(path), probe.reason))
            continue
        manifest.records.append(Record(path=str(path.absolute()), relpath=path.relative_to(folder).as_posix(),
                                       label=name, label_index=0, split="train", sha256=probe.sha256,
                                       format=probe.format, width=probe.width, height=probe.height,
                                       fast=probe.fast, dhash=probe.dhash))
    if not manifest.records:
        raise DataError(f"No usable images in {folder} ({manifest.files_found} files found"
                        + (f"; e.g. {manifest.skipped[0].path}: {manifest.skipped[0].reason}" if manifest.skipped
                           else "") + "). Put JPEG/PNG images of the new class in it.")
    return manifest


def open_source(source: str | Path) -> dict:
    """A run folder or an exported model (newest version): its model file, run.json-like info and config."""
    source = Path(source)
    if (source / RUN_FILE).is_file():
        info = read_run_info(source)
        config_file = source / "config.json"
        return {"kind": "run", "path": source, "model_file": source / MODEL_FILE, "info": info,
                "config": json.loads(config_file.read_text()) if config_file.is_file() else {},
                "manifest": source / "manifest.json"}
    version_dir = resolve_version_dir(source)
    card = read_card(version_dir)
    if not card:
        raise TlAppError(f"{version_dir} has no {CARD_FILE}: expected a run folder or an exported model "
                         f"(saved_models/<name>).")
    if not (version_dir / KERAS_FILE).is_file():
        raise TlAppError(f"{version_dir} has no {KERAS_FILE}, which 'classes' edits. Export the run with the keras "
                         f"format (tl-app export RUN --formats savedmodel,keras) and try again.")
    views = int(((card.get("tta") or {}).get("views")) or 1)
    if views > 1:  # its model.keras holds the views around the head; an edit would publish it without saying so
        raise TlAppError(f"{version_dir} was exported with --tta {views} (test-time views in its graph), which "
                         f"'classes' does not edit. Edit its run instead ({card.get('run_dir') or 'runs/<name>'}), "
                         f"then export the new run with --tta {views}.")
    info = {k: card.get(k) for k in ("classes", "backbone", "weights", "weights_fingerprint", "input_size",
                                     "resize_policy", "strategy", "metrics", "dataset_fingerprint", "data_root")}
    info["preprocess"] = (card.get("preprocessing") or {}).get("mode", "")
    origin = Path(card.get("run_dir") or "")
    return {"kind": "export", "path": version_dir, "model_dir": version_dir.parent, "model_file": version_dir / KERAS_FILE,
            "info": info, "config": card.get("config") or {}, "card": card,
            "manifest": origin / "manifest.json" if card.get("run_dir") else None}


def edit_classes(source: str | Path, add: tuple[str, str | Path] | None = None, remove: str | None = None,
                 runs_dir: str | Path | None = None, echo=print, *, extractor_class: Callable) -> dict:
    """A new run folder whose model is ``source``'s with one class added (features of its images only, from the
    cache where present) or removed. Nothing in ``source`` changes; the caller publishes the result.

    ``extractor_class(config, recipe)`` runs the backbone for images the cache lacks (features.gather)."""
    say = echo or (lambda *a, **k: None)
    opened = open_source(source)
    info, classes = dict(opened["info"]), list(opened["info"]["classes"])
    if info.get("strategy") == "metric":
        raise TlAppError(METRIC_RUN.format(source=source))
    state = read_head(opened["model_file"])
    if state is None:
        kind = (info.get("head") or {}).get("kind") or (opened["config"].get("head") or {}).get("kind") or "dense"
        raise TlAppError(NOT_FEWSHOT.format(source=source, kind=kind))
    if state.num_classes != len(classes):
        raise TlAppError(f"{opened['model_file']} has {state.num_classes} classes but its run/card lists "
                         f"{len(classes)}: the files do not belong together. Export or train the model again.")
    config = Config.from_dict(opened["config"], source=str(source)) if opened["config"] else Config()
    stats: dict = {}
    if add is not None:
        name, folder = add
        if not name or name != name.strip() or "/" in name:
            raise ConfigError(f"Class name {name!r} is not usable: give a non-empty name without '/' or edge spaces.")
        if name in classes:
            raise ConfigError(f"{source} already has a class {name!r} (classes: {', '.join(classes)}). Remove it "
                              f"first (tl-app classes remove MODEL {name}) or pick another name.")
        manifest = folder_manifest(Path(folder), name, config)
        feature_set = extract_features(config, manifest=manifest, echo=echo, extractor_class=extractor_class)
        stats = dict(feature_set.stats)
        new_state = added(state, np.asarray(feature_set.features, np.float32))
        classes.append(name)
        change = {"added": name, "images": int(stats.get("used", 0)), "computed": stats.get("computed"),
                  "cached": stats.get("cached"), "folder": str(Path(folder).resolve())}
    elif remove is not None:
        if remove not in classes:
            raise ConfigError(f"{source} has no class {remove!r}; its classes are: {', '.join(classes)}.")
        if len(classes) <= 2:
            raise ConfigError(f"{source} has only {len(classes)} classes; a classifier needs at least two, so "
                              f"{remove!r} cannot be removed. Add another class first.")
        new_state = removed(state, classes.index(remove))
        classes.remove(remove)
        change = {"removed": remove}
    else:
        raise ConfigError("Nothing to do: give a class to add (NAME FOLDER) or to remove (NAME).")
    base = opened["path"].name if opened["kind"] == "run" else f"{opened['model_dir'].name}-v{opened['path'].name}"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    verb = f"plus-{slug(change['added'])}" if "added" in change else f"minus-{slug(change['removed'])}"
    root = Path(runs_dir or config.train.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / f"{slug(base)}-{verb}-{stamp}"
    temp = root / f".{run_dir.name}.tmp"
    temp.mkdir()
    try:
        write_with_head(opened["model_file"], temp / MODEL_FILE, new_state)
        write_json(temp / "config.json", opened["config"])
        if opened.get("manifest") and Path(opened["manifest"]).is_file():
            shutil.copy2(opened["manifest"], temp / "manifest.json")  # the export's golden images
        history = list(info.get("class_changes") or [])
        history.append({**change, "source": str(Path(source).resolve()),
                        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        info.update(classes=classes, num_classes=len(classes), status="finished", class_changes=history,
                    head=info.get("head") or {"kind": "knn" if new_state.kind == "KnnHead" else "prototype"})
        if (info.get("ood") or {}).get("method", "none") != "none":  # fitted on the old classes: not carried over
            info["ood"] = {"method": "none", "reason": "the classes changed after the unknown-scorer was fitted"}
        info.pop("pid", None)
        write_json(temp / RUN_FILE, info)
        temp.rename(run_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    say(f"classes: {', '.join(classes)} ({'added ' + change['added'] if 'added' in change else 'removed ' + change['removed']}"
        + (f"; {change['images']} images: {change['computed']} computed, {change['cached']} from the cache"
           if "added" in change else "") + ")")
    return {"run_dir": str(run_dir), "classes": classes, "change": change, "source": opened, "features": stats}
