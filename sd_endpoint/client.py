"""Call the endpoint, local or hosted, from a shell or a script.

    python -m sd_endpoint.client "a red circle on a white background" -o out.png --seed 7
    python -m sd_endpoint.client "a cat" --url https://xyz.endpoints.huggingface.cloud
    python -m sd_endpoint.client "a red circle" --lora green-shapes:0.8

    from sd_endpoint.client import generate
    result = generate("a red circle on a white background", height=64, width=64, seed=7)
    Path("out.png").write_bytes(result.image)

Every request field is an option, made from the handler's own request model. The URL defaults
to ``$SD_ENDPOINT_URL``, else the local server; the token to ``$SD_API_TOKEN``, else
``$HF_TOKEN``. While the endpoint answers 503 (loading, or scaling up from zero) the request
is retried until ``timeout``. Only the standard library is used for HTTP.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import ALIASES, request_model

URL_VARIABLE = "SD_ENDPOINT_URL"
TOKEN_VARIABLES = ("SD_API_TOKEN", "HF_TOKEN")
LOCAL_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 600.0
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
MAX_CHOICES_SHOWN = 6


class EndpointError(Exception):
    """The endpoint answered with an error status; ``message`` is its own explanation."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


@dataclass
class Generated:
    image: bytes  # the encoded image (PNG unless output_format said otherwise)
    seed: int
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images: list[bytes] = field(default_factory=list)  # all of them; the first is `image`
    seeds: list[int] = field(default_factory=list)


def default_url() -> str:
    return os.environ.get(URL_VARIABLE) or LOCAL_URL


def default_token() -> str | None:
    return next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)


def generate(
    prompt: str,
    *,
    url: str | None = None,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_wait: Callable[[str], None] | None = None,
    **parameters: Any,
) -> Generated:
    """Generate one image. ``parameters`` are request fields (height, seed, ...); None ones are
    left out so the endpoint's defaults apply. Raises ``EndpointError`` on any error status.
    """
    url = url or default_url()
    token = token if token is not None else default_token()
    body = {"inputs": prompt, "parameters": {k: v for k, v in parameters.items() if v is not None}}
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        # Hosted endpoints scaled to zero then hold the request while a replica starts.
        "X-Scale-Up-Timeout": str(int(timeout)),
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode()
    last_note = None
    started = time.monotonic()
    deadline = started + timeout
    while True:
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(
                request, timeout=max(1.0, deadline - time.monotonic())
            ) as r:
                payload = json.loads(r.read())
            break
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            retry_in = _retry_after(exc)
            if exc.code != 503 or time.monotonic() + retry_in > deadline:
                raise EndpointError(exc.code, message) from None
            note = f"the endpoint is not ready ({message}); retrying"
            if on_wait and note != last_note:
                on_wait(note)
            last_note = note
            time.sleep(retry_in)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise EndpointError(None, f"{url} gave no answer within {timeout:g} s") from None
            local = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
            hint = " (is the local server running? python -m sd_endpoint.server)" if local else ""
            raise EndpointError(None, f"cannot reach {url}: {reason}{hint}") from None
        except ValueError as exc:
            raise EndpointError(None, f"{url} did not answer JSON: {exc}") from None
    try:
        image = base64.b64decode(payload["image"], validate=True)
        return Generated(
            image=image,
            seed=payload["seed"],
            parameters=payload.get("parameters", {}),
            warnings=payload.get("warnings", []),
            seconds=time.monotonic() - started,
            # An endpoint from before batches sends only `image` and `seed`.
            images=[base64.b64decode(p, validate=True) for p in payload.get("images", [])]
            or [image],
            seeds=payload.get("seeds") or [payload["seed"]],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EndpointError(None, f"{url} answered without an image and seed: {exc!r}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    text = exc.read().decode("utf-8", "replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text.strip() or exc.reason


def _retry_after(exc: urllib.error.HTTPError) -> float:
    try:
        return min(max(float(exc.headers.get("Retry-After", 2)), 0.5), 10.0)
    except ValueError:
        return 2.0


class Waiting:
    """Shows on stderr that a long request is still running: a live counter on a terminal,
    a line every half minute otherwise."""

    def __init__(self, what: str, stream=sys.stderr):
        self.what, self.stream = what, stream
        self.live = stream.isatty()
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Waiting:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        if self.live and time.monotonic() - self.started >= 1:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def note(self, message: str) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + message + "\n")
        self.stream.flush()

    def _run(self) -> None:
        shown = 0.0
        while not self._done.wait(1.0):
            elapsed = time.monotonic() - self.started
            if self.live:
                self.stream.write(f"\r{self.what}: {elapsed:.0f} s")
            elif elapsed - shown >= 30 or (not shown and elapsed >= 5):
                shown = elapsed
                self.stream.write(f"{self.what}: {elapsed:.0f} s so far\n")
            self.stream.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sd_endpoint.client",
        description="Generate an image with the Stable Diffusion endpoint (local or hosted).",
    )
    parser.add_argument("prompt", help="what the image should show (the request's `inputs`)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="where to write the image (default: out.png, or out.<format>)",
    )
    parser.add_argument(
        "--url", default=None, help=f"endpoint URL (default: ${URL_VARIABLE}, else {LOCAL_URL})"
    )
    parser.add_argument(
        "--token", default=None, help="bearer token (default: $SD_API_TOKEN, else $HF_TOKEN)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait in all, loading included (default: {DEFAULT_TIMEOUT:g})",
    )
    fields = parser.add_argument_group("request fields (default: the endpoint's)")
    model = request_model()
    properties = model.model_json_schema()["properties"]
    for name, info in model.model_fields.items():
        if name == "inputs":
            continue
        names = [name, *_aliases_of(name)]
        if properties[name].get("type") == "object":
            names.append(name.removesuffix("s"))  # one entry per use: --lora NAME:WEIGHT
        fields.add_argument(
            *["--" + n.replace("_", "-") for n in dict.fromkeys(names)],
            dest=name,
            default=None,
            help=info.description,
            **_argument_type(properties[name]),
        )
    return parser


def _aliases_of(name: str) -> list[str]:
    return [alias for alias, target in ALIASES.items() if target == name]


def _argument_type(schema: dict) -> dict:
    """argparse ``type``/``choices`` for a field, from its JSON schema."""
    if schema.get("type") == "object":  # name -> number, one entry per use of the option
        return {"action": "append", "type": _entry, "metavar": "NAME[:WEIGHT]"}
    options = [schema, *schema.get("anyOf", [])]
    for option in options:
        if "enum" in option:
            # A long list (the samplers by both names) is in the help text instead.
            many = len(option["enum"]) > MAX_CHOICES_SHOWN
            metavar = "NAME" if many else "{" + ",".join(option["enum"]) + "}"
            return {"choices": option["enum"], "metavar": metavar}
    kinds = {option.get("type") for option in options}
    if "boolean" in kinds:
        return {"type": _boolean, "metavar": "{true,false}"}
    if "integer" in kinds:
        return {"type": int, "metavar": "N"}
    if "number" in kinds:
        return {"type": float, "metavar": "X"}
    return {"metavar": "TEXT"}


def _entry(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:NUMBER`` (1 when left out), as a prompt's <lora:NAME:WEIGHT> tag."""
    name, colon, number = text.rpartition(":")
    if not colon:
        return text, 1.0
    try:
        return name, float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{number!r} is not a number (NAME or NAME:WEIGHT)"
        ) from None


def _added_up(entries: list[tuple[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for name, number in entries:
        total[name] = total.get(name, 0.0) + number
    return total


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError("must be true or false")
    return text.lower() == "true"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {
        name: getattr(args, name) for name in request_model().model_fields if name != "inputs"
    }
    for name, value in fields.items():
        if isinstance(value, list):  # an object field's entries, each option once
            fields[name] = _added_up(value)
    if fields["output_format"] is None and args.output is not None:
        # `-o cat.jpg` alone asks for a JPEG.
        fields["output_format"] = SUFFIXES.get(args.output.suffix.lower())
    output = args.output or Path("out" + EXTENSIONS[fields["output_format"] or "png"])
    url = args.url or default_url()
    try:
        with Waiting(f"waiting for {url}") as waiting:
            result = generate(
                args.prompt,
                url=url,
                token=args.token,
                timeout=args.timeout,
                on_wait=waiting.note,
                **fields,
            )
    except EndpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    output.parent.mkdir(parents=True, exist_ok=True)
    p = result.parameters
    size = f"{p['width']}x{p['height']} " if "width" in p and "height" in p else ""
    for i, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        # Several images: out.png, out-2.png, ...
        path = output if i == 0 else output.with_stem(f"{output.stem}-{i + 1}")
        path.write_bytes(image)
        print(
            f"wrote {path} ({size}{p.get('output_format', 'image')}, {len(image):,} bytes) "
            f"seed {seed} in {result.seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
