"""tl-app train: both strategies, from flags or a pipeline TOML."""

from __future__ import annotations

import click

from tl_app.core.errors import ConfigError

from tl_app.cli.common import require_data_folder, build_config, echo_json, engine_options, engine_overrides, load_api, pipeline_options


class LearningRateType(click.ParamType):
    """A positive number, or "auto" (the range test chooses)."""

    name = "RATE|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or isinstance(value, float):
            return value
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if rate is None:  # the range (> 0) is checked with the configuration, as for a TOML value
            self.fail(f"expected a positive number such as 1e-3, or auto; got {value!r}", param, ctx)
        return rate


LEARNING_RATE = LearningRateType()


@click.command()
@click.argument("data", required=False, type=click.Path())
@click.option("--strategy", type=click.Choice(["bottleneck", "finetune", "metric"]), default=None,
              help="bottleneck: head on cached features (fast). finetune: two-phase fine-tuning. metric: a "
                   "projection trained by a contrastive loss on cached features, then a prototype head (or --head "
                   "knn) on its embeddings; prints retrieval recall@1/5 and mAP before and after.")
@click.option("--backbone", "-b", default=None, help="See 'tl-app backbones'; auto: compare candidates by a linear probe (tl-app select) and train the winner.")
@click.option("--weights", default=None, help="imagenet | none | PATH to a weight file.")
@click.option("--input-size", type=int, default=None, help="Square input size (default: the backbone's).")
@click.option("--epochs", type=int, default=None, help="Head epochs (phase 1).")
@click.option("--finetune-epochs", type=int, default=None, help="Phase 2 epochs (finetune).")
@click.option("--unfreeze-blocks", type=int, default=None, help="Top backbone blocks to unfreeze in phase 2.")
@click.option("--batch-size", type=int, default=None)
@click.option("--learning-rate", "--lr", type=LEARNING_RATE, default=None,
              help="A rate such as 3e-4, or auto: run the learning-rate range test first (tl-app lr-find) and "
                   "train at its suggestion.")
@click.option("--optimizer", default=None, help="sgd rmsprop adagrad adadelta adam adamw nadam")
@click.option("--schedule", default=None, help="constant cosine step plateau")
@click.option("--head", "head_kind", default=None, help="dense | logistic | knn | prototype (knn/prototype: no gradient training, classes can be added later)")
@click.option("--class-weights", default=None, help="balanced | none")
@click.option("--augment-views", type=int, default=None, help="Cached augmented views per training image.")
@click.option("--mixed-precision", default=None, help="none | float16 | bfloat16")
@click.option("--jit-compile/--no-jit-compile", default=None, help="XLA compilation.")
@click.option("--distribute", default=None, help="none | mirrored | multi-worker")
@click.option("--seed", type=int, default=None)
@click.option("--name", default=None, help="Run name (folder under --runs-dir).")
@click.option("--runs-dir", default=None, help="Where run folders go (default runs/).")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue an interrupted fine-tuning run from its folder; with --epochs/--finetune-epochs "
                   "raised, train a finished one longer.")
@click.option("--exclude", type=click.Path(dir_okay=False), default=None,
              help="issues.csv from 'tl-app datasets doctor': leave out the files whose action is exclude.")
@click.option("--relabel", type=click.Path(dir_okay=False), default=None,
              help="issues.csv: give the files whose action is relabel their suggested_label.")
@click.option("--calibration", type=click.Choice(["none", "temperature"]), default=None,
              help="temperature (default): fit a temperature on the validation split so that confidences match "
                   "accuracy; every export applies it. none: the model's raw probabilities.")
@click.option("--ood", type=click.Choice(["none", "knn", "mahalanobis"]), default=None,
              help="knn (default): cosine distance to the 5th nearest training feature; mahalanobis: distance to "
                   "the nearest class mean (shared covariance). Either is fitted on the training features with a "
                   "threshold accepting 95%% of validation images; exports answer 'unknown' above it. none: off.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@engine_options
@pipeline_options
def train(data, strategy, backbone, weights, input_size, epochs, finetune_epochs, unfreeze_blocks, batch_size,
          learning_rate, optimizer, schedule, head_kind, class_weights, augment_views, mixed_precision,
          jit_compile, distribute, seed, name, runs_dir, resume, exclude, relabel, calibration, ood, as_json, pipeline, sets, **engine):
    """Train a classifier on an image folder and write a run directory.

    \b
    Examples:
      tl-app train datasets/sample --strategy bottleneck --backbone resnet50
      tl-app train photos/ --strategy finetune --backbone vgg16 --unfreeze-blocks 1
      tl-app train -p pipelines/finetune-resnet50.toml
      tl-app train --resume runs/finetune-resnet50-20260101-120000
      tl-app train --resume runs/finetune-resnet50-20260101-120000 --finetune-epochs 8   (train it longer)
      TF_CONFIG=... tl-app train photos/ --strategy finetune --distribute multi-worker   (on every worker)
      tl-app train photos/ --strategy finetune --engine ray --address auto --num-workers 4
    """
    find_lr = learning_rate == "auto"
    settings = {
        "train.lr_find": True if find_lr else None, "train.learning_rate": None if find_lr else learning_rate,
        "data.root": data, "train.strategy": strategy, "backbone.name": backbone, "backbone.weights": weights,
        "backbone.input_size": input_size, "train.epochs": epochs, "train.finetune_epochs": finetune_epochs,
        "train.unfreeze_blocks": unfreeze_blocks, "train.batch_size": batch_size,
        "train.optimizer": optimizer, "train.schedule": schedule,
        "head.kind": head_kind, "data.class_weights": class_weights, "features.augment_views": augment_views,
        "train.mixed_precision": mixed_precision, "train.jit_compile": jit_compile,
        "train.distribute": distribute, "train.seed": seed, "train.name": name, "train.runs_dir": runs_dir,
        "data.exclude": exclude, "data.relabel": relabel, "train.calibration": calibration,
        "train.ood": ood,
    }
    if resume:
        extendable = ("train.epochs", "train.finetune_epochs")  # raised epoch counts continue a run
        given = [key for key, value in settings.items() if value is not None and key not in extendable] \
            + (["--pipeline"] if pipeline else []) + [f"--set {item}" for item in sets]
        if given:
            raise ConfigError(f"--resume continues {resume} with the settings it started with (its config.json); "
                              f"it cannot also take {', '.join(given)}. Only --epochs and --finetune-epochs may "
                              f"be raised; drop the others, or start a new run to change them.")
        for flag, value in (("--epochs", epochs), ("--finetune-epochs", finetune_epochs)):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} must be 0 or more, got {value}.")
    config = build_config(pipeline, sets, **settings, **engine_overrides(engine))
    if not resume:
        require_data_folder(config.data.root)
    api = load_api()  # every check above runs without TensorFlow
    more = {"epochs": epochs, "finetune_epochs": finetune_epochs} if resume else None
    summary = api.train(config, resume=resume, echo=None if as_json else click.echo, more_epochs=more)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"run directory: {summary['run_dir']}")


COMMANDS = [train]
