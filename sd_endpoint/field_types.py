"""The JSON value types of the request's fields: what each accepts, and how its JSON schema
states it.

JSON has one number type and clients send ``512.0`` for 512, so integers accept integral
floats; booleans are never numbers; non-finite numbers are refused. The constraints sit
inside the types, so that JSON schemas carry them as the standard keywords (``minimum``,
``maximum``, ``multipleOf``) that the OpenAPI description, the client and the page read.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

from . import loras
from .settings import Limits


def _integer(value: Any) -> Any:
    """JSON has one number type: accept 512.0 as 512, but never a bool or 512.5."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def has_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain text, not only white space")
    return value


# The constraints go inside the before-validators, so that JSON schemas carry them as the
# standard `minimum`/`maximum`/`multipleOf` keywords.
def Integer(**constraints: Any) -> Any:  # noqa: N802 (used as a type)
    return Annotated[int, Field(strict=True, **constraints), BeforeValidator(_integer)]


def Number(**constraints: Any) -> Any:  # noqa: N802
    # float() so that 7 and 7.0 echo alike.
    return Annotated[
        float, Field(strict=True, **constraints), BeforeValidator(_number), AfterValidator(float)
    ]


def Text(**constraints: Any) -> Any:  # noqa: N802
    return Annotated[str, Field(strict=True, **constraints)]


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


Boolean = Annotated[bool, BeforeValidator(_boolean)]


def LoraWeights(limits: Limits, names: tuple[str, ...]) -> Any:  # noqa: N802
    """name -> weight, the names from ``names`` (the repository's LoRA files)."""
    most = limits.max_lora_weight

    def known(value: dict[str, float]) -> dict[str, float]:
        loras.check_field(value, names, limits.max_loras)
        return value

    schema = {
        "type": "object",
        "additionalProperties": {"type": "number", "minimum": -most, "maximum": most},
        "maxProperties": min(limits.max_loras, len(names)),
        "propertyNames": {"enum": list(names)},
        "default": {},
    }
    weight = Number(ge=-most, le=most)
    return Annotated[dict[Text(), weight], AfterValidator(known), WithJsonSchema(schema)]
