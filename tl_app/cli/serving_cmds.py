"""tl-app export, predict and serve: getting a trained model out of its run."""

from __future__ import annotations

import os

import click

from tl_app.cli.common import build_config, echo_json, engine_options, engine_overrides


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--name", default=None, help="Model name under the root (default: the run's folder name).")
@click.option("--root", default=None, help="Export root (default saved_models/).")
@click.option("--format", "formats", default=None,
              help="Comma-separated: savedmodel,keras,tflite,onnx (default savedmodel,keras).")
@click.option("--quantize", is_flag=True, help="Dynamic-range quantised TFLite.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(run_dir, name, root, formats, quantize, as_json):
    """Export a run to ROOT/<name>/<version>/ (TF Serving layout) with a model card.

    \b
    Examples:
      tl-app export runs/flowers --name flowers
      tl-app export runs/flowers --format savedmodel,keras,tflite --quantize
    """
    from tl_app.config import ExportConfig
    from tl_app.export import export_run

    defaults = ExportConfig()
    result = export_run(run_dir, root=root or defaults.root, name=name, formats=formats or defaults.formats,
                        quantize=bool(quantize), echo=None if as_json else click.echo)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"exported {result['name']} version {result['version']}: {result['path']}")
        for fmt, figures in result["parity"].items():
            if isinstance(figures, dict):
                click.echo(f"  parity {fmt}: max |diff| {figures['max_abs_diff']:.2e} "
                           f"(tolerance {figures['tolerance']:g}) on {result['parity']['images']} "
                           f"{result['parity']['source']}")


@click.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", default=None, help="preds.csv or preds.jsonl (default: CSV on stdout).")
@click.option("--top-k", "-k", type=int, default=5, show_default=True)
@click.option("--batch-size", "-b", type=int, default=32, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (on stderr).")
@engine_options
def predict(model, inputs, out, top_k, batch_size, quiet, as_json, **engine):
    """Classify images: files, folders (recursive) and globs; bad files are reported, not fatal.

    MODEL is saved_models/<name> (its newest version), a version folder or a run directory.

    \b
    Examples:
      tl-app predict saved_models/flowers photos/ --out preds.csv
      tl-app predict saved_models/flowers/3 'shots/**/*.jpg' --top-k 3 --out preds.jsonl
      tl-app predict saved_models/flowers /data/photos --out preds.csv --engine ray --address auto
    """
    from tl_app.inference import predict_paths

    config = build_config(None, (), **engine_overrides(engine))
    if config.engine.name == "ray":  # Ray Data actors, one model each (docs/scale-out.md)
        from tl_app.engines.ray_engine import predict_paths_ray

        summary = predict_paths_ray(model, inputs, config, out=out, top_k=top_k, batch_size=batch_size,
                                    echo=click.echo, progress=not quiet)
    else:
        summary = predict_paths(model, inputs, out=out, top_k=top_k, batch_size=batch_size,
                                echo=click.echo, progress=not quiet)
    if as_json:
        click.echo(__import__("json").dumps(summary, indent=2, default=str), err=True)
        return
    click.echo(f"predicted {summary['predicted']} image(s) in {summary['seconds']:.1f}s "
               f"({summary['images_per_second']:.1f} images/s) with {summary['model']}"
               + (f"; rows in {summary['out']}" if summary["out"] else ""), err=True)
    if summary["bad"]:
        click.echo(f"{summary['bad']} file(s) could not be used (listed with reasons in the output):", err=True)
        for item in summary["bad_files"][:20]:
            click.echo(f"  {item['path']}: {item['reason']}", err=True)
        if summary["bad"] > 20:
            click.echo(f"  ... and {summary['bad'] - 20} more", err=True)


@click.command()
@click.argument("root", required=False, default=None, type=click.Path())
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1: this machine only).")
@click.option("--port", type=int, default=None, help="Port (default 8501, as TF Serving's REST port).")
@click.option("--max-batch-size", type=int, default=None, help="Images per model call (default 32).")
@click.option("--batch-timeout-ms", type=float, default=None, help="Longest wait for a batch to fill (default 5).")
@click.option("--batching/--no-batching", default=True, help="Dynamic batching (on by default).")
@click.option("--max-body-bytes", type=int, default=None, help="Largest request body (default 20 MiB).")
@click.option("--max-images", type=int, default=None, help="Most images in one request (default 64).")
@click.option("--token", default=None, help="Require 'Authorization: Bearer TOKEN' (or set TL_APP_TOKEN).")
@click.option("--poll-seconds", type=float, default=None,
              help="How often the root is checked for new versions (default 2).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(root, host, port, max_batch_size, batch_timeout_ms, batching, max_body_bytes, max_images, token,
          poll_seconds, log_level):
    """Serve every model under ROOT (default saved_models/) over HTTP, TF Serving style.

    \b
    Endpoints: POST /v1/models/NAME[/versions/V]:predict, GET /v1/models/NAME[/metadata],
    POST /api/models/NAME/predict (multipart upload), GET / (upload page), /healthz, /metrics.
    Examples:
      tl-app serve saved_models/
      tl-app serve saved_models/ --port 9000 --max-batch-size 64 --batch-timeout-ms 2 --token s3cret
    """
    import logging

    from tl_app.config import ServeConfig
    from tl_app.errors import ConfigError
    from tl_app.serve import serve as run_server

    defaults = ServeConfig()
    settings = ServeConfig(
        host=host or defaults.host,
        port=defaults.port if port is None else port,
        batching=batching,
        max_batch_size=defaults.max_batch_size if max_batch_size is None else max_batch_size,
        batch_timeout_ms=defaults.batch_timeout_ms if batch_timeout_ms is None else batch_timeout_ms,
        max_body_bytes=defaults.max_body_bytes if max_body_bytes is None else max_body_bytes,
        max_images=defaults.max_images if max_images is None else max_images,
        token=token if token is not None else os.environ.get("TL_APP_TOKEN", defaults.token),
        poll_seconds=defaults.poll_seconds if poll_seconds is None else poll_seconds,
    )
    for option, value in (("--max-batch-size", settings.max_batch_size), ("--max-images", settings.max_images),
                          ("--max-body-bytes", settings.max_body_bytes)):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}; leave it out for the default.")
    if settings.batch_timeout_ms < 0 or settings.poll_seconds <= 0:
        raise ConfigError("--batch-timeout-ms must be >= 0 and --poll-seconds > 0.")
    root = root or "saved_models"
    if not os.path.isdir(root):
        raise ConfigError(f"Model root {root!r} is not a folder. Export a model first "
                          f"(tl-app export RUN_DIR --root {root}) or pass the folder that holds them.")
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    run_server(root, host=settings.host, port=settings.port, settings=settings,
               log_level=log_level, echo=lambda msg: click.echo(msg, err=True))


COMMANDS = [export, predict, serve]
