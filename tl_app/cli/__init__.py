"""The tl-app command line: a thin click layer over library functions.

Each command module exposes ``COMMANDS``; heavy imports (TensorFlow) happen
inside the commands so ``tl-app --help`` stays fast.
"""

from __future__ import annotations

import click

from tl_app import __version__
from tl_app.cli import common
from tl_app.cli import (augment_preview, backbones, classes, datasets, doctor, embed, evaluate, explain, export,
                        extract, lr_find, patches, predict, quickstart, report, runs, select, serve, similar, train, weights)

common.quiet_tensorflow()
datasets.datasets.add_command(doctor.doctor)  # tl-app datasets doctor


@click.group(cls=common.ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tl-app")
@click.option("--verbose", "-v", is_flag=True, envvar="TL_APP_VERBOSE",
              help="Let TensorFlow's own log lines through (or set TL_APP_VERBOSE=1).")
def main(verbose):
    """Transfer learning on image folders: features, fine-tuning, export, serving.

    \b
    Quick start:
      tl-app datasets sample datasets/sample
      tl-app train datasets/sample --backbone resnet50 --strategy bottleneck
      tl-app --help / tl-app COMMAND --help
    """
    if verbose:
        common.verbose_tensorflow()


for module in (backbones, weights, datasets, quickstart, select, train, lr_find, extract, augment_preview, export, predict, serve,
               evaluate, explain, patches, embed, similar, report, runs, classes):
    for command in module.COMMANDS:
        main.add_command(command)
