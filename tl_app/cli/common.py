"""Shared pieces of the click layer: config building, errors, JSON output."""

from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
import warnings

import click

from tl_app.core.config import Config, load_config
from tl_app.core.errors import ConfigError, DataError, TlAppError
from tl_app.models.registry import get_info


def quiet_tensorflow() -> None:
    """By default the CLI shows only tl-app's own output: TensorFlow's start-up lines (oneDNN, CUDA
    drivers, absl) and its Python warnings are held back. Runs before TensorFlow is imported."""
    if os.environ.get("TL_APP_VERBOSE", "").strip() not in ("", "0"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    for module in ("tensorflow", "keras", "tf2onnx", "google.protobuf", "absl"):
        warnings.filterwarnings("ignore", module=module)


def load_api():
    """tl_app.api, imported only once a command's arguments are checked.

    TensorFlow's native libraries write start-up lines (CUDA drivers, absl) to
    file descriptor 2 before any logging setting applies, so unless --verbose
    they are imported with that descriptor pointed at /dev/null.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        from tl_app import api  # lazy: TensorFlow loads only after the arguments are checked
        return api
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        from tl_app import api  # lazy: TensorFlow loads only after the arguments are checked
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    return api


def verbose_tensorflow() -> None:
    """--verbose: TensorFlow's log lines come through again (must run before TensorFlow is imported)."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    os.environ.pop("GRPC_VERBOSITY", None)
    os.environ.pop("ABSL_MIN_LOG_LEVEL", None)
    logging.getLogger("tensorflow").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.INFO)
    warnings.resetwarnings()


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
    config = load_config(pipeline, overrides)
    if config.backbone.name != "auto":  # auto: train compares the candidates (tl-app select)
        get_info(config.backbone.name)  # a mistyped backbone is refused before TensorFlow loads (seconds sooner)
    return config


def require_data_folder(root) -> None:
    """A missing dataset folder is reported before TensorFlow loads (seconds sooner)."""
    if root and not os.path.isdir(os.path.expanduser(str(root))):
        raise DataError(
            f"Dataset folder {str(root)!r} does not exist or is not a folder. Expected a folder "
            f"with one sub-folder per class (root/<class>/*.jpg) or root/train|val|test/<class>/*. "
            f"Create a sample with 'tl-app datasets sample datasets/sample'."
        )


def require_some_used(kind: str, used: int, skipped: list[dict], count: bool = True) -> None:
    """Every input unusable: a non-zero exit, so scripts can tell. Some unusable: say how many
    (``count=False`` with --json, whose document lists them)."""
    if skipped and not used:
        raise DataError(f"None of the {len(skipped)} {kind} could be used (first: {skipped[0]['path']}: "
                        f"{skipped[0]['reason']}). Pass image files (JPEG, PNG, GIF, BMP, WebP, TIFF).")
    if skipped and count:
        click.echo(f"{len(skipped)} of {used + len(skipped)} {kind} skipped (listed above)", err=True)


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


def feature_options(func):
    """The flags that choose how features are computed (backbone, weights, size, cache)."""
    func = click.option("--cache-dir", default=None, help="Bottleneck feature cache (default .cache/features).")(func)
    func = click.option("--layer", default=None, help="Backbone layer to take features from (default: last block).")(func)
    func = click.option("--input-size", type=int, default=None, help="Square input size (default: the backbone's).")(func)
    func = click.option("--weights", default=None, help="imagenet | none | PATH to a weight file.")(func)
    func = click.option("--backbone", "-b", default=None, help="See 'tl-app backbones'.")(func)
    return func


def feature_config(pipeline, sets, data, backbone, weights, input_size, layer, cache_dir):
    return build_config(pipeline, sets, **{
        "data.root": data, "backbone.name": backbone, "backbone.weights": weights,
        "backbone.input_size": input_size, "backbone.layer": layer, "features.cache_dir": cache_dir,
    })
