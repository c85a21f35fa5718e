"""The HTTP application: TF Serving's REST API, an upload endpoint, a web page, health and metrics.

Routes::

    GET  /                                    upload page (HTML)
    GET  /healthz                             liveness + loaded models (no token needed)
    GET  /metrics                             Prometheus text format
    GET  /api/models                          models, versions, classes (for the page)
    POST /api/models/{name}/predict           multipart image upload -> top-k JSON (?top_k=&version=)
    GET  /v1/models/{name}[/versions/{v}]     version status (TF Serving)
    GET  /v1/models/{name}[/versions/{v}]/metadata
    POST /v1/models/{name}[/versions/{v}]:predict

Errors are ``{"error": "..."}`` with 400 (bad JSON, bad image, bad input),
401 (token), 404 (unknown model/version/route), 405, 413 (body or image count
over the limit), 503 (the version was unloaded mid-request: retry) and never a
crash: anything else (a server fault such as out of memory) is a logged 500.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tl_app.core.config import ServeConfig
from tl_app.models.artifacts import BYTES_SIGNATURE, parse_version
import tl_app.serve.codec as codec
from tl_app.serve.batching import InferenceError, Unavailable
from tl_app.serve.codec import BadRequest, TooLarge
from tl_app.serve.metrics import Metrics
from tl_app.serve.page import PAGE
from tl_app.serve.registry import NotFound, Registry

log = logging.getLogger("tl_app.serve")
TF_PATH = re.compile(
    r"(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<tail>/metadata|:[A-Za-z]+)?"
)
INLINE_JSON_BYTES = 256 * 1024  # larger bodies are parsed off the event loop
COUNT = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


# Every default lives in tl_app.core.config.ServeConfig; the server takes that object.


class Unauthorized(Exception):
    """HTTP 401."""


class MethodNotAllowed(Exception):
    """HTTP 405."""


STATUS = {BadRequest: 400, InferenceError: 400, Unauthorized: 401, NotFound: 404, MethodNotAllowed: 405,
          TooLarge: 413, Unavailable: 503}


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(root: str | Path, settings: ServeConfig | None = None, echo=None) -> Starlette:
    settings = settings or ServeConfig()
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=max(1, settings.workers), thread_name_prefix="tl-app-infer")
    registry = Registry(root, settings, executor, metrics, poll_seconds=settings.poll_seconds)
    metrics.gauges["tlapp_models_loaded"] = registry.loaded_count

    def endpoint(route: str, public: bool = False, read_body: bool = False):
        """Auth, body limit, error mapping and metrics around one handler."""

        def wrap(handler):
            async def run(request: Request) -> Response:
                started = time.perf_counter()
                metrics.in_flight += 1
                try:
                    if not public:
                        check_token(request, settings.token)
                    body = await read_limited(request, settings.max_body_bytes) if read_body else b""
                    response = await handler(request, body)
                except Exception as exc:  # every failure becomes JSON with its status
                    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
                    if status == 500:
                        log.exception("internal error on %s %s", request.method, route)
                        message = f"Internal error: {type(exc).__name__}: {str(exc)[:300]}"
                    else:
                        message = str(exc)
                    response = error_response(status, message)
                finally:
                    metrics.in_flight -= 1
                label = getattr(request.state, "route", route)
                metrics.request(request.method, label, response.status_code, time.perf_counter() - started)
                return response

            return run

        return wrap

    # ---- simple pages --------------------------------------------------------------
    @endpoint("/", public=True)
    async def index(request, body):
        return HTMLResponse(PAGE)

    @endpoint("/healthz", public=True)
    async def healthz(request, body):
        return JSONResponse({"status": "ok", "models": registry.names(), "loaded": registry.loaded_count()})

    @endpoint("/metrics")
    async def metrics_page(request, body):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @endpoint("/api/models")
    async def list_models(request, body):
        return JSONResponse({"models": await run_in_threadpool(registry.models)})

    # ---- the TF Serving API ------------------------------------------------------------
    @endpoint("/v1/models/{name}", read_body=True)
    async def tf_serving(request, body):
        path = request.path_params["path"]
        match = TF_PATH.fullmatch(path)
        if not match:
            raise NotFound(f"Malformed request: {request.method} /v1/models/{path[:200]}")
        name, version_text, tail = match["name"], match["version"], match["tail"] or ""
        request.state.route = "/v1/models/{name}" + ("/versions/{version}" if version_text else "") + \
            (tail if tail in (":predict", "/metadata") else "")
        version = None
        if version_text is not None:
            version = parse_version(version_text)
            if version is None:
                raise NotFound(f"Malformed request: version {version_text[:50]!r} is not a version number "
                               f"(expected a positive integer such as 1, as the version folders are named).")
        if tail == ":predict":
            if request.method != "POST":
                raise MethodNotAllowed("Use POST for :predict.")
            model = await lookup(name, version)
            return JSONResponse(await predict(model, body))
        if tail.startswith(":"):
            raise NotFound(f"Malformed request: {request.method} /v1/models/{path[:200]}: this server "
                           f"implements :predict (not {tail[1:]!r}).")
        if request.method != "GET":
            raise MethodNotAllowed(f"Use GET for /v1/models/{{name}}{tail}.")
        if tail == "/metadata":
            model = await lookup(name, version)
            return JSONResponse(metadata(model))
        entries = await run_in_threadpool(registry.status, name, version)
        return JSONResponse({"model_version_status": entries})

    async def lookup(name: str, version: int | None):
        model = registry.get_loaded(name, version)
        if model is None:
            model = await run_in_threadpool(registry.get, name, version)
        return model

    def metadata(model) -> dict:
        return {
            "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
            "metadata": {"signature_def": {
                "signature_def": {n: codec.signature_def(s) for n, s in sorted(model.signatures.items())}}},
            "model_card": model.card,
        }

    async def predict(model, body: bytes) -> dict:
        model.arriving += 1  # tells the batcher more work is on its way
        try:
            request = codec.parse_json(body) if len(body) <= INLINE_JSON_BYTES else \
                await run_in_threadpool(codec.parse_json, body)
            if isinstance(request, dict) and not isinstance(request.get("signature_name", ""), str):
                raise BadRequest("\"signature_name\" must be a string.")
            signature = model.signature(request.get("signature_name") if isinstance(request, dict) else None)
            inputs, row = codec.request_inputs(request, signature, settings.max_images)
            inputs = await prepare_images(model, inputs)
            runner = model.runner(signature, inputs, settings, executor, metrics)
        finally:
            model.arriving -= 1
        outputs = await runner.submit(inputs)
        return codec.format_response(outputs, row)

    async def prepare_images(model, inputs: dict) -> dict:
        """Check every encoded image from its header; convert the few TF would decode differently."""
        out = {}
        for name, values in inputs.items():
            if values.dtype != object or not name.endswith("_bytes"):
                out[name] = values
                continue
            out[name] = await run_in_threadpool(prepare_all, model, values)
        return out

    def prepare_all(model, datas) -> np.ndarray:
        """codec.prepare_image on each (in a worker thread: Pillow reads every header, converts a few)."""
        array = np.empty(len(datas), dtype=object)
        array[:] = [codec.prepare_image(d, i, settings.max_pixels, model.background) for i, d in enumerate(datas)]
        return array

    # ---- upload -----------------------------------------------------------------------------
    @endpoint("/api/models/{name}/predict", read_body=True)
    async def upload(request, body):
        name = request.path_params["name"]
        version_text = request.query_params.get("version", "")
        version = parse_version(version_text)
        if version_text and version is None:
            raise BadRequest(f"version must be a positive integer such as 1 (a version folder's name), "
                             f"got {version_text[:50]!r}; leave it out for the newest version.")
        model = await lookup(name, version)
        classes = model.classes
        if BYTES_SIGNATURE not in model.signatures or not classes:
            raise BadRequest(f"Model {name} has no image signature and class list (not a tl-app export).")
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise BadRequest("Send the image as multipart/form-data with a field named 'file'.")
        try:
            form = await request.form(max_files=settings.max_images + 1, max_fields=32)
        except Exception as exc:
            raise BadRequest(f"Malformed multipart body: {str(exc)[:200]}") from None
        try:
            files = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
            if not files:
                raise BadRequest("No image in the upload: send a file field named 'file'.")
            if len(files) > settings.max_images:
                raise TooLarge(f"{len(files)} images in one request; the limit is {settings.max_images}.")
            top_k = parse_top_k(request.query_params.get("top_k") or form.get("top_k"), len(classes))
            names = [getattr(value, "filename", None) or key for key, value in files]
            datas = [await value.read() for _, value in files]
        finally:
            await form.close()
        array = await run_in_threadpool(prepare_all, model, datas)
        signature = model.signatures[BYTES_SIGNATURE]
        input_name = next(iter(signature.inputs))
        inputs = {input_name: array}
        outputs = await model.runner(signature, inputs, settings, executor, metrics).submit(inputs)
        probs = outputs["probabilities"]
        results = []
        for filename, row in zip(names, probs):
            order = np.argsort(-row, kind="stable")[:top_k]
            results.append({"filename": filename, "top_k": [
                {"label": classes[j], "probability": float(row[j]), "index": int(j)} for j in order]})
        return JSONResponse({"model": model.name, "version": model.version, "results": results})

    def parse_top_k(value, num_classes: int) -> int:
        if value in (None, ""):
            return min(settings.top_k, num_classes)
        if not COUNT.fullmatch(str(value)) or int(value) < 1:
            raise BadRequest(f"top_k must be a positive integer such as 5, got {str(value)[:20]!r}.")
        return min(int(value), num_classes)

    @endpoint("not-found", public=True)
    async def not_found(request, body):
        if request.url.path in ("/", "/healthz", "/metrics", "/api/models"):
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}; use GET.")
        raise NotFound(f"Not found: {request.method} {request.url.path[:200]}")

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(registry.refresh)
        registry.start()
        if echo:
            names = registry.names()
            echo(f"[serve] {len(names)} model(s) under {root}: {', '.join(names) or '(none yet)'}")
        try:
            yield
        finally:
            registry.close()
            executor.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/api/models", list_models, methods=["GET"]),
        Route("/api/models/{name}/predict", upload, methods=["POST"]),
        Route("/v1/models/{path:path}", tf_serving, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.settings = settings
    return app


def check_token(request: Request, token: str) -> None:
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("Missing or invalid bearer token: send 'Authorization: Bearer <token>'.")


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it is known to exceed the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not COUNT.fullmatch(declared.strip()):
            raise BadRequest("Content-Length is not a number.")
        if int(declared) > limit:
            raise TooLarge(f"Request body of {int(declared)} bytes is over the limit of {limit} bytes "
                           f"(--max-body-bytes).")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"Request body is over the limit of {limit} bytes (--max-body-bytes).")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was read
    return body


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8501, settings: ServeConfig | None = None,
          log_level: str = "warning", echo=print) -> None:
    """Run the server until interrupted (uvicorn, one process, asyncio)."""
    import uvicorn

    app = create_app(root, settings, echo=echo)
    if echo:
        echo(f"[serve] http://{host}:{port}/  (TF Serving REST API under /v1/models, upload page at /)")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, limit_concurrency=1024)
    uvicorn.Server(config).run()

