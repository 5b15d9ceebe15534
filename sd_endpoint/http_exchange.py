"""How a request and its answer cross HTTP in the local server: the bearer token, the body's
size, content negotiation between JSON and raw image bytes, error bodies and the access log."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import secrets
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .imaging import MEDIA_TYPES, encode

JSON = "application/json"
IMAGE_FORMATS = {media: fmt for fmt, media in MEDIA_TYPES.items()}

# The server's own loggers, whichever of its modules writes.
log = logging.getLogger("sd_endpoint.server")
access_log = logging.getLogger("sd_endpoint.server.access")


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
