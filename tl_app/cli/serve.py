"""tl-app serve: the HTTP model server."""

from __future__ import annotations
import logging
import os
import click
from tl_app.core.errors import ConfigError
from tl_app.cli.common import build_config, load_api, pipeline_options


SERVE_FLAGS = {"host": "serve.host", "port": "serve.port", "batching": "serve.batching",
               "max_batch_size": "serve.max_batch_size", "batch_timeout_ms": "serve.batch_timeout_ms",
               "max_body_bytes": "serve.max_body_bytes", "max_images": "serve.max_images", "token": "serve.token",
               "poll_seconds": "serve.poll_seconds", "workers": "serve.workers", "top_k": "serve.top_k",
               "max_pixels": "serve.max_pixels", "grpc_port": "serve.grpc_port",
               "model_config_file": "serve.model_config_file", "allowed_hosts": "serve.allowed_hosts",
               "image_pixels": "serve.image_pixels", "inflight_pixels": "serve.inflight_pixels",
               "header_timeout": "serve.header_timeout_s", "body_timeout": "serve.body_timeout_s",
               "max_connections": "serve.max_connections", "allowed_batch_sizes": "serve.allowed_batch_sizes"}


@click.command()
@click.argument("root", required=False, default=None, type=click.Path())
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1: this machine only).")
@click.option("--port", type=int, default=None, help="Port (default 8501, as TF Serving's REST port).")
@click.option("--max-batch-size", type=int, default=None, help="Images per model call (default 32).")
@click.option("--batch-timeout-ms", type=float, default=None, help="Longest wait for a batch to fill (default 5).")
@click.option("--batching/--no-batching", default=None, help="Dynamic batching (on by default).")
@click.option("--allowed-batch-sizes", default=None, metavar="N,N,...",
              help="Pad each batch up to the next of these sizes, the last being --max-batch-size "
                   "(TF Serving's allowed_batch_sizes), e.g. 1,2,4,8,16,32.")
@click.option("--max-body-bytes", type=int, default=None, help="Largest request body (default 20 MiB).")
@click.option("--max-images", type=int, default=None, help="Most images in one request (default 64).")
@click.option("--max-pixels", type=int, default=None,
              help="Most pixels in one uploaded image (default: the model card's data.max_pixels, else 89478485).")
@click.option("--image-pixels", type=int, default=None,
              help="Decoded pixels per image (default 16000000): bigger JPEGs are downscaled, others refused (413).")
@click.option("--inflight-pixels", type=int, default=None,
              help="Decoded pixels of all requests in flight together (default 32000000, ~1.3 GB at peak); more wait their turn.")
@click.option("--grpc-port", type=int, default=None,
              help="TF Serving gRPC port (PredictionService, ModelService; default 8500, 0 turns it off).")
@click.option("--model-config-file", default=None, type=click.Path(),
              help="TF Serving models config (text format): names, base paths, version policy, labels; "
                   "re-read at each poll (models added or removed without a restart).")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Host header to accept (repeatable; default: loopback names when bound to loopback, else any).")
@click.option("--header-timeout", type=float, default=None, help="Seconds to send the request headers (default 10).")
@click.option("--body-timeout", type=float, default=None, help="Seconds to send the request body (default 30).")
@click.option("--max-connections", type=int, default=None, help="Open connections at once (default 256).")
@click.option("--top-k", type=int, default=None, help="Classes in upload-page answers (default 5).")
@click.option("--workers", type=int, default=None, help="Threads that run model calls (default 4).")
@click.option("--token", default=None, help="Require 'Authorization: Bearer TOKEN' (or set TL_APP_TOKEN).")
@click.option("--poll-seconds", type=float, default=None,
              help="How often the root (and the models config file) is checked for changes (default 2).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@pipeline_options
def serve(root, log_level, pipeline, sets, **flags):
    """Serve every model under ROOT (default saved_models/) over HTTP, TF Serving style.

    \b
    Endpoints: POST /v1/models/NAME[/versions/V|/labels/L]:predict and :classify, GET /v1/models/NAME[/metadata],
    POST /api/models/NAME/predict (multipart upload), GET / (upload page), /healthz, /metrics;
    TF Serving's gRPC PredictionService and ModelService on --grpc-port (8500).

    \b
    Examples:
      tl-app serve saved_models/
      tl-app serve saved_models/ --port 9000 --max-batch-size 64 --batch-timeout-ms 2 --token s3cret
      tl-app serve -p pipelines/quickstart.toml --set serve.workers=2
      tl-app serve --model-config-file models.config --grpc-port 8500
    """
    for name in ("max_batch_size", "max_images", "max_body_bytes"):
        if flags[name] is not None and flags[name] < 1:  # said in the flag's words; the config checks the rest
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {flags[name]}; "
                              f"leave it out for the default.")
    flags["allowed_hosts"] = list(flags["allowed_hosts"]) or None
    if flags["allowed_batch_sizes"] is not None:
        parts = [part.strip() for part in flags["allowed_batch_sizes"].split(",") if part.strip()]
        if not parts or not all(part.isascii() and part.isdigit() for part in parts):
            raise ConfigError(f"--allowed-batch-sizes must be sizes separated by commas, e.g. 1,2,4,8,16,32; "
                              f"got {flags['allowed_batch_sizes']!r}.")
        flags["allowed_batch_sizes"] = [int(part) for part in parts]
    overrides = {SERVE_FLAGS[name]: value for name, value in flags.items()}
    if flags["token"] is None and os.environ.get("TL_APP_TOKEN"):
        overrides["serve.token"] = os.environ["TL_APP_TOKEN"]
    config = build_config(pipeline, sets, **overrides, **{"export.root": root})
    api = load_api()

    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    api.serve(config, log_level=log_level, echo=lambda msg: click.echo(msg, err=True))


COMMANDS = [serve]
