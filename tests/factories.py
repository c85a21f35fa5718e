"""Builders for real artifacts that several test modules need."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tl_app.core.config import Config


def small_config(base: Path, sample_dir: Path, backbone: str = "resnet50") -> Config:
    """A Config that builds in seconds: random weights, 32x32 inputs, a 16-unit head, outputs under ``base``.

    VGG16 is the fastest real model to trace and save; ResNet50 has BatchNorm and residual blocks.
    """
    config = Config()
    config.data.root = str(sample_dir)
    config.backbone.name = backbone
    config.backbone.weights = "none"
    config.backbone.input_size = 32
    config.features.cache_dir = str(Path(base) / "cache" / "features")
    config.train.runs_dir = str(Path(base) / "runs")
    config.head.units = [16]
    config.export.root = str(Path(base) / "saved_models")
    return config


def make_run_dir(config: Config, metrics: dict | None = None) -> Path:
    """A run directory exactly as training leaves it, with an untrained head.

    Real files: config, manifest, run.json and model.keras (image -> preprocess ->
    backbone -> pool -> head). Use it where a test needs a model, not a good one.
    """
    from tl_app.models.backbones import build_feature_model
    from tl_app.models.surgery import assemble
    from tl_app.models.heads import build_head
    from tl_app.models.artifacts import MODEL_FILE
    from tl_app.training.runs import write_run_info
    from tl_app.training.runs import prepare_run

    prepared = prepare_run(config, echo=None)
    b = config.backbone
    feature_model = build_feature_model(prepared.spec, prepared.input_size, b.weights, b.seed, b.layer, b.pooling)
    head = build_head(prepared.manifest.num_classes, int(feature_model.output.shape[-1]), config.head)
    model = assemble(feature_model, head)
    model.save(prepared.run_dir / MODEL_FILE)
    write_run_info(prepared.run_dir, metrics=metrics or {"val_accuracy": None, "val_loss": None})
    return prepared.run_dir


def shared_export(tmp_path_factory, sample_dir) -> dict:
    """{run_dir, root, name, version_dir, result}: one run exported as savedmodel,keras,tflite."""
    from tl_app.export.exporter import export_run

    base = tmp_path_factory.getbasetemp() / "shared-export"
    marker = base / "export.json"
    if marker.is_file():
        data = json.loads(marker.read_text())
        return {k: Path(v) if k in ("run_dir", "root", "version_dir") else v for k, v in data.items()}
    base.mkdir(parents=True, exist_ok=True)
    config = small_config(base, sample_dir, backbone="vgg16")
    config.train.name = "shapes"
    run_dir = make_run_dir(config, metrics={"val_accuracy": 0.5, "val_loss": 1.1})
    result = export_run(run_dir, root=base / "saved_models", name="shapes",
                        formats="savedmodel,keras,tflite", echo=None)
    data = {"run_dir": str(run_dir), "root": str(base / "saved_models"), "name": "shapes",
            "version_dir": str(result["path"]), "result": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in result.items()}}
    marker.write_text(json.dumps(data))
    return shared_export(tmp_path_factory, sample_dir)


def reference_pixels(run_dir: Path, split: str = "all"):
    """The training pipeline's own pixels (tf.data decode + resize) and the files they came from."""
    from tl_app.data.manifest import Manifest
    from tl_app.data.pipeline import make_dataset

    info = json.loads((run_dir / "run.json").read_text())
    records = Manifest.load(run_dir / "manifest.json").split(split)
    ds = make_dataset(records, int(info["input_size"]), info["resize_policy"], batch_size=64, with_index=True)
    images, index = [], []
    for x, i in ds:
        images.append(x.numpy())
        index.append(i.numpy())
    return np.concatenate(images), [records[i] for i in np.concatenate(index)]
