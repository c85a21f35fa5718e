"""The tl-app command line: a thin click layer over library functions.

Each command module exposes ``COMMANDS``; heavy imports (TensorFlow) happen
inside the commands so ``tl-app --help`` stays fast.
"""

from __future__ import annotations

import click

from tl_app import __version__
from tl_app.cli import common
from tl_app.cli import features_cmds, finetune_cmds, insight_cmds, serving_cmds, setup_cmds, train_cmds

common.quiet_tensorflow()


@click.group(cls=common.ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tl-app")
def main():
    """Transfer learning on image folders: features, fine-tuning, export, serving.

    \b
    Quick start:
      tl-app datasets sample datasets/sample
      tl-app train datasets/sample --backbone resnet50 --strategy bottleneck
      tl-app --help / tl-app COMMAND --help
    """


for module in (setup_cmds, train_cmds, features_cmds, finetune_cmds, serving_cmds, insight_cmds):
    for command in module.COMMANDS:
        main.add_command(command)
