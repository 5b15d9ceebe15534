"""Hostile request bodies and the oracle every answer to one must meet.

Whatever JSON arrives, the handler must either generate a valid image within the configured
limits, or raise ``ValueError`` naming the field at fault before any model runs (no text
encoder, UNet or VAE forward pass), within a fraction of a second. Any other exception, or a
hang, is a failure. The handler is built the way the runtime builds it, with tight limits set
by environment variables (``TIGHT_ENV``) so that valid examples generate in milliseconds.

The hypothesis strategies here make the bodies; ``Prober`` checks the answers. The property
tests (tests/test_hostile_input.py) and the long run (scripts/fuzz.py) share both.
"""

from __future__ import annotations

import base64
import faulthandler
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from unittest import mock

from hypothesis import strategies as st
from PIL import Image

from sd_endpoint import loras, samplers
from sd_endpoint.loader import REPO_ROOT, load_handler
from sd_endpoint.schema import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    FORMATS,
    MAX_SEED,
    SCHEDULERS,
    GenerationResponse,
)

# Tight limits, each different from its default so that the tests below can tell that the
# variable (not the default) is in force; the model's native 64x64 stays allowed.
TIGHT_ENV = {
    "SD_MIN_SIDE": "16",
    "SD_MAX_SIDE": "96",
    "SD_MAX_PIXELS": "4096",
    "SD_MAX_STEPS": "3",
    "SD_MAX_WORK": "10240",
    "SD_MAX_GUIDANCE": "12",
    "SD_MAX_PROMPT_CHARS": "300",
    # 225 tokens: the valid prompts drawn (40 characters of up to 4 UTF-8 bytes, a token each
    # for the shipped tokenizer) always fit.
    "SD_MAX_PROMPT_CHUNKS": "3",
    "SD_MAX_IMAGES": "2",
    "SD_MAX_LORA_WEIGHT": "1.5",
    "SD_WARMUP": "",
    # The examples' tensors are tiny: a second thread only adds spin-waiting, which costs 10x
    # on a CPU that other jobs share.
    "SD_NUM_THREADS": "1",
}
FIELDS = (
    "inputs",
    "negative_prompt",
    "height",
    "width",
    "guidance_scale",
    "num_inference_steps",
    "inference_steps",
    "seed",
    "num_images_per_prompt",
    "scheduler",
    "output_format",
    "clip_skip",
    "loras",
    "metadata",
)
# The LoRAs of the repository (its shipped one), which the handlers under test load.
LORA_NAMES = loras.names_in(REPO_ROOT)
# A rejection is validation only: milliseconds. The bound is ~100x that so a loaded shared
# machine does not flake, while a rejection that does real work (or hangs) still fails.
REJECTION_BUDGET_S = 1.0
# A call that takes this long is hung: the process is ended with every thread's traceback.
HANG_S = 120


def load_tight_handler():
    """The repo's handler, built as the runtime builds it, under ``TIGHT_ENV``."""
    with mock.patch.dict(os.environ, TIGHT_ENV):
        return load_handler(REPO_ROOT)


# ---------------------------------------------------------------- strategies

NAN, INF = float("nan"), float("inf")
# Characters that trip naive code: lone surrogates (JSON's "\ud800" escapes decode to them),
# NUL and controls, zero-width and byte-order marks, a bidi override, a combining mark, an
# astral emoji, a noncharacter, quotes and backticks (the error messages quote fields).
ODD_CHARS = (
    "\x00",
    "\x1b",
    "\x7f",
    "\ud800",
    "\udfff",
    "\u200b",
    "\u202e",
    "\ufeff",
    "\u0301",
    "\U0001f600",
    "\uffff",
    "\n",
    "\t",
    "\\",
    '"',
    "`",
    "\u00a0",
    "\u3000",
)
ODD_NUMBERS = (
    NAN,
    INF,
    -INF,
    -0.0,
    5e-324,
    1e308,
    -1e308,
    2**31,
    2**32,
    2**53 + 1,
    2**63,
    2**64,
    10**400,
    -(10**400),
    0.1,
    1e-7,
)


def nested(depth: int, kind: str):
    """``depth`` levels of arrays or objects: as deep as Python's JSON decoder goes (< 999)."""
    value: object = []
    for _ in range(depth):
        value = [value] if kind == "array" else {"a": value}
    return value


characters = st.one_of(st.characters(exclude_categories=()), st.sampled_from(ODD_CHARS))
prompt_characters = st.one_of(  # what a string field accepts: no lone surrogates
    st.characters(), st.sampled_from([c for c in ODD_CHARS if not 0xD800 <= ord(c) < 0xE000])
)
texts = st.one_of(
    st.text(characters, max_size=12),
    st.sampled_from(["", " ", "\u3000\n", "default", "PNG", "png ", "Euler", "null", "NaN"]),
    # Repeated odd characters, around and far over the prompt limits.
    st.builds(lambda c, n: c * n, characters, st.sampled_from([299, 300, 301, 2001, 100_000])),
)
numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_NUMBERS),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.one_of(
    st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=8,
    ),
    st.builds(nested, st.integers(1, 990), st.sampled_from(["array", "object"])),
)


def valid_values(limits) -> dict[str, st.SearchStrategy]:
    """Per field: values inside its documented range (a combination may still be over the
    pixel or work limit: that is a rejection the oracle checks too)."""
    sides = st.integers(-(-limits.min_side // 8), limits.max_side // 8).map(lambda k: 8 * k)
    steps = st.integers(1, limits.max_steps)
    prompts = st.text(prompt_characters, min_size=1, max_size=40).filter(str.strip)
    return {
        "inputs": prompts,
        "negative_prompt": st.one_of(st.none(), prompts),
        "height": st.one_of(sides, sides.map(float)),
        "width": st.one_of(sides, sides.map(float)),
        "guidance_scale": st.one_of(st.floats(0, limits.max_guidance), st.integers(0, 12)),
        "num_inference_steps": st.one_of(steps, steps.map(float)),
        "inference_steps": steps,
        "seed": st.one_of(st.none(), st.integers(0, MAX_SEED)),
        "num_images_per_prompt": st.integers(1, limits.max_images),
        # Either name of a sampler, in any case.
        "scheduler": st.one_of(
            st.sampled_from(SCHEDULERS),
            st.sampled_from(samplers.A1111_NAMES).map(lambda n: draw_case(n)),
        ),
        "output_format": st.sampled_from(FORMATS),
        "clip_skip": st.sampled_from([1, 2, 1.0, 2.0]),
        "loras": st.dictionaries(
            st.sampled_from(LORA_NAMES),
            st.one_of(
                st.floats(-limits.max_lora_weight, limits.max_lora_weight),
                st.integers(-int(limits.max_lora_weight), int(limits.max_lora_weight)),
            ),
            max_size=min(limits.max_loras, len(LORA_NAMES)),
        ),
        "metadata": st.booleans(),
    }


def draw_case(name: str) -> str:
    return name if len(name) % 2 else name.upper()


def hostile_values(limits) -> st.SearchStrategy:
    """Values just outside the ranges, wrong types, and any JSON at all."""
    sides = st.integers(limits.min_side // 8 - 1, limits.max_side // 8 + 1).map(lambda k: 8 * k)
    near = st.one_of(
        sides.map(lambda v: v + 1),
        st.integers(-2, limits.max_steps + 2),
        st.floats(-1, limits.max_guidance + 1),
        st.sampled_from([MAX_SEED + 1, -1]),
    )
    return st.one_of(near, numbers, texts, json_values)


@st.composite
def bodies(draw, limits):
    """Request bodies in both forms: a valid request, then zero to three hostile changes."""
    values = valid_values(limits)
    names = draw(st.lists(st.sampled_from(FIELDS[1:]), unique=True))
    if "inference_steps" in names and "num_inference_steps" in names:
        names.remove("inference_steps")
    fields = {"inputs": draw(values["inputs"])} | {name: draw(values[name]) for name in names}
    standard = draw(st.booleans())
    body = {"inputs": fields.pop("inputs")}
    if standard:
        body["parameters"] = fields
    else:
        body.update(fields)
    for change in draw(st.lists(st.sampled_from(CHANGES), max_size=3)):
        body = change(draw, body, limits)
    return body


def _any_value_in_a_field(draw, body, limits):
    target = _somewhere(draw, body)
    target[draw(st.sampled_from(FIELDS))] = draw(hostile_values(limits))
    return body


def _an_unknown_key(draw, body, limits):
    key = draw(st.one_of(texts, st.sampled_from(["steps", "prompt", "Inputs", "parameters"])))
    _somewhere(draw, body)[key] = draw(json_values)
    return body


def _no_prompt(draw, body, limits):
    if isinstance(body, dict):
        body.pop("inputs", None)
    return body


def _a_field_in_both_places(draw, body, limits):
    if isinstance(body, dict) and isinstance(body.get("parameters"), dict):
        name = draw(st.sampled_from(FIELDS))
        body[name] = body["parameters"][name] = draw(valid_values(limits)[name])
    return body


def _parameters_not_an_object(draw, body, limits):
    if isinstance(body, dict):
        body["parameters"] = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    return body


def _not_an_object(draw, body, limits):
    return draw(json_values.filter(lambda v: not isinstance(v, dict)))


CHANGES = [
    _any_value_in_a_field,
    _any_value_in_a_field,
    _an_unknown_key,
    _no_prompt,
    _a_field_in_both_places,
    _parameters_not_an_object,
    _not_an_object,
]


def _somewhere(draw, body) -> dict:
    """The top level or, where there is one, the ``parameters`` object."""
    if not isinstance(body, dict):
        return {}
    if isinstance(body.get("parameters"), dict) and draw(st.booleans()):
        return body["parameters"]
    return body


def one_field_body(name: str, value, standard: bool) -> dict:
    """A valid small request, flat or in the standard form, with ``value`` in field ``name``."""
    body = {"inputs": "a red circle", "height": 32, "width": 32, "num_inference_steps": 1}
    if name != "inputs" and standard:
        body = {"inputs": body.pop("inputs"), "parameters": body}
    target = body.get("parameters", body)
    if name == "inference_steps":
        target.pop("num_inference_steps")
    target[name] = value
    return body


# ---------------------------------------------------------------- the oracle


@dataclass
class Outcome:
    kind: str  # "image" or "rejected"
    seconds: float
    message: str = ""
    response: dict = field(default_factory=dict)


class Prober:
    """Calls a handler and checks the property every request must meet.

    Forward pre-hooks on the text encoder, the UNet and the VAE decoder count real model
    calls, so "rejected before any generation started" is observed, not assumed.
    """

    def __init__(self, handler):
        self.handler = handler
        self.limits = handler.settings.limits
        pipe = handler.engine.pipe
        self.forwards = 0
        for module in (pipe.text_encoder, pipe.unet, pipe.vae.decoder):
            module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.forwards += 1

    def check(self, body) -> Outcome:
        before = self.forwards
        faulthandler.dump_traceback_later(HANG_S, exit=True)
        started = time.perf_counter()
        try:
            response = self.handler(body)
        except ValueError as exc:
            seconds = time.perf_counter() - started
            message = str(exc)
            assert self.forwards == before, f"a model ran before rejecting: {message}"
            assert seconds < REJECTION_BUDGET_S, f"rejection took {seconds:.2f} s: {message}"
            assert message, "empty error message"
            # The toolkit and the local server send it as UTF-8 JSON.
            json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")
            assert names_a_field(message, body), f"no field named in: {message[:300]}"
            return Outcome("rejected", seconds, message)
        finally:
            faulthandler.cancel_dump_traceback_later()
        seconds = time.perf_counter() - started
        assert self.forwards > before, "an image came back without the model running"
        self.check_image(body, response)
        return Outcome("image", seconds, response=response)

    def check_image(self, body, response) -> None:
        limits, parameters = self.limits, response["parameters"]
        assert set(response) == set(GenerationResponse.model_fields)
        json.dumps(response, ensure_ascii=False).encode("utf-8")
        height, width = parameters["height"], parameters["width"]
        steps, count = parameters["num_inference_steps"], parameters["num_images_per_prompt"]
        assert limits.min_side <= min(height, width) and max(height, width) <= limits.max_side
        assert height % 8 == 0 and width % 8 == 0
        assert height * width <= limits.max_pixels
        assert 1 <= steps <= limits.max_steps
        assert 1 <= count <= limits.max_images
        assert height * width * steps * count <= limits.max_work
        assert 0 <= parameters["guidance_scale"] <= limits.max_guidance
        assert 0 <= response["seed"] == parameters["seed"] <= MAX_SEED
        assert response["seeds"] == [(response["seed"] + i) % (MAX_SEED + 1) for i in range(count)]
        assert len(response["images"]) == count and response["images"][0] == response["image"]
        for payload in response["images"]:
            image = decode_image(payload)
            assert image.size == (width, height)
            assert image.format == parameters["output_format"].upper()
        # What was sent is what was used; what was not sent got the documented default.
        sent = sent_fields(body)
        if "inference_steps" in sent:
            sent["num_inference_steps"] = sent.pop("inference_steps")
        native_height, native_width = self.handler.engine.native_size
        defaults = {
            "height": native_height,
            "width": native_width,
            "num_inference_steps": min(DEFAULT_STEPS, limits.max_steps),
            "guidance_scale": min(DEFAULT_GUIDANCE, limits.max_guidance),
            "scheduler": "default",
            "output_format": "png",
            "num_images_per_prompt": 1,
            "clip_skip": 1,
            "loras": {},
            "metadata": True,
        }
        if sent.get("scheduler") is not None:
            sent["scheduler"] = samplers.canonical(sent["scheduler"])
        for name, default in defaults.items():
            expected = default if sent.get(name) is None else sent[name]
            assert parameters[name] == expected, f"{name}: sent {sent.get(name)!r}"
        if sent.get("seed") is not None:
            assert parameters["seed"] == sent["seed"]


def sent_fields(body) -> dict:
    fields = dict(body)
    parameters = fields.pop("parameters", None)
    return {**fields, **(parameters or {})}


def names_a_field(message: str, body) -> bool:
    """The message names the body itself, a field it sent or lacks, or a limit's fields."""
    if not isinstance(body, dict):
        return "request body" in message
    sent = set(body) | (
        set(body["parameters"]) if isinstance(body.get("parameters"), dict) else set()
    )
    for name in sent | {"inputs", "parameters"}:
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")[:40]
        if f"`{shown}" in message:
            return True
    # Limits that span fields are stated as arithmetic over their names.
    return bool(re.search(r"height × width", message))


def decode_image(payload: str) -> Image.Image:
    """The image inside a response's base64 ``image`` field."""
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image
