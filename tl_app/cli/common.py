"""Shared pieces of the click layer: config building, errors, JSON output."""

from __future__ import annotations

import json
import os
import sys
import tomllib

import click

from tl_app.config import Config, load_config
from tl_app.errors import ConfigError, TlAppError


def quiet_tensorflow() -> None:
    """TensorFlow's C++ start-up chatter is noise for CLI users."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_sets(values: tuple[str, ...]) -> dict:
    """``--set train.epochs=3 --set data.class_weights=none`` -> dotted overrides."""
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set expects section.key=value (e.g. train.epochs=3), got {item!r}.")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def build_config(pipeline: str | None, sets: tuple[str, ...] = (), **flags) -> Config:
    """Defaults < pipeline TOML < --set < explicit flags (dotted keys, None = not given)."""
    overrides = parse_sets(sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(pipeline, overrides)


def pipeline_options(func):
    """--pipeline FILE and --set KEY=VALUE, for every command that builds a Config."""
    func = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override any config key, e.g. --set train.epochs=3 (repeatable).")(func)
    func = click.option("--pipeline", "-p", type=click.Path(dir_okay=False), default=None,
                        help="Pipeline TOML file (see pipelines/).")(func)
    return func


ENGINE_FLAGS = {"engine": "engine.name", "address": "engine.address", "num_workers": "engine.num_workers",
                "cpus_per_worker": "engine.cpus_per_worker", "gpus_per_worker": "engine.gpus_per_worker"}


def engine_options(func):
    """--engine local|ray and the Ray cluster's address and worker sizes (the [engine] section).

    The command receives them as keyword arguments; ``engine_overrides(kwargs)``
    turns them into dotted config overrides. See docs/scale-out.md.
    """
    options = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default=None,
                     help="local: this process (default). ray: Ray actors (pip install 'tl-app[ray]')."),
        click.option("--address", default=None,
                     help="Ray cluster: empty starts a local one, 'auto' joins 'ray start' on this machine, "
                          "ray://HEAD:10001 a remote head."),
        click.option("--num-workers", type=int, default=None, help="Ray actors or training workers (default 1)."),
        click.option("--cpus-per-worker", type=float, default=None, help="CPUs per Ray worker (default 1)."),
        click.option("--gpus-per-worker", type=float, default=None, help="GPUs per Ray worker (default 0)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def engine_overrides(kwargs: dict) -> dict:
    """Pop the engine flags out of a command's keyword arguments as dotted overrides."""
    return {dotted: kwargs.pop(name, None) for name, dotted in ENGINE_FLAGS.items()}


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


class ErrorHandlingGroup(click.Group):
    """User mistakes end as one clear message and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TlAppError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
