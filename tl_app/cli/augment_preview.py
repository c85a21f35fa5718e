"""tl-app augment-preview: see the augmented images fine-tuning trains on."""

from __future__ import annotations

import click

from tl_app.cli.common import build_config, echo_json, load_api, pipeline_options


@click.command("augment-preview")
@click.argument("data", required=False, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Grid image to write (.png).")
@click.option("--images", type=int, default=8, show_default=True, help="Images (rows), classes taken in turn.")
@click.option("--views", type=int, default=5, show_default=True, help="Augmented views per image (columns).")
@click.option("--backbone", "-b", default=None, help="Sets the default input size (see 'tl-app backbones').")
@click.option("--input-size", type=int, default=None, help="Square input size (default: the backbone's).")
@click.option("--seed", type=int, default=None, help="Augmentation seed (default train.seed).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pipeline_options
def augment_preview(data, out, images, views, backbone, input_size, seed, as_json, pipeline, sets):
    """Write a grid of training images and their augmented views ([augment] settings).

    \b
    Examples:
      tl-app augment-preview datasets/sample --out grid.png
      tl-app augment-preview -p pipelines/finetune-resnet50.toml --out grid.png --set augment.shear=0.2
    """
    config = build_config(pipeline, sets, **{"data.root": data, "backbone.name": backbone,
                                             "backbone.input_size": input_size})
    api = load_api()
    result = api.augment_preview(config, out, images=images, views=views, seed=seed, echo=None if as_json else click.echo)
    if as_json:
        echo_json(result)


COMMANDS = [augment_preview]
