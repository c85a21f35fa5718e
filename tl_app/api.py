"""The Python entry points: one function per job, each taking the one Config.

The command line is a thin layer over these; a notebook calls them directly::

    from tl_app import api
    from tl_app.core.config import load_config

    config = load_config("pipelines/quickstart.toml", {"data.root": "photos"})
    summary = api.train(config)
    api.export(config, summary["run_dir"])
    api.predict(config, "saved_models/photos", ["more-photos/"], out="preds.csv")

This module chooses the engine (this process or Ray) and hands the engines the
library function they run, so no lower layer needs to know about the ones above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tl_app.core.config import Config, ignored_by_strategy
from tl_app.core.errors import ConfigError
from tl_app.data.sample import write_ood_samples, write_sample_dataset  # noqa: F401  (entry points)
from tl_app.data.scan import inspect_dict, print_report, scan, scan_dataset  # noqa: F401
from tl_app.data.splits import class_weights  # noqa: F401
from tl_app.engines.distributed import train_on_ray
from tl_app.engines.ray_engine import RayExtractor, predict_paths_ray
from tl_app.export.exporter import export_run
from tl_app.features.extract import Extractor, default_out_dir, extract_features
from tl_app.features.store import FeatureSet, export_paths  # noqa: F401
from tl_app.inference import predict_paths
from tl_app.insight.augment_preview import augment_preview  # noqa: F401
from tl_app.insight.curves import write_training_report
from tl_app.insight.doctor import doctor  # noqa: F401  (tl-app datasets doctor)
from tl_app.insight.embed import embed  # noqa: F401
from tl_app.insight.evaluate import evaluate  # noqa: F401
from tl_app.insight.fewshot import fewshot_report as fewshot_episodes  # noqa: F401  (evaluate --episodes)
from tl_app.insight.explain import explain  # noqa: F401
from tl_app.insight.patches import patches  # noqa: F401
from tl_app.insight.report import build_report  # noqa: F401
from tl_app.insight.similarity import build_index, similar  # noqa: F401
from tl_app.models.backbones import REGISTRY, get_spec, import_weights  # noqa: F401
from tl_app.models.weights import cache_path, named_weights_status, weights_status  # noqa: F401
from tl_app.serve.app import serve as run_server
from tl_app.serve.model_config import read_model_config
from tl_app.training.bottleneck import train_bottleneck
from tl_app.training.class_edit import edit_classes
from tl_app.training.devices import is_chief
from tl_app.training.finetune import resume_finetune, train_finetune
from tl_app.training.lr_finder import lr_range_test
from tl_app.training.metric import train_metric
from tl_app.training.runs import write_run_info
from tl_app.insight.lr_range import plot_lr_range
from tl_app.insight.select import select_backbone, table_text


def train(config: Config, resume: str | Path | None = None, echo=print, more_epochs: dict | None = None) -> dict:
    """Run the configured strategy; returns a summary with the run directory.

    Every run ends with training curves (curves.png) and a one-line diagnosis.
    ``more_epochs`` ({"epochs", "finetune_epochs"}) raises a resumed run's epoch counts.
    """
    if resume is not None:
        summary = resume_finetune(resume, echo=echo, **{k: v for k, v in (more_epochs or {}).items() if v is not None})
    else:
        selection = None
        if config.backbone.name == "auto":  # compare the candidates by a linear probe, train the winner
            selection = select(config, config.backbone.candidates or None, config.backbone.select_budget, echo=echo)
            config = config.with_overrides({"backbone.name": selection["recommended"],
                                            "backbone.weights": selection["recommended_weights"]})
        get_spec(config.backbone.name)  # an unknown name fails before any work
        ignored = ignored_by_strategy(config)
        if ignored and echo:
            echo(f"warning: {', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} only to --strategy "
                 f"finetune; ignored with --strategy {config.train.strategy}")
        found = None
        if config.train.lr_find:  # the range test first (on the cached features the run then reuses)
            found = lr_find(config, out=None, echo=echo)
            if found["suggested"]:
                config = config.with_overrides({"train.learning_rate": found["suggested"]})
            elif echo:
                echo(f"lr-find: keeping train.learning_rate = {config.train.learning_rate:g}")
        if config.train.strategy == "bottleneck":
            summary = train_bottleneck(config, echo=echo)
        elif config.train.strategy == "metric":  # cached features, like bottleneck: this process
            summary = train_metric(config, echo=echo)
        elif config.engine.name == "ray":  # Ray Train runs the workers; the chief finishes the run
            return train_on_ray(config, chief=train, echo=echo)
        else:
            summary = train_finetune(config, echo=echo)
        if found is not None:
            summary["lr_find"] = record_lr_find(summary["run_dir"], found, config.train.learning_rate)
        if selection is not None:
            write_run_info(summary["run_dir"], backbone_selection=selection)
            summary["backbone_selection"] = {k: selection[k] for k in ("recommended", "why")}
    if not is_chief():  # a multi-worker run's other workers keep no history: the chief reports
        return summary
    return finish_run(summary, echo)


def select(config: Config, candidates=None, budget="10m", folds: int = 5, echo=print) -> dict:
    """tl-app select: a K-fold logistic probe per candidate backbone (cached features); the table and the pick."""
    selection = select_backbone(config, candidates, budget, folds, echo=echo)
    if echo:
        echo(table_text(selection))
    return selection


def lr_find(config: Config, out: str | Path | None = None, echo=print) -> dict:
    """The learning-rate range test on config's data (tl-app lr-find); the plot goes to ``out`` when given."""
    result = lr_range_test(config, echo=echo)
    if out is not None:
        result["plot"] = str(plot_lr_range(result, out))
        if echo:
            echo(f"plot: {result['plot']}")
    return result


def record_lr_find(run_dir: str | Path, found: dict, used: float) -> dict:
    """The range test's plot and outcome kept with the run (run.json "lr_find"), for the report."""
    plot = plot_lr_range(found, Path(run_dir) / "lr_find.png")
    record = {"suggested": found["suggested"], "used": used, "steps": found["steps"], "plot": plot.name,
              "why": ("steepest fall of the smoothed training loss in the range test" if found["suggested"]
                      else "the range test's loss never fell, so the configured rate was kept")}
    write_run_info(run_dir, lr_find=record)
    return record


def finish_run(summary: dict, echo=print) -> dict:
    """Curves and diagnosis for a finished run, printed and added to the summary."""
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


def extract(config: Config, out_dir: str | Path | None = None, echo: Callable | None = print) -> FeatureSet:
    """Bottleneck features of config.data.root, cached, exported to ``out_dir`` (default: default_out_dir)."""
    out = Path(out_dir) if out_dir is not None else default_out_dir(config)
    return extract_features(config, out_dir=out, echo=echo, extractor_class=backbone_extractor(config))


def backbone_extractor(config: Config):
    """The class that runs the backbone for extraction: Ray actors or this process. The CLI asks for it only
    once an image is missing from the cache (a fully cached run never imports TensorFlow)."""
    return RayExtractor if config.engine.name == "ray" else Extractor


def export(config: Config, run_dir: str | Path, name: str | None = None, echo=print) -> dict:
    """Export a run under config.export.root with config.export's formats and quantisation."""
    settings = config.export
    return export_run(run_dir, root=settings.root, name=name or settings.name or None, formats=settings.formats,
                      quantize=settings.quantize, echo=echo, tta=settings.tta)


def predict(config: Config, model, inputs, out: str | Path | None = None, echo=print, resume: bool = False) -> dict:
    """Classify files, folders and globs with config.predict's top-k and batch size; bad files become rows.
    ``resume``: keep the rows ``out`` already holds and predict only the rest."""
    settings = config.predict
    if resume and config.engine.name == "ray":
        raise ConfigError("--resume works with the local engine only: drop --engine ray to continue an "
                          "interrupted run, or drop --resume to start the file again.")
    if config.engine.name == "ray" and settings.precision != "fp32":
        raise ConfigError(f"--precision {settings.precision} works with the local engine only: drop --engine ray, or "
                          f"use --precision fp32 with it.")
    if config.engine.name == "ray" and settings.runtime != "keras":
        raise ConfigError(f"--runtime {settings.runtime} works with the local engine only: drop --engine ray, or "
                          f"use --runtime keras with it.")
    if config.engine.name == "ray" and settings.tta > 1:
        raise ConfigError(f"--tta {settings.tta} works with the local engine only: drop --engine ray, or export the "
                          f"model with --tta {settings.tta} (the views then run inside it) and predict without --tta.")
    if config.engine.name == "ray":  # Ray Data actors, one model each (docs/scale-out.md)
        return predict_paths_ray(model, inputs, config, out=out, top_k=settings.top_k,
                                 batch_size=settings.batch_size, echo=echo, progress=settings.progress,
                                 max_pixels=settings.max_pixels)
    return predict_paths(model, inputs, out=out, top_k=settings.top_k, batch_size=settings.batch_size, echo=echo,
                         progress=settings.progress, max_pixels=settings.max_pixels, resume=resume,
                         runtime=settings.runtime, tta=settings.tta, precision=settings.precision)


def serve(config: Config, root: str | Path | None = None, log_level: str = "warning", echo=print) -> None:
    """Serve every model under ``root`` (default config.export.root), or those of serve.model_config_file."""
    settings = config.serve
    if settings.model_config_file:
        sources = read_model_config(settings.model_config_file)
        run_server(None, host=settings.host, port=settings.port, settings=settings, log_level=log_level, echo=echo,
                   sources=sources)
        return
    root = Path(root or config.export.root)
    if not root.is_dir():
        raise ConfigError(f"Model root {str(root)!r} is not a folder. Export a model first "
                          f"(tl-app export RUN_DIR --root {root}) or pass the folder that holds them.")
    run_server(root, host=settings.host, port=settings.port, settings=settings, log_level=log_level, echo=echo)


def classes_add(model, name: str, folder, runs_dir=None, echo=print) -> dict:
    """Add class ``name`` (images in ``folder``) to a k-NN/prototype run or exported model; an export gets a new
    version published atomically (a running server picks it up), a run gets a new run folder."""
    return publish_edit(edit_classes(model, add=(name, folder), runs_dir=runs_dir, echo=echo,
                                     extractor_class=Extractor), echo)


def classes_remove(model, name: str, runs_dir=None, echo=print) -> dict:
    """Remove class ``name`` from a k-NN/prototype run or exported model (published as classes_add is)."""
    return publish_edit(edit_classes(model, remove=name, runs_dir=runs_dir, echo=echo, extractor_class=Extractor),
                        echo)


def publish_edit(edited: dict, echo=print) -> dict:
    """An edited export becomes the next version of the same model, with its formats and the parity gate."""
    source = edited.pop("source")
    result = {**edited, "published": None}
    if source["kind"] == "export":
        card = source["card"]
        model_dir = Path(source["model_dir"])
        result["published"] = export_run(edited["run_dir"], root=model_dir.parent, name=model_dir.name,
                                         formats=card.get("formats") or ("savedmodel", "keras"),
                                         quantize=bool(card.get("quantized")), echo=echo)
    return result
