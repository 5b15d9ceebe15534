"""Hostile input: whatever JSON arrives, the handler answers with an image or a ValueError.

Every example must either generate a valid image within the configured limits, or raise
``ValueError`` naming the field at fault before any model runs (no text encoder, UNet or VAE
forward pass), within a fraction of a second. Any other exception, or a hang, is a failure.

The handler is built the way the runtime builds it, with tight limits set by environment
variables so that valid examples generate in milliseconds. The bodies and the oracle live in
``benchmarks/hostile_input.py``. ``SD_FUZZ_EXAMPLES=N`` raises the number of examples of the
property tests; ``scripts/fuzz.py`` runs 10,000+ and reports figures.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from benchmarks.hostile_input import (
    FIELDS,
    ODD_NUMBERS,
    REJECTION_BUDGET_S,
    TIGHT_ENV,
    Prober,
    bodies,
    json_values,
    load_tight_handler,
    names_a_field,
    nested,
    one_field_body,
)
from sd_endpoint.schema import DEFAULT_GUIDANCE, FORMATS, SCHEDULERS
from tests.conftest import decode_image


@pytest.fixture(scope="module")
def tight():
    threads = torch.get_num_threads()  # SD_NUM_THREADS sets it for the whole process
    yield Prober(load_tight_handler())
    torch.set_num_threads(threads)


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
    event(tight.check(one_field_body(name, value, standard)).kind)


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
