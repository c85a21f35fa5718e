"""tl-app explain: Grad-CAM and occlusion maps."""

from __future__ import annotations
import click
from tl_app.cli.common import echo_json, load_api, require_some_used


@click.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--method", type=click.Choice(["gradcam", "occlusion"]), default="gradcam", show_default=True)
@click.option("--class", "class_name", default=None, help="Explain this class (default: the top prediction).")
@click.option("--patch", type=int, default=16, show_default=True, help="Occlusion patch size in pixels.")
@click.option("--stride", type=int, default=8, show_default=True, help="Occlusion stride in pixels.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default RUN_DIR/explanations).")
@click.option("--json", "as_json", is_flag=True)
def explain(model, images, method, class_name, patch, stride, out_dir, as_json):
    """Heat maps of what a prediction rests on (Grad-CAM or occlusion), as PNG overlays.

    \b
    Examples:
      tl-app explain runs/flowers photo.jpg
      tl-app explain runs/flowers a.jpg b.jpg --method occlusion --patch 32 --stride 16
      tl-app explain runs/flowers rose.jpg --class tulips
    """
    api = load_api()

    summary = api.explain(model, list(images), method, class_name, patch, stride, out_dir,
                          echo=None if as_json else click.echo)
    if as_json:
        echo_json(summary)
    require_some_used("images", len(summary["results"]), summary["skipped"], count=not as_json)


COMMANDS = [explain]
