"""tl-app datasets sample|inspect: sample data and a check of an image folder."""

from __future__ import annotations
import json
import sys
import click
from tl_app.cli.common import require_data_folder, build_config, load_api, pipeline_options


LAYOUTS = {
    "class-folders": "class folders (root/<class>/*); train/val/test drawn by data.val_fraction and test_fraction",
    "split-folders": "split folders (root/train|val|test/<class>/*); the given splits are used as they are",
}


@click.group()
def datasets():
    """Create the sample dataset and inspect image folders."""


@datasets.command("sample")
@click.argument("directory", type=click.Path(file_okay=False), default="datasets/sample")
@click.option("--seed", default=0, show_default=True, help="Same seed, same images.")
@click.option("--ood", is_flag=True,
              help="Write the out-of-distribution family instead: noise, textures, other shapes and photo crops, "
                   "from none of the sample's classes (for evaluate --ood-folder).")
@click.option("--per-kind", default=12, show_default=True, type=click.IntRange(1, 10000),
              help="With --ood: images of each kind.")
def datasets_sample(directory, seed, ood, per_kind):
    """Write the small procedural sample dataset (3 imbalanced classes, JPEG and PNG).

    \b
    Examples:
      tl-app datasets sample datasets/sample --seed 0
      tl-app datasets sample datasets/sample_ood --ood
    """
    api = load_api()

    if ood:
        summary = api.write_ood_samples(directory, seed, per_kind)
        counts = ", ".join(f"{k}: {v}" for k, v in summary["kinds"].items())
        click.echo(f"wrote {sum(summary['kinds'].values())} out-of-distribution images to {directory} ({counts})")
        for kind, why in summary["left_out"].items():
            click.echo(f"left out {kind}: {why}")
        return
    summary = api.write_sample_dataset(directory, seed)
    counts = ", ".join(f"{k}: {v}" for k, v in summary["classes"].items())
    click.echo(f"wrote {sum(summary['classes'].values())} images to {directory} ({counts})")


@datasets.command("inspect")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout, for scripts.")
@click.option("--strict", is_flag=True, default=None, help="Fail (listing them) if any file is bad.")
@click.option("--val-fraction", type=float, default=None)
@click.option("--test-fraction", type=float, default=None)
@click.option("--split-seed", type=int, default=None)
@click.option("--class-weights", default=None, help="balanced | none")
@click.option("--report", type=click.Path(file_okay=False), default=None,
              help="Also write skipped.csv/skipped.json here.")
@pipeline_options
def datasets_inspect(directory, as_json, strict, val_fraction, test_fraction, split_seed, class_weights,
                     report, pipeline, sets):
    """Per-class counts per split, formats, warnings and bad files; trains nothing.

    \b
    Examples:
      tl-app datasets inspect datasets/sample
      tl-app datasets inspect photos/ --json | jq .totals
    """
    config = build_config(pipeline, sets, **{
        "data.root": directory, "data.strict": strict, "data.val_fraction": val_fraction,
        "data.test_fraction": test_fraction, "data.split_seed": split_seed, "data.class_weights": class_weights,
    })
    require_data_folder(directory)
    api = load_api()
    manifest = api.scan(directory, config.data)
    weights_ = api.class_weights(manifest, config.data.class_weights)
    if report:
        manifest.write_skipped_report(report)
    if as_json:
        click.echo(json.dumps(api.inspect_dict(manifest, weights_), indent=2, ensure_ascii=False))
    else:
        click.echo(f"layout: {LAYOUTS.get(manifest.layout, manifest.layout)}")
        api.print_report(manifest, weights_, out=sys.stdout)


COMMANDS = [datasets]
