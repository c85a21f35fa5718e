"""tl-app datasets doctor: label issues, duplicates, outliers and poor images, from cached features."""

from __future__ import annotations

import click

from tl_app.cli.common import build_config, echo_json, load_api, pipeline_options, require_data_folder

OUTPUT_HELP = """\b
Output (nothing in DATA is moved or deleted):
  OUT/doctor.json  every finding and its score
  OUT/doctor.html  one self-contained page, thumbnails grouped by kind
  OUT/issues.csv   path,relpath,kind,action,given_label,suggested_label,...
                   edit the action column (exclude | relabel | keep), then
                   tl-app train DATA --exclude OUT/issues.csv --relabel OUT/issues.csv
"""


@click.command("doctor", epilog=OUTPUT_HELP)
@click.argument("data", type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default runs/doctor).")
@click.option("--backbone", "-b", default=None, help="See 'tl-app backbones'.")
@click.option("--weights", default=None, help="imagenet | none | hed-vgg16 | PATH to a weight file.")
@click.option("--input-size", type=int, default=None, help="Square input size (default: the backbone's).")
@click.option("--layer", default=None, help="Take features from this backbone layer (default: the last block).")
@click.option("--pooling", type=click.Choice(["avg", "max", "flatten"]), default=None)
@click.option("--resize-policy", default=None, help="auto | stretch | center_crop | letterbox")
@click.option("--batch-size", type=int, default=None)
@click.option("--cache-dir", default=None, help="Feature cache folder (default .cache/features).")
@click.option("--folds", type=click.IntRange(2, 20), default=5, show_default=True,
              help="Folds of the out-of-fold logistic heads (label issues).")
@click.option("--cosine", type=click.FloatRange(0.5, 1.0), default=None,
              help="Feature-space near-duplicate threshold (default 0.97).")
@click.option("--json", "as_json", is_flag=True, help="Print doctor.json's counts and outputs on stdout.")
@pipeline_options
def doctor(data, out_dir, backbone, weights, input_size, layer, pooling, resize_policy, batch_size, cache_dir,
           folds, cosine, as_json, pipeline, sets):
    """Find label mistakes, duplicates, outliers and poor images in DATA, before training.

    \b
    Examples:
      tl-app datasets doctor photos/ --backbone vgg16 --out doctor/
      tl-app datasets doctor photos/ --weights hed-vgg16 -b vgg16 --json
    """
    config = build_config(pipeline, sets, **{
        "data.root": data, "backbone.name": backbone, "backbone.weights": weights,
        "backbone.input_size": input_size, "backbone.layer": layer, "backbone.pooling": pooling,
        "data.resize_policy": resize_policy, "data.batch_size": batch_size, "features.cache_dir": cache_dir,
    })
    require_data_folder(config.data.root)
    api = load_api()
    options = {"folds": folds} if cosine is None else {"folds": folds, "cosine": cosine}
    report = api.doctor(config, out=out_dir, echo=click.echo if not as_json else None, **options)
    if as_json:
        echo_json({"images": report["images"], "counts": report["counts"], "outputs": report["outputs"],
                   "stats": report["stats"]})


COMMANDS: list = []  # attached to the 'datasets' group in tl_app.cli
