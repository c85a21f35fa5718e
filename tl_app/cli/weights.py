"""tl-app weights status|import: pretrained weight files, for air-gapped machines."""

from __future__ import annotations
import click
from tl_app.cli.common import echo_json, load_api


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
    api = load_api()

    rows = api.weights_status(api.REGISTRY.values())
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
    api = load_api()

    result = api.import_weights(file, api.get_spec(backbone))
    click.echo(f"imported {file} -> {result['file']}")
    if not result["official"]:
        click.echo("note: the checksum differs from Keras' official ImageNet file; tl-app will use it as given.")


COMMANDS = [weights]
