"""tl-app backbones: the supported backbones and their cached weights."""

from __future__ import annotations
import click
from tl_app.cli.common import echo_json, load_api


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def backbones(as_json):
    """List the supported backbones.

    \b
    Columns: default input size, pooled feature width, parameters without the
    top, preprocessing mode, unfreezable blocks (top first), and whether the
    ImageNet weights are already in the local Keras cache.

    \b
    Example:
      tl-app backbones
    """
    api = load_api()

    rows = []
    for spec in api.REGISTRY.values():
        rows.append({
            "name": spec.name, "input_size": spec.default_size, "min_size": spec.min_size,
            "feature_width": spec.feature_width, "params": spec.params, "preprocess": spec.preprocess,
            "blocks": list(spec.blocks), "imagenet_cached": api.cache_path(spec).is_file(),
        })
    if as_json:
        echo_json(rows)
        return
    header = f"{'name':<12} {'input':>5} {'features':>8} {'params':>12}  {'preprocess':<10} {'imagenet':<8}  blocks (top first)"
    click.echo(header)
    for r in rows:
        click.echo(
            f"{r['name']:<12} {r['input_size']:>5} {r['feature_width']:>8} {r['params']:>12,}  "
            f"{r['preprocess']:<10} {'cached' if r['imagenet_cached'] else '-':<8}  {','.join(r['blocks'])}"
        )


COMMANDS = [backbones]
