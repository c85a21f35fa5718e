"""tl-app export: a run into the TF Serving layout, with its model card."""

from __future__ import annotations
import click
from tl_app.cli.common import build_config, echo_json, load_api, pipeline_options


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--name", default=None, help="Model name under the root (default: the run's folder name).")
@click.option("--root", default=None, help="Export root (default saved_models/).")
@click.option("--format", "formats", default=None,
              help="Comma-separated: savedmodel,keras,tflite,onnx (default savedmodel,keras).")
@click.option("--quantize", is_flag=True, default=None, help="Dynamic-range quantised TFLite.")
@click.option("--tta", type=int, default=None, metavar="N",
              help="Put test-time augmentation in the graph of every format: probabilities averaged over N views "
                   "(1-12: the image, its flip, 5 crops, their 5 flips). Default 1: a single pass, as before.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pipeline_options
def export(run_dir, name, root, formats, quantize, tta, as_json, pipeline, sets):
    """Export a run to ROOT/<name>/<version>/ (TF Serving layout) with a model card.

    \b
    Examples:
      tl-app export runs/flowers --name flowers
      tl-app export runs/flowers --format savedmodel,keras,tflite --quantize
      tl-app export runs/flowers --tta 5     # TF Serving answers the average over 5 views
      tl-app export runs/flowers -p pipelines/quickstart.toml --set export.root=/srv/models
    """
    config = build_config(pipeline, sets, **{"export.name": name, "export.root": root, "export.formats": formats,
                                             "export.quantize": quantize, "export.tta": tta})
    api = load_api()

    result = api.export(config, run_dir, echo=None if as_json else click.echo)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"exported {result['name']} version {result['version']}: {result['path']}")
        for fmt, figures in result["parity"].items():
            if isinstance(figures, dict):
                click.echo(f"  parity {fmt}: {parity_figure(figures)} on {result['parity']['images']} "
                           f"{result['parity']['source']}")


def parity_figure(figures: dict) -> str:
    """One gate's figure: probabilities by absolute difference, OOD scores by relative, verdicts by agreement."""
    tolerance = f" (tolerance {figures['tolerance']:g})" if "tolerance" in figures else ""
    if "max_abs_diff" in figures:
        return f"max |diff| {figures['max_abs_diff']:.2e}{tolerance}"
    if "max_rel_diff" in figures:
        return f"max relative diff {figures['max_rel_diff']:.2e}{tolerance}"
    if "agreement" in figures:
        return f"agreement {figures['agreement']:.1%}{tolerance}"
    return ", ".join(f"{k} {v}" for k, v in figures.items())


COMMANDS = [export]
