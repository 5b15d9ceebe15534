"""Hostile input: whatever JSON arrives, the handler answers with an image or a ValueError.

Every example must either generate a valid image within the configured limits, or raise
``ValueError`` naming the field at fault before any model runs (no text encoder, UNet or VAE
forward pass), within a fraction of a second. Any other exception, or a hang, is a failure.

The handler is built the way the runtime builds it, with tight limits set by environment
variables so that valid examples generate in milliseconds. ``SD_FUZZ_EXAMPLES=N`` raises the
number of examples of the property tests; ``scripts/fuzz.py`` runs 10,000+ and reports figures.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

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
from tests.conftest import decode_image

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
    with pytest.MonkeyPatch.context() as env:
        for name, value in TIGHT_ENV.items():
            env.setenv(name, value)
        return load_handler(REPO_ROOT)


@pytest.fixture(scope="module")
def tight():
    threads = torch.get_num_threads()  # SD_NUM_THREADS sets it for the whole process
    yield Prober(load_tight_handler())
    torch.set_num_threads(threads)


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


# ---------------------------------------------------------------- property tests

EXAMPLES = int(os.environ.get("SD_FUZZ_EXAMPLES", "150"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,  # rejections are timed by the oracle; generations may be slow on CI
    derandomize=not os.environ.get("SD_FUZZ_EXAMPLES"),  # CI: the same examples every run
    suppress_health_check=list(HealthCheck),
    database=None,
)


@PROPERTY
@given(data=st.data())
def test_any_json_body_gives_an_image_or_a_value_error_naming_the_field(tight, data):
    event(tight.check(data.draw(bodies(tight.limits), label="body")).kind)


@PROPERTY
@given(name=st.sampled_from(FIELDS), value=json_values, standard=st.booleans())
def test_any_json_value_in_any_field_of_a_valid_request(tight, name, value, standard):
    body = {"inputs": "a red circle", "height": 32, "width": 32, "num_inference_steps": 1}
    if name != "inputs" and standard:
        body = {"inputs": body.pop("inputs"), "parameters": body}
    target = body.get("parameters", body)
    if name == "inference_steps":
        target.pop("num_inference_steps")
    target[name] = value
    event(tight.check(body).kind)


@PROPERTY
@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_bodies_that_are_not_objects_are_refused(tight, value):
    outcome = tight.check(value)
    assert outcome.kind == "rejected" and "JSON object" in outcome.message


# ---------------------------------------------------------------- prompts stay private

# The hosted runtime logs the message of every error the handler raises: no part of a prompt
# may be in one. Markers are spelled in letters no message uses, so any four of them in a row
# in a message can only have come from the prompt.
MARKER_LETTERS = "qxzjQXZJ"
markers = st.text(st.sampled_from(MARKER_LETTERS), min_size=8, max_size=24)
PART = 4


def carrying(marker: str, limits) -> st.SearchStrategy:
    """Values holding ``marker``, most of them bad for a text field."""
    too_long = marker * (limits.max_prompt_chars // len(marker) + 1)
    return st.sampled_from(
        [marker, f" {marker} ", too_long, [marker], {marker: marker}, {"text": too_long}]
    )


def quoted_parts(marker: str, text: str, elsewhere: str = "") -> list[str]:
    """The runs of ``marker`` found in ``text``, but for those the rest of the body holds too
    (an unknown key drawn as "JJJJ" may be quoted)."""
    parts = {marker[i : i + PART] for i in range(len(marker) - PART + 1)}
    return sorted(p for p in parts if p in text and p not in elsewhere)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@PROPERTY
@given(data=st.data())
def test_no_part_of_a_prompt_is_in_an_error_message_or_the_log(tight, data):
    body = data.draw(bodies(tight.limits), label="body")
    marker = data.draw(markers, label="marker")
    elsewhere = json.dumps(body, ensure_ascii=False)
    if isinstance(body, dict):
        for name in data.draw(
            st.lists(st.sampled_from(["inputs", "negative_prompt"]), min_size=1, unique=True)
        ):
            target = body
            if (
                name != "inputs"
                and isinstance(body.get("parameters"), dict)
                and data.draw(st.booleans())
            ):
                target = body["parameters"]
            target[name] = data.draw(carrying(marker, tight.limits))
    records = Records()
    logging.getLogger().addHandler(records)
    try:
        outcome = tight.check(body)
    finally:
        logging.getLogger().removeHandler(records)
    event(outcome.kind)
    assert quoted_parts(marker, outcome.message, elsewhere) == [], outcome.message[:300]
    assert quoted_parts(marker, "\n".join(records.lines), elsewhere) == []


def test_the_privacy_check_sees_a_quoted_prompt():
    assert quoted_parts("qxzjQXZJ", "`inputs` is too long (got 'qxzjQ...')") == ["qxzj", "xzjQ"]


def test_an_over_long_prompt_is_refused_with_its_length_not_its_text(tight):
    outcome = tight.check({"inputs": "qxzj" * 100, "negative_prompt": ["qxzj"]})
    assert outcome.kind == "rejected"
    assert "`inputs`" in outcome.message and "text of 400 characters" in outcome.message
    assert "`negative_prompt`" in outcome.message and "an array of 1 item" in outcome.message
    assert "qxzj" not in outcome.message


# ---------------------------------------------------------------- a fixed catalogue

HOSTILE_VALUES = [
    *ODD_NUMBERS,
    True,
    False,
    None,
    [],
    {},
    "",
    " ",
    "\ud800",
    "a\udfffb",
    "\x00",
    "\u202e\u200b",
    "😀" * 400,
    "x" * 1_000_000,
    nested(990, "array"),
    nested(990, "object"),
    [[1, 2], {"a": None}],
    {"inputs": "nested"},
    "512",
    "7.5",
    "png\x00",
]


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("form", ["flat", "standard"])
def test_catalogue_of_hostile_values_in_each_field(tight, name, form):
    for value in HOSTILE_VALUES:
        fields = {"height": 32, "width": 32, "num_inference_steps": 1, name: value}
        if name == "inference_steps":
            fields.pop("num_inference_steps")
        if form == "flat" or name == "inputs":
            body = {"inputs": "a red circle", **fields}
        else:
            body = {"inputs": "a red circle", "parameters": fields}
        outcome = tight.check(body)
        if outcome.kind == "rejected":
            assert name in outcome.message


@pytest.mark.parametrize(
    "body",
    [
        {f"k{i}": i for i in range(10_000)} | {"inputs": "x"},
        {"inputs": "x", "parameters": {f"k{i}": None for i in range(10_000)}},
        {"inputs": "x" * 10_000_000},
        {"inputs": "x", "negative_prompt": "\ud800" * 1_000_000},
        {"inputs": "x", "seed": 10**4000},
        {"inputs": "x", "height": [0] * 1_000_000},
        {"": "", "parameters": {"": None}},
    ],
    ids=[
        "10k-keys",
        "10k-parameters",
        "10M-prompt",
        "1M-surrogates",
        "4000-digit-seed",
        "1M-array",
        "empty-keys",
    ],
)
def test_enormous_bodies_are_refused_quickly(tight, body):
    assert tight.check(body).kind == "rejected"


def test_scheduler_and_format_names_the_schema_accepts_all_generate(tight):
    """The schema and the engine list the samplers separately: each accepted name must run."""
    for scheduler in SCHEDULERS:
        for fmt in FORMATS:
            body = {
                "inputs": "a red circle",
                "height": 16,
                "width": 16,
                "inference_steps": 2,
                "scheduler": scheduler,
                "output_format": fmt,
                "seed": 1,
            }
            assert tight.check(body).kind == "image"


# ---------------------------------------------------------------- limits and their variables

# (variable, a request over its TIGHT_ENV value that the default limits accept, the words
#  stating the limit)
OVER_LIMIT = [
    ("SD_MAX_SIDE", {"height": 104, "width": 64}, ["`height`", "less than or equal to 96"]),
    ("SD_MAX_PIXELS", {"height": 72, "width": 64}, ["4,608", "limit of 4,096"]),
    (
        "SD_MAX_STEPS",
        {"height": 64, "width": 64, "num_inference_steps": 4},
        ["`num_inference_steps`", "less than or equal to 3"],
    ),
    (
        "SD_MAX_WORK",
        {"height": 64, "width": 64, "num_inference_steps": 3},
        ["12,288", "limit of 10,240"],
    ),
    (
        "SD_MAX_GUIDANCE",
        {"height": 64, "width": 64, "guidance_scale": 12.5},
        ["`guidance_scale`", "less than or equal to 12"],
    ),
    (
        "SD_MAX_PROMPT_CHARS",
        {"height": 64, "width": 64, "inputs": "a" * 301},
        ["`inputs`", "at most 300 characters"],
    ),
    (
        "SD_MAX_PROMPT_CHUNKS",
        {"height": 64, "width": 64, "inputs": "a" * 226},
        ["`inputs` has 226 tokens", "at most 3 chunks"],
    ),
    (
        "SD_MAX_IMAGES",
        {"height": 64, "width": 64, "num_images_per_prompt": 3},
        ["`num_images_per_prompt`", "less than or equal to 2"],
    ),
    (
        "SD_MAX_WORK",
        {"height": 64, "width": 64, "num_inference_steps": 2, "num_images_per_prompt": 2},
        ["× images", "16,384", "limit of 10,240"],
    ),
    (
        "SD_MAX_LORA_WEIGHT",
        {"height": 64, "width": 64, "loras": {"green-shapes": 1.75}},
        ["`loras`", '"green-shapes"', "less than or equal to 1.5"],
    ),
    (
        "SD_MAX_LORA_WEIGHT",
        {"height": 64, "width": 64, "inputs": "a red circle <lora:green-shapes:1.75>"},
        ["`inputs`", "`green-shapes`", "1.75", "from -1.5 to 1.5"],
    ),
]


@pytest.mark.parametrize(("variable", "fields", "words"), OVER_LIMIT, ids=lambda v: str(v)[:20])
def test_a_request_over_a_limit_is_refused_stating_the_limit_its_variable_sets(
    tight, handler, variable, fields, words
):
    body = {"inputs": "a red circle", "num_inference_steps": 1, **fields}
    outcome = tight.check(body)
    assert outcome.kind == "rejected"
    for word in words:
        assert word in outcome.message
    # Under the default limits the same request is served: the variable moved the limit.
    assert variable in TIGHT_ENV
    response = handler(body)
    assert decode_image(response["image"]).size == (body["width"], body["height"])
    assert len(response["images"]) == body.get("num_images_per_prompt", 1)


def test_a_side_under_the_minimum_is_refused_and_sd_min_side_lowers_it(tight, handler):
    body = {"inputs": "a red circle", "height": 16, "width": 32, "num_inference_steps": 1}
    assert tight.check(body).kind == "image"
    with pytest.raises(ValueError, match="greater than or equal to 64"):
        handler(body)
    outcome = tight.check({**body, "height": 8})
    assert outcome.kind == "rejected" and "greater than or equal to 16" in outcome.message


def test_defaults_never_exceed_a_lower_limit(tight):
    """A request that leaves steps and guidance out gets them capped by SD_MAX_STEPS and
    SD_MAX_GUIDANCE rather than bypassing them with the built-in defaults (25 and 7.5)."""
    response = tight.check({"inputs": "a red circle", "height": 32, "width": 32}).response
    assert response["parameters"]["num_inference_steps"] == 3
    assert response["parameters"]["guidance_scale"] == DEFAULT_GUIDANCE  # under 12: unchanged


def test_the_oracle_catches_a_handler_that_breaks_the_property(tight):
    """The checks above can fail: a handler that generates too much, answers slowly, or
    raises a foreign exception is caught."""

    def foreign_exception(body):
        raise KeyError("scheduler")

    broken = copy.copy(tight)
    broken.handler = foreign_exception
    with pytest.raises(KeyError):
        broken.check({"inputs": "x"})
    slow = copy.copy(tight)

    def slow_rejection(body):
        time.sleep(REJECTION_BUDGET_S * 1.1)
        raise ValueError("`inputs` is wrong")

    slow.handler = slow_rejection
    with pytest.raises(AssertionError, match="rejection took"):
        slow.check({"inputs": "x"})
    assert not names_a_field("something went wrong", {"inputs": "x", "height": 3})
