"""tl-app select: compare backbones on DATA by a linear probe on their cached features, and recommend one."""

from __future__ import annotations

import click

from tl_app.cli.common import (echo_json, feature_config, load_api, pipeline_options, require_data_folder)


@click.command("select")
@click.argument("data", required=False, type=click.Path())
@click.option("--backbones", default="", help="Comma-separated names as 'tl-app backbones' lists them "
                                               "(default: every registered backbone).")
@click.option("--budget", default="10m", show_default=True,
              help="Time for the whole comparison (90s, 10m, 1h); candidates are tried cheapest first.")
@click.option("--folds", type=int, default=5, show_default=True, help="K of the K-fold probe.")
@click.option("--weights", default=None, help="imagenet | none | hed-vgg16 | PATH, for every candidate; or per "
                                             "backbone, e.g. 'vgg16=hed-vgg16,none' (the unnamed entry: the rest).")
@click.option("--input-size", type=int, default=None, help="One size for every candidate (default: each one's).")
@click.option("--cache-dir", default=None, help="Bottleneck feature cache (default .cache/features).")
@click.option("--json", "as_json", is_flag=True, help="Print the table and the recommendation as JSON.")
@pipeline_options
def select(data, backbones, budget, folds, weights, input_size, cache_dir, as_json, pipeline, sets):
    """Recommend a backbone for DATA: a K-fold logistic probe on each one's features.

    Features are cached, so the training run that follows with the winner
    extracts nothing again. The test split is never used. 'tl-app train
    --backbone auto' runs the same comparison first (backbone.candidates,
    backbone.select_budget in the configuration).

    \b
    Examples:
      tl-app select photos/ --backbones vgg16,resnet50,resnet50v2 --budget 10m
      tl-app select datasets/sample --backbones vgg16,resnet50 --weights none --input-size 64 --json
      tl-app select photos/ --backbones vgg16,resnet50 --weights vgg16=hed-vgg16,none
    """
    if folds < 2:
        raise click.BadParameter(f"expected 2 or more folds, got {folds}", param_hint="--folds")
    config = feature_config(pipeline, sets, data, None, weights, input_size, None, cache_dir)
    require_data_folder(config.data.root)
    api = load_api()
    selection = api.select(config, backbones or None, budget, folds, echo=None if as_json else click.echo)
    if as_json:
        echo_json(selection)


COMMANDS = [select]
