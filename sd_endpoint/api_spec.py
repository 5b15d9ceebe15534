"""The local server's OpenAPI description: the predict route's texts, examples and responses,
and the request body's schemas in both forms, made from the handler's request model."""

from __future__ import annotations

from copy import deepcopy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .http_exchange import JSON
from .imaging import MEDIA_TYPES
from .schema import ALIASES, ErrorResponse, GenerationResponse, request_model
from .settings import Limits

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
# The predict routes' documentation, as `add_api_route` takes it.
PREDICT_ROUTE = {
    "summary": "Generate an image",
    "description": PREDICT_DESCRIPTION,
    "responses": PREDICT_RESPONSES,
    "openapi_extra": {
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
}


def describe(app: FastAPI, limits: Limits, lora_names: tuple[str, ...] = ()) -> dict:
    """The OpenAPI document of ``app``, with the request schemas for ``limits``."""
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    spec.setdefault("components", {}).setdefault("schemas", {}).update(
        request_schemas(limits, lora_names)
    )
    spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return spec


def request_schemas(limits: Limits, lora_names: tuple[str, ...] = ()) -> dict[str, dict]:
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
