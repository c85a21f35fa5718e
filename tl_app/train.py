"""Training entry point: prepare a run directory, then dispatch by strategy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tl_app.backbones import BackboneSpec, get_spec, resolve_input_size
from tl_app.config import Config
from tl_app.dataset import Manifest, class_weights, print_report, scan
from tl_app.pipeline import effective_policy
from tl_app.runs import new_run_dir, write_run_info
from tl_app.weights import fingerprint



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


def scan_dataset(config: Config) -> Manifest:
    """The configured dataset, with probes remembered next to the feature cache."""
    return scan(config.data.root, config.data, cache_dir=Path(config.features.cache_dir).parent / "scan")


def prepare_run(config: Config, run_dir: str | Path | None = None, echo=print) -> PreparedRun:
    """Scan the data, resolve backbone/weights/sizes, write config, manifest and bad-file report."""
    spec = get_spec(config.backbone.name)
    size = resolve_input_size(spec, config.backbone.input_size)
    weights_fp = fingerprint(spec, config.backbone.weights, config.backbone.seed,  # fails early if offline
                             memo_dir=config.features.cache_dir)
    manifest = scan_dataset(config)
    weights = class_weights(manifest, config.data.class_weights)
    run_dir = Path(run_dir) if run_dir else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write(run_dir)
    manifest.save(run_dir / "manifest.json")
    manifest.write_skipped_report(run_dir)
    policy = effective_policy(config.data.resize_policy)
    write_run_info(
        run_dir,
        strategy=config.train.strategy, backbone=spec.name, input_size=size, resize_policy=policy,
        preprocess=spec.preprocess, weights=config.backbone.weights, weights_fingerprint=weights_fp,
        classes=manifest.classes, dataset_fingerprint=manifest.fingerprint(), data_root=manifest.root,
        feature_layer=config.backbone.layer, pooling=config.backbone.pooling,
        class_weights={manifest.classes[i]: w for i, w in weights.items()},
    )
    if echo:
        print_report(manifest, weights)
    return PreparedRun(config, run_dir, manifest, spec, size, policy, weights, weights_fp)


def train(config: Config, resume: str | Path | None = None, echo=print) -> dict:
    """Run the configured strategy; returns a summary with the run directory.

    Every run ends with training curves (curves.png) and a one-line diagnosis.
    """
    if resume is not None:
        from tl_app.finetune import resume_finetune

        summary = resume_finetune(resume, echo=echo)
    else:
        get_spec(config.backbone.name)  # an unknown name fails before any work
        if config.train.strategy == "bottleneck":
            from tl_app.bottleneck import train_bottleneck

            summary = train_bottleneck(config, echo=echo)
        elif config.engine.name == "ray":  # Ray Train runs the workers; the chief finishes the run
            from tl_app.engines.distributed import train_on_ray

            return train_on_ray(config, echo=echo)
        else:
            from tl_app.finetune import train_finetune

            summary = train_finetune(config, echo=echo)
    from tl_app.engines.distributed import is_chief

    if not is_chief():  # a multi-worker run's other workers keep no history: the chief reports
        return summary
    return finish_run(summary, echo)


def finish_run(summary: dict, echo=print) -> dict:
    """Curves and diagnosis for a finished run, printed and added to the summary."""
    from tl_app.curves import write_training_report

    report = write_training_report(summary["run_dir"])
    summary["diagnosis"] = report["line"]
    summary["curves"] = report["curves"]
    if echo:
        echo(f"diagnosis: {report['line']}")
        if report["diagnosis"] not in ("healthy", "unknown"):
            for remedy in report["remedies"]:
                echo(f"  - {remedy}")
        echo(f"curves: {report['curves']}")
    return summary
