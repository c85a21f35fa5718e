"""tl-app lr-find: the learning-rate range test, its plot and a suggested rate."""

from __future__ import annotations

import click

from tl_app.cli.common import (echo_json, feature_config, feature_options, load_api, pipeline_options,
                               require_data_folder)


@click.command("lr-find")
@click.argument("data", required=False, type=click.Path())
@click.option("--out", default="lr_find.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the plot (loss against learning rate).")
@feature_options
@click.option("--json", "as_json", is_flag=True, help="Print rates, losses and the suggestion as JSON.")
@pipeline_options
def lr_find(data, out, backbone, weights, input_size, layer, cache_dir, as_json, pipeline, sets):
    """Suggest a learning rate for DATA: the range test on its cached features.

    The head trains for up to 100 steps while the rate grows from 1e-7 to 10;
    the suggestion is where the smoothed loss falls fastest. It is the rate of
    the head (phase 1 of fine-tuning). 'tl-app train --lr auto' runs it first
    and trains at the suggestion.

    \b
    Examples:
      tl-app lr-find datasets/sample --backbone vgg16 --weights hed-vgg16
      tl-app lr-find photos/ -b resnet50 --out lr.png --json
    """
    config = feature_config(pipeline, sets, data, backbone, weights, input_size, layer, cache_dir)
    require_data_folder(config.data.root)
    api = load_api()
    result = api.lr_find(config, out=out, echo=None if as_json else click.echo)
    if as_json:
        echo_json({k: result[k] for k in ("suggested", "steps", "diverged", "train_images", "plot", "rates",
                                          "losses", "smoothed")})


COMMANDS = [lr_find]
