"""Builders for real artifacts that several test modules need."""

from __future__ import annotations

from pathlib import Path

from tl_app.config import Config


def make_run_dir(config: Config, metrics: dict | None = None) -> Path:
    """A run directory exactly as training leaves it, with an untrained head.

    Real files: config, manifest, run.json and model.keras (image -> preprocess ->
    backbone -> pool -> head). Use it where a test needs a model, not a good one.
    """
    from tl_app.backbones import build_feature_model
    from tl_app.heads import assemble, build_head
    from tl_app.runs import MODEL_FILE, write_run_info
    from tl_app.train import prepare_run

    prepared = prepare_run(config, echo=None)
    b = config.backbone
    feature_model = build_feature_model(prepared.spec, prepared.input_size, b.weights, b.seed, b.layer, b.pooling)
    head = build_head(prepared.manifest.num_classes, int(feature_model.output.shape[-1]), config.head)
    model = assemble(feature_model, head)
    model.save(prepared.run_dir / MODEL_FILE)
    write_run_info(prepared.run_dir, metrics=metrics or {"val_accuracy": None, "val_loss": None})
    return prepared.run_dir
