"""Commands about what is available: backbones, weights, datasets."""

from __future__ import annotations

import json
import sys

import click

from tl_app.cli.common import build_config, echo_json, pipeline_options


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
    from tl_app.backbones import REGISTRY
    from tl_app.weights import cache_path

    rows = []
    for spec in REGISTRY.values():
        rows.append({
            "name": spec.name, "input_size": spec.default_size, "min_size": spec.min_size,
            "feature_width": spec.feature_width, "params": spec.params, "preprocess": spec.preprocess,
            "blocks": list(spec.blocks), "imagenet_cached": cache_path(spec).is_file(),
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


@click.group()
def weights():
    """See and import pretrained weight files (for air-gapped machines)."""


@weights.command("status")
@click.option("--json", "as_json", is_flag=True)
def weights_status_cmd(as_json):
    """Which ImageNet weight files are in the Keras cache ($KERAS_HOME/models).

    \b
    Example:
      tl-app weights status
    """
    from tl_app.backbones import REGISTRY
    from tl_app.weights import weights_status

    rows = weights_status(REGISTRY.values())
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        state = "missing"
        if r["present"]:
            state = "present (official file)" if r["official"] else "present (not the official file: checksum differs)"
        click.echo(f"{r['backbone']:<12} {state:<50} {r['file']}")


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--backbone", "-b", required=True, help="Backbone the file belongs to, e.g. resnet50.")
def weights_import_cmd(file, backbone):
    """Check a local weight file against a backbone and put it in the Keras cache.

    \b
    Example (file copied from a machine with internet):
      tl-app weights import resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 --backbone resnet50
    """
    from tl_app.backbones import get_spec
    from tl_app.weights import import_weights

    result = import_weights(file, get_spec(backbone))
    click.echo(f"imported {file} -> {result['file']}")
    if not result["official"]:
        click.echo("note: the checksum differs from Keras' official ImageNet file; tl-app will use it as given.")


@click.group()
def datasets():
    """Create the sample dataset and inspect image folders."""


@datasets.command("sample")
@click.argument("directory", type=click.Path(file_okay=False), default="datasets/sample")
@click.option("--seed", default=0, show_default=True, help="Same seed, same images.")
def datasets_sample(directory, seed):
    """Write the small procedural sample dataset (3 imbalanced classes, JPEG and PNG).

    \b
    Example:
      tl-app datasets sample datasets/sample --seed 0
    """
    from tl_app.sample_data import write_sample_dataset

    summary = write_sample_dataset(directory, seed)
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
    from tl_app.dataset import class_weights as weights_of, inspect_dict, print_report, scan

    config = build_config(pipeline, sets, **{
        "data.root": directory, "data.strict": strict, "data.val_fraction": val_fraction,
        "data.test_fraction": test_fraction, "data.split_seed": split_seed, "data.class_weights": class_weights,
    })
    manifest = scan(directory, config.data)
    weights_ = weights_of(manifest, config.data.class_weights)
    if report:
        manifest.write_skipped_report(report)
    if as_json:
        click.echo(json.dumps(inspect_dict(manifest, weights_), indent=2, ensure_ascii=False))
    else:
        print_report(manifest, weights_, out=sys.stdout)


@click.command()
@click.option("--pipeline", "-p", default="pipelines/quickstart.toml", show_default=True,
              type=click.Path(dir_okay=False), help="Pipeline TOML to run.")
@click.option("--data", default=None, help="Dataset folder (default: the pipeline's; the sample is written if missing).")
@click.option("--json", "as_json", is_flag=True)
def quickstart(pipeline, data, as_json):
    """Run the main job on the bundled sample data, end to end.

    \b
    Writes datasets/sample if missing, trains a head on cached ResNet50
    features, exports to saved_models/quickstart/<version>, predicts and
    evaluates. Works offline (random weights, said plainly).

    \b
    Example:
      tl-app quickstart
    """
    from tl_app.quickstart import format_summary, run_quickstart

    outputs = run_quickstart(pipeline, data, echo=(lambda *a, **k: None) if as_json else click.echo)
    if as_json:
        echo_json(outputs)
    else:
        click.echo(format_summary(outputs))


COMMANDS = [backbones, weights, datasets, quickstart]
