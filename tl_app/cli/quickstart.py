"""tl-app quickstart: the main job on the bundled sample data."""

from __future__ import annotations
import click
from tl_app.cli.common import load_api, echo_json


@click.command()
@click.option("--pipeline", "-p", default="pipelines/quickstart.toml", show_default=True,
              type=click.Path(dir_okay=False), help="Pipeline TOML to run.")
@click.option("--data", default=None, help="Dataset folder (default: the pipeline's; the sample is written if missing).")
@click.option("--json", "as_json", is_flag=True)
def quickstart(pipeline, data, as_json):
    """Run the main job on the bundled sample data, end to end.

    \b
    Writes datasets/sample if missing, trains a head on cached ResNet50
    (ImageNet) features, exports to saved_models/quickstart/<version>,
    predicts and evaluates. Works offline: without ImageNet weights it says
    so and uses VGG16 with the packaged hed-vgg16 weights (edge-tuned, not
    ImageNet), or random weights when that package is missing.

    \b
    Example:
      tl-app quickstart
    """
    load_api()  # TensorFlow, imported quietly
    from tl_app import quickstart as runner  # lazy: TensorFlow loads only after the arguments are checked

    outputs = runner.run_quickstart(pipeline, data, echo=(lambda *a, **k: None) if as_json else click.echo)
    if as_json:
        echo_json(outputs)
    else:
        click.echo(runner.format_summary(outputs))


COMMANDS = [quickstart]
