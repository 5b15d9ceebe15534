"""The playground: a page to try the endpoint in a browser, served by the local server.

Plain HTML, CSS and JavaScript from this folder: no build step, nothing from another origin,
so it works offline. The browser builds the form from the request model's JSON schema
(``/playground/request.json``), so every request field shows with its limits, default and help
text, and a field added to the model appears without touching the page.

``GET /playground`` always answers with the page; ``GET /`` does when the client asks for
``text/html`` (a browser), and otherwise answers as the hosted runtime does (health probes and
API clients see no difference). The page's responses carry a Content-Security-Policy that
allows scripts, styles and requests from this origin only, and no inline script. The server's
token is never in them: the page asks the user, and keeps the answer in that tab's
sessionStorage.
"""

from __future__ import annotations

import ipaddress
import json
from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from ..schema import ALIASES, request_model
from ..settings import Limits

FOLDER = Path(__file__).resolve().parent
PATH = "/playground"
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        # Images arrive as base64 in the JSON response and are shown from data: URLs.
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files read once per visit: always revalidated, so an edited page shows at once.
    "Cache-Control": "no-cache",
}


def wants_page(accept: str | None) -> bool:
    """Whether a ``GET /`` comes from a browser (probes and API clients never ask for HTML)."""
    return "text/html" in (accept or "").lower()


@cache
def _read(name: str) -> bytes:
    return (FOLDER / name).read_bytes()


def asset(name: str) -> Response:
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)


def index() -> Response:
    return asset("index.html")


def add_routes(app: FastAPI, limits: Limits, lora_names: tuple[str, ...] = ()) -> None:
    """The page, its files and the request schema it builds its form from (the LoRAs it
    offers are the schema's names for the `loras` field)."""
    schema = request_model(limits, lora_names).model_json_schema()
    described = json.dumps({"request": schema, "aliases": ALIASES}).encode()

    async def page() -> Response:
        return index()

    async def schema() -> Response:
        return Response(described, media_type="application/json", headers=HEADERS)

    for path in (PATH, PATH + "/"):
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
    app.add_api_route(PATH + "/request.json", schema, methods=["GET"], include_in_schema=False)
    for name in ASSETS:
        app.add_api_route(f"{PATH}/{name}", _serve(name), methods=["GET"], include_in_schema=False)


def _serve(name: str):
    # A closure with no parameters: FastAPI would read any parameter from the query string.
    async def serve() -> Response:
        return asset(name)

    return serve


def url(host: str, port: int) -> str:
    """Where a browser on this machine finds the page of a server bound to ``host``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}/"
    if address.is_unspecified:  # bound to every interface: this machine is one of them
        return f"http://127.0.0.1:{port}/"
    return f"http://[{host}]:{port}/" if address.version == 6 else f"http://{host}:{port}/"
