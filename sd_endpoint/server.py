"""A local server that hosts a repository's ``handler.py`` the way Inference Endpoints does.

    python -m sd_endpoint.server [--model-dir DIR] [--host 127.0.0.1] [--port 8000]
                                 [--token TOKEN] [--concurrency 1] [--max-body-bytes 1048576]

It builds ``EndpointHandler`` exactly as the hosted runtime does (``sd_endpoint.loader``) and
serves the runtime's routes with its error semantics, plus the bearer token that the hosted
platform checks in front of it:

* ``POST /`` and ``POST /predict`` run the handler; ``GET /health`` and ``GET /`` answer 200
  ``Ok`` once the model is loaded and 503 while it loads. The model loads in a background
  thread, so the socket opens at once; if loading fails the server exits with status 1, as the
  hosted container does, and the log says why. ``/docs`` and ``/openapi.json`` describe the API.
  A browser (``text/html`` in ``Accept``) gets the playground page at ``/`` (and at
  ``/playground``): ``sd_endpoint.page``.
* Errors are ``{"error": message}``: 400 for the handler's ``ValueError`` and for a body that
  is not JSON, 401 for a missing or wrong token, 413 for a body over the size limit, 415 for a
  content type other than ``application/json``, 406 for an ``Accept`` it cannot answer, 500
  (traceback in the log only) for any other failure, 503 while loading.
* ``Accept: image/png`` (or ``image/jpeg``, ``image/webp``) gets the raw image bytes, with the
  seed in ``X-Seed``; otherwise the handler's JSON.
* One handler call at a time (``--concurrency``), in a worker thread, so ``/health`` and
  queued requests are never blocked by a generation.

The model folder comes from ``--model-dir`` or ``SD_MODEL_DIR`` (default: this repository);
the token from ``--token`` or ``SD_API_TOKEN`` (the variable keeps it out of ``ps``). It binds
to loopback unless ``--host`` says otherwise, and warns when exposed with no token. Logs use the
runtime's format, one access line per request; never the token, never a prompt.

This module is the app, its routes and the command line; ``http_exchange`` holds the rules of
the HTTP exchange (token, body size, content negotiation, error bodies, access log) and
``api_spec`` the OpenAPI description.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import api_spec, families, loras, page
from .api_spec import HEALTH_RESPONSES
from .http_exchange import (
    IMAGE_FORMATS,
    JSON,
    AccessLog,
    ask_for_format,
    check_token,
    error_response,
    internal_error,
    negotiate,
    read_body,
    render,
    requested_format,
)
from .imaging import MEDIA_TYPES
from .loader import REPO_ROOT, load_handler
from .settings import Limits, Settings

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # the runtime's
TOKEN_VARIABLE = "SD_API_TOKEN"
MODEL_DIR_VARIABLE = "SD_MODEL_DIR"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a request whose client left: nobody reads it

log = logging.getLogger("sd_endpoint.server")


@dataclass(frozen=True)
class ServerConfig:
    model_dir: Path = REPO_ROOT
    token: str | None = None
    concurrency: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class HandlerSlot:
    """The handler once it has loaded in the background, or the reason it could not."""

    def __init__(self) -> None:
        self.handler: Callable[[dict], Any] | None = None
        self.error: str | None = None

    def load(self, model_dir: Path, on_failure: Callable[[], None]) -> None:
        started = time.perf_counter()
        log.info("loading the handler from %s", model_dir)
        try:
            handler = load_handler(model_dir)
        except Exception as exc:
            log.exception("the handler failed to load; stopping")
            self.error = f"{type(exc).__name__}: {exc}"
            on_failure()
            return
        self.handler = handler
        log.info("handler ready in %.2f s", time.perf_counter() - started)


def create_app(config: ServerConfig, on_load_failure: Callable[[], None] = lambda: None):
    """The ASGI app; it starts loading the handler when the server starts."""
    slot = HandlerSlot()
    turns = asyncio.Semaphore(config.concurrency)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A thread, not a task: loading imports torch and reads weights for seconds, and the
        # event loop must stay free to answer /health with 503 meanwhile.
        threading.Thread(
            target=slot.load,
            args=(config.model_dir, on_load_failure),
            name="load-handler",
            daemon=True,
        ).start()
        yield

    app = FastAPI(
        title="Stable Diffusion text-to-image",
        summary="The Inference Endpoints handler of this repository, served locally.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.slot = slot

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Routing errors (404, 405) in the same {"error": ...} shape as everything else.
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.get("/", response_class=PlainTextResponse, responses=HEALTH_RESPONSES)
    async def root(request: Request) -> Response:
        """As `/health`; a browser (`text/html` in `Accept`) gets the playground page."""
        if page.wants_page(request.headers.get("accept")):
            return page.index()
        return await health()

    @app.get("/health", response_class=PlainTextResponse, responses=HEALTH_RESPONSES)
    async def health() -> Response:
        """`Ok` once the model is loaded; 503 while it loads."""
        if slot.handler is not None:
            return PlainTextResponse("Ok")
        if slot.error is not None:
            return error_response(503, f"the handler failed to load: {slot.error}")
        return error_response(
            503, "the model is loading; try again in a few seconds", {"Retry-After": "5"}
        )

    async def predict(request: Request) -> Response:
        refusal = check_token(request.headers.get("authorization"), config.token)
        if refusal is not None:
            return refusal
        if slot.handler is None:
            return await health()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != JSON:
            shown = f"`{media_type}`" if media_type else "no content type"
            return error_response(
                415, f"the body must be JSON sent with `Content-Type: {JSON}`, not {shown}"
            )
        try:
            body = await read_body(request, config.max_body_bytes)
        except ClientDisconnect:
            log.info("client left before its request was read; not running it")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if body is None:
            return error_response(
                413,
                f"the body is over this server's limit of {config.max_body_bytes:,} "
                "bytes; a request is a prompt and a few settings (see --max-body-bytes)",
            )
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            return error_response(
                400,
                f"the body is not valid JSON ({exc}); send an object such as "
                '{"inputs": "a red circle on a white background"}',
            )
        asked_format = requested_format(data)
        answer = negotiate(request.headers.get("accept"), asked_format)
        if answer is None:
            images = [MEDIA_TYPES[asked_format]] if asked_format else list(MEDIA_TYPES.values())
            return error_response(
                406,
                f"cannot answer `Accept: {request.headers.get('accept')}`: this request "
                f"can be answered with {', '.join([JSON, *images])} (an image type must "
                "match `output_format` when the request gives one)",
            )
        if answer != JSON and asked_format is None:
            ask_for_format(data, IMAGE_FORMATS[answer])

        async with turns:
            if await request.is_disconnected():
                log.info("client left while its request was queued; not running it")
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            try:
                result = await run_in_threadpool(slot.handler, data)
            except ValueError as exc:  # the handler's "bad request", as on the hosted runtime
                return error_response(400, str(exc))
            except Exception:
                return internal_error("failed inside the handler")
        try:
            return render(result, answer)
        except Exception:
            return internal_error("returned a response that could not be sent")

    for path in ("/", "/predict"):
        app.add_api_route(path, predict, methods=["POST"], **api_spec.PREDICT_ROUTE)

    limits = served_limits(config.model_dir)
    # The folder's LoRA names, known before the model loads, for the form and the schema.
    lora_names = loras.names_in(config.model_dir)
    page.add_routes(app, limits, lora_names)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = api_spec.describe(app, limits, lora_names)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(AccessLog)
    return app


def served_limits(model_dir: Path) -> Limits:
    """The limits the handler will apply: the variables', over the model family's defaults."""
    try:
        family_limits = families.detect(model_dir).limits
    except families.UnsupportedModelError:
        family_limits = {}  # the handler, loading, says what is wrong with the folder
    return Settings.from_env(limit_defaults=family_limits).limits


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sd_endpoint.server",
        description="Serve a repository's handler.py on HTTP the way Inference Endpoints does.",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get(MODEL_DIR_VARIABLE) or REPO_ROOT),
        help=f"the repository folder holding handler.py (default: ${MODEL_DIR_VARIABLE}, "
        "else this repo)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on (default: {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token every predict request must send (default: "
        f"${TOKEN_VARIABLE}; the variable keeps it out of the process list)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive,
        default=positive(os.environ.get("SD_CONCURRENCY", "1")),
        help="handler calls run at once; others wait (default: $SD_CONCURRENCY, else 1, as hosted)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive,
        default=positive(os.environ.get("SD_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))),
        help=f"largest request body (default: $SD_MAX_BODY_BYTES, else {DEFAULT_MAX_BODY_BYTES:,})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout, force=True)
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    if token is None and not is_loopback(args.host):
        log.warning(
            "listening on %s with no token: anyone who can reach this port can use "
            "it (set %s or --token)",
            args.host,
            TOKEN_VARIABLE,
        )
    log.info("bearer token %s", "required" if token else f"off (set {TOKEN_VARIABLE} to require)")
    log.info("playground: open %s in a browser", page.url(args.host, args.port))
    config = ServerConfig(args.model_dir.resolve(), token, args.concurrency, args.max_body_bytes)

    server: uvicorn.Server | None = None

    def stop() -> None:
        server.should_exit = True  # uvicorn checks it a few times a second

    app = create_app(config, on_load_failure=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
            # Let a generation in flight finish on SIGTERM, however long it takes.
            timeout_graceful_shutdown=None,
        )
    )
    server.run()
    return 1 if app.state.slot.error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
