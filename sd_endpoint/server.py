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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import loras, page
from .imaging import MEDIA_TYPES, encode
from .loader import REPO_ROOT, load_handler
from .schema import ALIASES, ErrorResponse, GenerationResponse, request_model
from .settings import Settings

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # the runtime's
TOKEN_VARIABLE = "SD_API_TOKEN"
MODEL_DIR_VARIABLE = "SD_MODEL_DIR"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
JSON = "application/json"
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a request whose client left: nobody reads it

log = logging.getLogger("sd_endpoint.server")
access_log = logging.getLogger("sd_endpoint.server.access")


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
        app.add_api_route(
            path,
            predict,
            methods=["POST"],
            summary="Generate an image",
            description=PREDICT_DESCRIPTION,
            responses=PREDICT_RESPONSES,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {"$ref": "#/components/schemas/TextToImageRequest"},
                            "examples": REQUEST_EXAMPLES,
                        }
                    },
                },
                "security": [{"bearer": []}],
            },
        )

    limits = Settings.from_env().limits
    # The folder's LoRA names, known before the model loads, for the form and the schema.
    lora_names = loras.names_in(config.model_dir)
    page.add_routes(app, limits, lora_names)

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            spec.setdefault("components", {}).setdefault("schemas", {}).update(
                request_schemas(limits, lora_names)
            )
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(AccessLog)
    return app


PREDICT_DESCRIPTION = (
    "Runs the handler on the JSON body. Fields may be given flat (the seed's form) or inside "
    "`parameters` (Hugging Face's standard form), each field once. `Accept: image/png` (or "
    "image/jpeg, image/webp) returns the raw image with its seed in `X-Seed`; otherwise JSON. "
    "Needs `Authorization: Bearer <token>` when the server was started with a token."
)
REQUEST_EXAMPLES = {
    "flat": {
        "summary": "The seed's flat form",
        "value": {"inputs": "a red circle on a white background", "height": 512, "width": 512,
                  "guidance_scale": 7.5, "inference_steps": 25, "seed": 42},
    },
    "standard": {
        "summary": "Hugging Face's standard form",
        "value": {"inputs": "a red circle on a white background",
                  "parameters": {"negative_prompt": "blue", "num_inference_steps": 25,
                                 "seed": 42}},
    },
}  # fmt: skip
_ERROR = {JSON: {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
PREDICT_RESPONSES: dict[int | str, dict] = {
    200: {
        "model": GenerationResponse,
        "description": "The image and the seed and settings that reproduce it.",
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in MEDIA_TYPES.values()
        },
        "headers": {
            "X-Seed": {
                "description": "The seed (image responses only).",
                "schema": {"type": "integer"},
            }
        },
    },
    400: {"model": ErrorResponse, "description": "A bad request: the message names the field."},
    401: {"content": _ERROR, "description": "Missing or wrong bearer token."},
    406: {"content": _ERROR, "description": "`Accept` names no type this request can return."},
    413: {"content": _ERROR, "description": "The body is over the size limit."},
    415: {"content": _ERROR, "description": "The body is not sent as application/json."},
    500: {"content": _ERROR, "description": "The handler failed; the log has the traceback."},
    503: {"content": _ERROR, "description": "The model is still loading."},
}
HEALTH_RESPONSES: dict[int | str, dict] = {
    503: {"model": ErrorResponse, "description": "The model is loading, or failed to load."},
}
IMAGE_FORMATS = {media: fmt for fmt, media in MEDIA_TYPES.items()}


def request_schemas(limits, lora_names: tuple[str, ...] = ()) -> dict[str, dict]:
    """JSON schemas of the request body, in both forms, from the handler's request model."""
    ref = "#/components/schemas/{model}"
    flat = request_model(limits, lora_names).model_json_schema(ref_template=ref)
    properties = flat["properties"]
    for alias, target in ALIASES.items():
        properties[alias] = {
            **{k: v for k, v in properties[target].items() if k != "default"},
            "title": alias,
            "description": f"The same as `{target}` under its older name; give only one.",
        }
    parameters = deepcopy(flat)
    parameters["title"] = "TextToImageParameters"
    parameters["description"] = "The generation settings of Hugging Face's standard form."
    del parameters["properties"]["inputs"]
    parameters["required"] = []
    body = deepcopy(flat)
    body["title"] = "TextToImageRequest"
    body["description"] = (
        "`inputs` (the prompt) and the settings, either at the top level or in `parameters`; "
        "a field may be given in only one place."
    )
    body["properties"]["parameters"] = {"$ref": ref.format(model="TextToImageParameters")}
    return {"TextToImageRequest": body, "TextToImageParameters": parameters}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def internal_error(what: str) -> JSONResponse:
    incident = secrets.token_hex(4)
    log.exception("request %s %s", incident, what)
    return error_response(
        500, f"internal error in the handler (request {incident}); the server log has the details"
    )


def check_token(header: str | None, expected: str | None) -> JSONResponse | None:
    """A 401 for a missing or wrong bearer token; None when the request may go on."""
    if expected is None:
        return None
    scheme, _, given = (header or "").strip().partition(" ")
    if not header:
        message = "this server needs a token: send the header `Authorization: Bearer <token>`"
    elif scheme.lower() != "bearer" or not given.strip():
        message = "the Authorization header must be `Bearer <token>`"
    elif hmac.compare_digest(given.strip().encode(), expected.encode()):
        return None
    else:
        message = "the bearer token is not the one this server was started with"
    challenge = 'Bearer realm="sd-endpoint"' + (', error="invalid_token"' if header else "")
    return error_response(401, message, {"WWW-Authenticate": challenge})


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body declares no length
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def requested_format(data: Any) -> str | None:
    """The body's `output_format`, flat or in `parameters`, when it is one the server knows."""
    if not isinstance(data, dict):
        return None
    parameters = data.get("parameters")
    found = data.get("output_format")
    if found is None and isinstance(parameters, dict):
        found = parameters.get("output_format")
    return found if isinstance(found, str) and found in MEDIA_TYPES else None


def ask_for_format(data: Any, fmt: str) -> None:
    """Make the handler encode the image type that the Accept header asked for."""
    if not isinstance(data, dict):
        return  # the handler will refuse the body itself
    if isinstance(data.get("parameters"), dict):
        data["parameters"]["output_format"] = fmt
    else:
        data["output_format"] = fmt


def negotiate(accept: str | None, asked_format: str | None) -> str | None:
    """The media type to answer with, or None when the Accept header allows none.

    JSON unless the client prefers an image type (``requests`` sends ``*/*``, which gets JSON
    as on the hosted runtime); the image type must match the body's `output_format` if it has
    one.
    """
    ranges = []
    for item in (accept or "*/*").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media:
            ranges.append((media.lower(), quality))

    def quality_of(offer: str) -> float:
        # The most specific range that matches decides (RFC 9110, 12.5.1).
        family = offer.split("/")[0] + "/*"
        for pattern in (offer, family, "*/*"):
            matched = [q for media, q in ranges if media == pattern]
            if matched:
                return max(matched)
        return 0.0

    images = [MEDIA_TYPES[asked_format]] if asked_format else list(MEDIA_TYPES.values())
    best = max([JSON, *images], key=quality_of)  # the first of equals: JSON wins a tie
    return best if quality_of(best) > 0 else None


def render(result: Any, media_type: str) -> Response:
    if media_type == JSON:
        return JSONResponse(result)
    if hasattr(result, "save"):  # a PIL image, as handlers written for image Accept return
        return Response(encode(result, IMAGE_FORMATS[media_type]), media_type=media_type)
    try:
        image = base64.b64decode(result["image"], validate=True)
    except (TypeError, KeyError, binascii.Error):
        raise TypeError("the handler's response holds no base64 `image` to send raw") from None
    headers = {}
    if isinstance(result, dict) and "seed" in result:
        headers["X-Seed"] = str(result["seed"])
    if isinstance(result, dict) and result.get("warnings"):
        headers["X-Warnings"] = json.dumps(result["warnings"])  # ASCII-safe for a header
    return Response(image, media_type=media_type, headers=headers)


class AccessLog:
    """One log line per request: client, method, path, status and duration; nothing more."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            client = (scope.get("client") or ("-",))[0]
            # The path only: a query string is the client's to keep out of logs.
            access_log.info(
                "%s - %s %s %d %.1f ms",
                client,
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )


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
