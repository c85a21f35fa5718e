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
    top and their float32 size (MB), speed (images/s at the default size and
    batch 32 against ResNet50, measured on a 2-core CPU by
    bench/bench_backbone.py), preprocessing mode (raw: the backbone
    normalises 0..255 pixels with its own layers), unfreezable blocks (top
    first), and whether the ImageNet weights are in the local Keras cache.

    \b
    Example:
      tl-app backbones
    """
    api = load_api()

    rows = []
    for spec in api.REGISTRY.values():
        rows.append({
            "name": spec.name, "input_size": spec.default_size, "min_size": spec.min_size,
            "feature_width": spec.feature_width, "params": spec.params, "float32_mb": spec.float32_mb,
            "speed_vs_resnet50": spec.speed_vs_resnet50, "preprocess": spec.preprocess,
            "blocks": list(spec.blocks), "imagenet_cached": api.cache_path(spec).is_file(),
        })
    if as_json:
        echo_json(rows)
        return
    header = (f"{'name':<17} {'input':>5} {'features':>8} {'params':>12} {'MB':>6} {'speed':>6}  {'preprocess':<10} "
              f"{'imagenet':<8}  blocks (top first)")
    click.echo(header)
    for r in rows:
        blocks = r["blocks"] if len(r["blocks"]) <= 6 else r["blocks"][:5] + [f"... ({len(r['blocks'])} blocks)"]
        click.echo(
            f"{r['name']:<17} {r['input_size']:>5} {r['feature_width']:>8} {r['params']:>12,} {r['float32_mb']:>6.1f} "
            f"{r['speed_vs_resnet50']:>5.2f}x  {r['preprocess']:<10} {'cached' if r['imagenet_cached'] else '-':<8}  "
            f"{','.join(blocks)}"
        )
    click.echo("speed: images/s at the input size and batch 32 against resnet50 (2-core CPU, "
               "bench/bench_backbone.py); MB: float32 parameters")


COMMANDS = [backbones]
