"""tl-app patches: the image regions that make each feature fire hardest."""

from __future__ import annotations
import click
from tl_app.core.errors import ConfigError
from tl_app.cli.common import echo_json, load_api, require_data_folder, require_some_used


@click.command()
@click.argument("source", metavar="MODEL_OR_BACKBONE")
@click.argument("data", type=click.Path())
@click.option("--layer", default="", help="Convolutional layer (default: the backbone's last convolutional block).")
@click.option("--units", type=int, default=8, show_default=True,
              help="Show the N units with the highest variance across the images (or, with --for-class, "
                   "the N with the largest head weights).")
@click.option("--unit", "unit_ids", type=int, multiple=True, help="Show this unit (channel); repeat for more.")
@click.option("--for-class", "for_class", default=None,
              help="Units a trained model's head weighs most for this class (MODEL must be a run or export).")
@click.option("--per-unit", type=int, default=6, show_default=True, help="Patches per unit (top-K).")
@click.option("--weights", default="none", show_default=True,
              help="For a backbone name: imagenet | hed-vgg16 | none | PATH to a weight file.")
@click.option("--input-size", type=int, default=0, help="For a backbone name: square input size.")
@click.option("--resize-policy", type=click.Choice(["auto", "center_crop", "stretch", "letterbox"]),
              default="auto", show_default=True, help="For a backbone name (a trained model uses its own).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="patches.png", show_default=True,
              help="Contact sheet PNG; the list goes next to it as .json.")
@click.option("--cache-dir", default=".cache/patches", show_default=True,
              help="Keep the pass (every unit's top-K) here: other --unit/--units/--for-class need no new pass.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the pass cache.")
@click.option("--json", "as_json", is_flag=True, help="Print (file, unit, value, box) of every patch as JSON.")
def patches(source, data, layer, units, unit_ids, for_class, per_unit, weights, input_size, resize_policy,
            batch_size, out, cache_dir, no_cache, as_json):
    """Maximal-activation patches: for each unit of a layer, the K image regions of DATA that excite it most.

    MODEL_OR_BACKBONE is a run directory, an exported model, or a backbone name (vgg16, resnet50, ...).
    Boxes are each unit's receptive field, mapped back through the model's resize policy onto the
    original image.

    \b
    Examples:
      tl-app patches vgg16 datasets/sample --weights hed-vgg16 --layer block4_conv3 --out sheet.png
      tl-app patches runs/flowers datasets/flowers --for-class roses --units 6
      tl-app patches runs/flowers datasets/flowers --unit 12 --unit 40 --per-unit 10 --json
    """
    if per_unit < 1 or units < 1 or batch_size < 1:
        raise ConfigError(f"--per-unit, --units and --batch-size must be at least 1, got {per_unit}, {units} "
                          f"and {batch_size}.")
    require_data_folder(data)
    api = load_api()
    summary = api.patches(source, data, layer=layer, units=units, unit_ids=list(unit_ids), per_unit=per_unit,
                          for_class=for_class, out=out, weights=weights, input_size=input_size,
                          resize_policy=resize_policy, batch_size=batch_size, echo=None if as_json else click.echo,
                          cache_dir=None if no_cache else cache_dir)
    if as_json:
        echo_json(summary)
    require_some_used("images", summary["images"], summary["skipped"])


COMMANDS = [patches]
