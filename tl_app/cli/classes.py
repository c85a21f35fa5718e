"""tl-app classes add|remove: change the classes of a k-NN or prototype model without training."""

from __future__ import annotations

from pathlib import Path

import click

from tl_app.cli.common import echo_json, load_api


@click.group()
def classes():
    """Add or remove a class of a k-NN/prototype model (a run, or an exported model: a new version)."""


def is_run(model) -> bool:
    from tl_app.models.artifacts import RUN_FILE  # lazy: --help stays instant

    return (Path(model) / RUN_FILE).is_file()


def edit_run(model, **change) -> dict:
    """A run is edited without TensorFlow (the model file's head is rewritten in place of a Keras load and save);
    TensorFlow loads only if a new image's features are not cached. An export goes through the api (publishing)."""
    from tl_app.cli.extract import backbone_extractor  # lazy: builds the api's extractor only for uncached images
    from tl_app.training.class_edit import edit_classes  # lazy: numpy and h5py, no TensorFlow

    result = edit_classes(model, extractor_class=backbone_extractor, **change)
    result.pop("source")
    return {**result, "published": None}


def report(result: dict, as_json: bool) -> None:
    if as_json:
        echo_json(result)
        return
    published = result.get("published")
    if published:
        click.echo(f"published {published['name']} version {published['version']}: {published['path']} "
                   f"(classes: {', '.join(result['classes'])})")
    else:
        click.echo(f"new run: {result['run_dir']} (classes: {', '.join(result['classes'])}); "
                   f"export it with: tl-app export {result['run_dir']}")


@classes.command("add")
@click.argument("model", type=click.Path())
@click.argument("name")
@click.argument("folder", type=click.Path())
@click.option("--runs-dir", default=None, type=click.Path(), help="Where the edited run folder goes (default: the "
              "model's train.runs_dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def add(model, name, folder, runs_dir, as_json):
    """Add class NAME from the images in FOLDER to MODEL (saved_models/<name> or a run folder).

    Only FOLDER's images go through the backbone (none if the feature cache has them);
    the other classes are untouched. An exported model gets a new version, published
    atomically after the parity gate, so a running 'tl-app serve' switches to it.

    \b
    Examples:
      tl-app classes add saved_models/shapes stars photos/stars/
      tl-app classes add runs/shapes stars photos/stars/
    """
    echo = None if as_json else click.echo
    if is_run(model):
        report(edit_run(model, add=(name, folder), runs_dir=runs_dir, echo=echo), as_json)
        return
    report(load_api().classes_add(model, name, folder, runs_dir=runs_dir, echo=echo), as_json)


@classes.command("remove")
@click.argument("model", type=click.Path())
@click.argument("name")
@click.option("--runs-dir", default=None, type=click.Path(), help="Where the edited run folder goes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def remove(model, name, runs_dir, as_json):
    """Remove class NAME from MODEL (a k-NN/prototype run or exported model).

    \b
    Example:
      tl-app classes remove saved_models/shapes stars
    """
    echo = None if as_json else click.echo
    if is_run(model):
        report(edit_run(model, remove=name, runs_dir=runs_dir, echo=echo), as_json)
        return
    report(load_api().classes_remove(model, name, runs_dir=runs_dir, echo=echo), as_json)


COMMANDS = [classes]
