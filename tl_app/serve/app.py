"""The HTTP application: TF Serving's REST API, an upload endpoint, a web page, health and metrics.

Routes::

    GET  /                                    upload page (HTML)
    GET  /healthz                             liveness + loaded models (no token needed)
    GET  /metrics                             Prometheus text format
    GET  /api/models                          models, versions, classes (for the page)
    POST /api/models/{name}/predict           multipart image upload -> top-k JSON (?top_k=&version=)
    GET  /v1/models/{name}[/versions/{v}|/labels/{label}]            version status (TF Serving)
    GET  /v1/models/{name}[/versions/{v}|/labels/{label}]/metadata
    POST /v1/models/{name}[/versions/{v}|/labels/{label}]:predict
    POST /v1/models/{name}[/versions/{v}|/labels/{label}]:classify

Every error is ``{"error": "..."}``: 400 (bad JSON, bad image, bad input, and
as TF Serving a malformed /v1 URL or wrong method), 401 (token), 403 (Host
not allowed), 404 (unknown model/version/route), 405 (wrong method outside
/v1), 408 (body too slow), 413 (body, image count or pixels over the limit),
503 (busy, or the exact version asked for was unloaded: retry). A client that
disconnects is counted as 499 in one log line. Anything else (a server fault
such as out of memory) is a logged 500. HEAD works wherever GET does.
"""

from __future__ import annotations

import asyncio
import hashlib
import base64
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
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tl_app.core.config import ServeConfig
from tl_app.models.artifacts import BYTES_SIGNATURE, parse_version
import tl_app.serve.codec as codec
from tl_app.serve.batching import InferenceError, Unavailable
from tl_app.serve.codec import BadRequest, TooLarge
from tl_app.serve.grpc_server import start_grpc
from tl_app.serve.limits import Busy, allowed_hosts, host_name, timed_protocol
from tl_app.serve.metrics import Metrics
from tl_app.serve.model_config import ConfigWatcher
from tl_app.serve.page import PAGE
from tl_app.serve.registry import NotFound, Registry, short
from tl_app.serve.service import Service

log = logging.getLogger("tl_app.serve")
TF_PATH = re.compile(
    r"(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?(?P<tail>/metadata|:[A-Za-z]+)?"
)
INLINE_JSON_BYTES = 256 * 1024  # larger bodies are parsed off the event loop
COUNT = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses
SCRIPT = re.search(r"<script>(.*?)</script>", PAGE, re.S)
PAGE_CSP = ("default-src 'none'; connect-src 'self'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
            + (f"; script-src 'sha256-{base64.b64encode(hashlib.sha256(SCRIPT[1].encode()).digest()).decode()}'"
               if SCRIPT else ""))
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


# Every default lives in tl_app.core.config.ServeConfig; the server takes that object.


class Unauthorized(Exception):
    """HTTP 401."""


class Forbidden(Exception):
    """HTTP 403: a Host header the server does not answer (DNS rebinding)."""


class MethodNotAllowed(Exception):
    """HTTP 405."""


class RequestTimeout(Exception):
    """HTTP 408: the body did not arrive in time."""


STATUS = {BadRequest: 400, InferenceError: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404,
          MethodNotAllowed: 405, RequestTimeout: 408, TooLarge: 413, Unavailable: 503, Busy: 503}


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return JSONResponse({"error": message}, status_code=status, headers={**headers, **SECURITY_HEADERS})


def create_app(root: str | Path | None, settings: ServeConfig | None = None, echo=None, *, sources: dict | None = None,
               hosts: frozenset | None = None, grpc_port: int = 0) -> Starlette:
    """The app; ``sources`` (a models config) replaces the scan of ``root``; ``hosts`` None answers any Host;
    ``grpc_port`` > 0 also serves TF Serving's gRPC API from the same models (`tl-app serve` passes both)."""
    settings = settings or ServeConfig()
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=max(1, settings.workers), thread_name_prefix="tl-app-infer")
    watcher = ConfigWatcher(settings.model_config_file, echo=echo) \
        if sources is not None and settings.model_config_file else None  # re-read at each poll
    registry = Registry(root, settings, executor, metrics, poll_seconds=settings.poll_seconds, sources=sources,
                        reload=watcher.check if watcher else None)
    service = Service(registry, settings, executor, metrics)
    metrics.gauges["tlapp_models_loaded"] = registry.loaded_count
    if watcher:
        metrics.gauges["tlapp_model_config_reloads"] = lambda: watcher.reloads
        metrics.gauges["tlapp_model_config_reload_failures"] = lambda: watcher.failures
        metrics.gauges["tlapp_model_config_ok"] = lambda: int(not watcher.error)

    def endpoint(route: str, public: bool = False, read_body: bool = False):
        """Host check, auth, body limit and timeout, error mapping and metrics around one handler."""

        def wrap(handler):
            async def run(request: Request) -> Response:
                started = time.perf_counter()
                metrics.in_flight += 1
                try:
                    check_host(request, hosts)
                    if not public:
                        check_token(request, settings.token)
                    body = await read_body_counted(request) if read_body else b""
                    response = await handler(request, body)
                except ClientDisconnect:  # the client's doing: one line, its own status
                    log.info("client disconnected during %s %s", request.method, route)
                    response = error_response(499, "Client closed the request.")
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
                response.headers.update(SECURITY_HEADERS)
                if response.status_code == 408:
                    response.headers["Connection"] = "close"  # what is left of that body is never read
                label = getattr(request.state, "route", route)
                metrics.request(request.method, label, response.status_code, time.perf_counter() - started)
                return response

            return run

        return wrap

    async def read_body_counted(request: Request) -> bytes:
        """The body; while it arrives the batchers count the request as on its way (a batch waits for it)."""
        service.incoming += 1
        try:
            return await read_limited(request, settings.max_body_bytes, settings.body_timeout_s)
        finally:
            service.incoming -= 1

    # ---- simple pages --------------------------------------------------------------
    @endpoint("/", public=True)
    async def index(request, body):
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": PAGE_CSP})

    @endpoint("/healthz", public=True)
    async def healthz(request, body):
        health = {"status": "ok", "models": registry.names(), "loaded": registry.loaded_count()}
        if watcher:  # no path or message here (public): the server log has them
            health["model_config"] = "ok" if not watcher.error else \
                "not reloaded: the file does not parse; the previous models config is still served (see the log)"
        return JSONResponse(health)

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
        method = "GET" if request.method == "HEAD" else request.method
        match = TF_PATH.fullmatch(path)
        if not match:
            raise BadRequest(f"Malformed request: {request.method} /v1/models/{short(path)}")
        name, version_text, label, tail = match["name"], match["version"], match["label"], match["tail"] or ""
        request.state.route = "/v1/models/{name}" + ("/versions/{version}" if version_text else "") + \
            ("/labels/{label}" if label else "") + (tail if tail in (":predict", ":classify", "/metadata") else "")
        version = None
        if version_text is not None:
            if not COUNT.fullmatch(version_text):
                raise BadRequest(f"Malformed request: version {short(version_text)!r} is not a version number "
                                 f"(expected a positive integer such as 1, as the version folders are named).")
            version = int(version_text)  # leading zeros accepted, as TF Serving does
        if tail in (":predict", ":classify"):
            if method != "POST":
                raise BadRequest(f"Malformed request: {request.method} /v1/models/{short(path)}: use POST.")
            if tail == ":predict":
                return JSONResponse(await predict(name, version, label, body))
            return JSONResponse(await classify(name, version, label, body))
        if tail.startswith(":"):
            raise BadRequest(f"Malformed request: {request.method} /v1/models/{short(path)}: this server "
                             f"implements :predict and :classify (not {short(tail[1:])!r}).")
        if method != "GET":
            raise BadRequest(f"Malformed request: {request.method} /v1/models/{short(path)}: use GET.")
        if tail == "/metadata":
            model = await service.lookup(name, version, label)
            return JSONResponse(metadata(model))
        if label is not None:
            version = registry.resolve_label(name, label)
        entries = await run_in_threadpool(registry.status, name, version)
        return JSONResponse({"model_version_status": entries})

    def metadata(model) -> dict:
        return {
            "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
            "metadata": {"signature_def": {
                "signature_def": {n: codec.signature_def(s) for n, s in sorted(model.signatures.items())}}},
            "model_card": model.card,
        }

    async def parse_body(body: bytes):
        return codec.parse_json(body) if len(body) <= INLINE_JSON_BYTES else \
            await run_in_threadpool(codec.parse_json, body)

    async def predict(name, version, label, body: bytes) -> dict:
        request = await parse_body(body)
        if isinstance(request, dict) and not isinstance(request.get("signature_name", ""), str):
            raise BadRequest("\"signature_name\" must be a string.")
        signature_name = request.get("signature_name") if isinstance(request, dict) else None

        def parse(signature):
            return codec.request_inputs(request, signature, settings.max_images)

        model, outputs, row = await service.predict(name, version, label, signature_name, parse)
        started = time.perf_counter()
        response = codec.format_response(outputs, row)
        metrics.stage(model.name, "encode", time.perf_counter() - started)
        return response

    async def classify(name, version, label, body: bytes) -> dict:
        request = await parse_body(body)
        model = await service.lookup(name, version, label)
        images = codec.classify_inputs(request, next(iter(model.signature(None).inputs)), settings.max_images)
        _, results = await service.classify(name, version, label, images)
        return {"results": [[[cls, codec.float32_value(score)] for cls, score in row] for row in results]}

    # ---- upload -----------------------------------------------------------------------------
    @endpoint("/api/models/{name}/predict", read_body=True)
    async def upload(request, body):
        name = request.path_params["name"]
        version_text = request.query_params.get("version", "")
        version = parse_version(version_text)
        if version_text and version is None:
            raise BadRequest(f"version must be a positive integer such as 1 (a version folder's name), "
                             f"got {version_text[:50]!r}; leave it out for the newest version.")
        model = await service.lookup(name, version)
        classes = model.classes
        if BYTES_SIGNATURE not in model.signatures or not classes:
            raise BadRequest(f"Model {short(name)} has no image signature and class list (not a tl-app export).")
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
        array = np.empty(len(datas), dtype=object)
        array[:] = datas
        verdicts: list = []  # a model with an OOD scorer: ood_score, unknown, label ("unknown" or the top class)
        model, results = await service.classify(model.name, model.version, None, array, verdicts)
        out = []
        for filename, row, verdict in zip(names, results, verdicts):
            scores = np.array([score for _, score in row])
            order = np.argsort(-scores, kind="stable")[:top_k]
            out.append({"filename": filename, **(verdict or {}), "top_k": [
                {"label": classes[j], "probability": float(scores[j]), "index": int(j)} for j in order]})
        return JSONResponse({"model": model.name, "version": model.version, "results": out})

    def parse_top_k(value, num_classes: int) -> int:
        if value in (None, ""):
            return min(settings.top_k, num_classes)
        if not COUNT.fullmatch(str(value)) or int(value) < 1:
            raise BadRequest(f"top_k must be a positive integer such as 5, got {str(value)[:20]!r}.")
        return min(int(value), num_classes)

    @endpoint("not-found", public=True)
    async def not_found(request, body):
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/"):  # TF Serving answers any malformed /v1 URL with a 400
            raise BadRequest(f"Malformed request: {request.method} {short(path)}")
        if path in ("/", "/healthz", "/metrics", "/api/models"):
            raise MethodNotAllowed(f"{request.method} is not allowed on {path}; use GET.")
        raise NotFound(f"Not found: {request.method} {short(path)}")

    async def http_error(request, exc: HTTPException):
        """What the router answers itself (a path no route can match, TRACE...): JSON too."""
        path = request.url.path
        status = 400 if path == "/v1" or path.startswith("/v1/") else exc.status_code
        message = f"Malformed request: {request.method} {short(path)}" if status == 400 else \
            f"{'Not found' if status == 404 else exc.detail}: {request.method} {short(path)}"
        response = error_response(status, message)
        metrics.request(request.method, "not-found", status, 0.0)
        return response

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(registry.refresh)
        registry.start()
        grpc_server = None
        if grpc_port:
            grpc_server = await start_grpc(service, settings, grpc_port, echo=echo)
        if echo:
            names = registry.names()
            where = root if sources is None else "the models config"
            echo(f"[serve] {len(names)} model(s) under {where}: {', '.join(names) or '(none yet)'}")
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1)
            registry.close()
            executor.shutdown(wait=False, cancel_futures=True)

    every = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    routes = [
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/api/models", list_models, methods=["GET"]),
        Route("/api/models/{name}/predict", upload, methods=["POST"]),
        Route("/v1/models/{path:path}", tf_serving, methods=every),
        Route("/{path:path}", not_found, methods=every),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.service = service
    return app


def check_host(request: Request, hosts: frozenset | None) -> None:
    if hosts is None:
        return
    given = host_name(request.headers.get("host", ""))
    if given not in hosts:
        raise Forbidden(f"Host {short(given)!r} is not served here (allowed: {', '.join(sorted(hosts))}); "
                        f"start the server with --allowed-host {short(given) or 'NAME'} to answer it.")


def check_token(request: Request, token: str) -> None:
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("Missing or invalid bearer token: send 'Authorization: Bearer <token>'.")


async def read_limited(request: Request, limit: int, timeout: float = 30.0) -> bytes:
    """The body, refusing (413) as soon as it is known to exceed the limit, or (408) when it is too slow."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not COUNT.fullmatch(declared.strip()):
            raise BadRequest("Content-Length is not a number.")
        if int(declared) > limit:
            raise TooLarge(f"Request body of {int(declared)} bytes is over the limit of {limit} bytes "
                           f"(--max-body-bytes).")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"Request body is over the limit of {limit} bytes (--max-body-bytes).")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout:g} s ({size} bytes received); "
                             f"send it at once (--body-timeout).") from None
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was read
    return body


def serve(root: str | Path | None, host: str = "127.0.0.1", port: int = 8501, settings: ServeConfig | None = None,
          log_level: str = "warning", echo=print, sources: dict | None = None) -> None:
    """Run the server until interrupted (uvicorn, one process, asyncio; gRPC on the same loop)."""
    import uvicorn

    settings = settings or ServeConfig()
    app = create_app(root, settings, echo=echo, sources=sources, hosts=allowed_hosts(settings.allowed_hosts, host),
                     grpc_port=settings.grpc_port)
    if echo:
        echo(f"[serve] http://{host}:{port}/  (TF Serving REST API under /v1/models, upload page at /)")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, limit_concurrency=settings.max_connections,
                            http=timed_protocol(settings.header_timeout_s))
    uvicorn.Server(config).run()
