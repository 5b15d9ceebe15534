"""The request and response of the endpoint, declared once.

``request_model(limits)`` builds the pydantic model whose fields (names, aliases, types,
ranges, defaults, help text) are the single source for validation, the error messages, the
README's parameter table, the local server's OpenAPI schema, the client's options, the
response's `parameters` and its model. ``parse_request`` turns a JSON body in either accepted
form into an instance of it (a ``GenerationRequest``) with the size filled in, which the engine
reads as it is, or raises a ``ValueError`` whose message names each bad field and says what is
allowed. Adding a request field means adding it to ``request_model`` and nothing else here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from itertools import islice
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)

from . import loras, samplers
from .field_types import Boolean, Integer, LoraWeights, Number, Text, has_text
from .settings import Limits

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
MAX_SEED = 2**32 - 1

# Names a request may use for `scheduler`; "default" is the one the model folder ships.
# AUTOMATIC1111's names (samplers.A1111_NAMES) are accepted too, in any case.
SCHEDULERS = samplers.NAMES
FORMATS = ("png", "jpeg", "webp")
MAX_NAMES_SHOWN = 10


Sampler = Annotated[
    Literal[SCHEDULERS],  # type: ignore[valid-type]
    BeforeValidator(samplers.canonical),
    WithJsonSchema({"type": "string", "enum": [*SCHEDULERS, *samplers.A1111_NAMES]}),
]


class GenerationRequest(BaseModel):
    """A validated request: the base of every request model (``request_model`` declares the
    fields). ``parse_request`` fills in the size, so only ``seed`` may still be None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def prompt(self) -> str:
        """The prompt as encoded: `inputs` without its `<lora:...>` tags."""
        return loras.split_tags(self.inputs)[0]  # type: ignore[attr-defined]

    @property
    def lora_weights(self) -> dict[str, float]:
        """The LoRAs in effect: `loras` and the prompt's tags added up (``loras.in_effect``)."""
        return loras.in_effect(self.inputs, self.loras)  # type: ignore[attr-defined]

    @property
    def work(self) -> int:
        """What the request asks the model to do: height × width × steps × images."""
        return self.height * self.width * self.num_inference_steps * self.num_images_per_prompt  # type: ignore[attr-defined]

    @property
    def seeds(self) -> list[int]:
        """Image i's seed is seed + i, so each image can be made again on its own."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images_per_prompt)]  # type: ignore[attr-defined]

    def used(self, seed: int) -> dict[str, Any]:
        """The response's `parameters`: every field but the prompt, as used, with ``seed``.
        Sent back with the prompt, they reproduce the images."""
        return {**self.model_dump(exclude={"inputs"}), "seed": seed}


DEFAULT_LIMITS = Limits()


@lru_cache(maxsize=8)
def request_model(
    limits: Limits = DEFAULT_LIMITS, lora_names: tuple[str, ...] = ()
) -> type[GenerationRequest]:
    """The request model for ``limits`` (the ranges in its fields and help text come from it)
    and the names of the endpoint's LoRAs."""
    side = (
        f"an integer multiple of 8 from {limits.min_side} to {limits.max_side}, "
        f"with height × width at most {limits.max_pixels:,}"
    )

    side_type = Integer(ge=limits.min_side, le=limits.max_side, multiple_of=8)

    class GenerationParameters(GenerationRequest):
        inputs: Annotated[
            Text(min_length=1, max_length=limits.max_prompt_chars), AfterValidator(has_text)
        ] = Field(
            description="The prompt: non-empty text, at most "
            f"{limits.max_prompt_chars} characters and {limits.max_prompt_chunks} chunks of 75 "
            f"tokens ({limits.max_prompt_chunks * 75} tokens). AUTOMATIC1111's syntax: "
            "`(word)` weighs a word 1.1 times, `((word))` 1.21, `(word:1.3)` 1.3, `[word]` "
            "1/1.1; `\\(` is a literal bracket; `BREAK` starts a new chunk. Each chunk is "
            "encoded on its own and the chunks are joined, as AUTOMATIC1111 does.",
            examples=["a red circle on a white background"],
        )
        negative_prompt: Text(max_length=limits.max_prompt_chars) | None = Field(
            default=None,
            description="What the image should not show: text, at most "
            f"{limits.max_prompt_chars} characters and {limits.max_prompt_chunks} chunks, "
            "with the same syntax as `inputs`. Has an effect only with guidance_scale > 1.",
        )
        height: side_type | None = Field(
            default=None,
            description=f"Image height in pixels: {side}. Default: the model's native size.",
        )
        width: side_type | None = Field(
            default=None,
            description=f"Image width in pixels: {side}. Default: the model's native size.",
        )
        guidance_scale: Number(ge=0, le=limits.max_guidance) = Field(
            # A default over an operator's lower limit would bypass that limit.
            default=min(DEFAULT_GUIDANCE, limits.max_guidance),
            description=f"Classifier-free guidance: a number from 0 to {limits.max_guidance:g}. "
            "Higher follows the prompt more closely; 1 or less turns guidance off.",
        )
        num_inference_steps: Integer(ge=1, le=limits.max_steps) = Field(
            default=min(DEFAULT_STEPS, limits.max_steps),
            validation_alias=AliasChoices("num_inference_steps", "inference_steps"),
            description=f"Denoising steps: an integer from 1 to {limits.max_steps}. "
            "`inference_steps` is the same field under its older name.",
        )
        seed: Integer(ge=0, le=MAX_SEED) | None = Field(
            default=None,
            description=f"Random seed: an integer from 0 to {MAX_SEED}. The same request with "
            "the same seed gives the same image; without one a seed is drawn and returned.",
        )
        num_images_per_prompt: Integer(ge=1, le=limits.max_images) = Field(
            default=1,
            description=f"Images to make: an integer from 1 to {limits.max_images}. Image i "
            "uses seed + i, so each one can be made again alone with that seed.",
        )
        scheduler: Sampler = Field(
            default="default",
            description="Sampler: one of "
            + ", ".join(SCHEDULERS)
            + "; or by AUTOMATIC1111's names, in any case: "
            + ", ".join(f"{s.a1111} ({s.name})" for s in samplers.SAMPLERS)
            + ". `default` is the model folder's own scheduler. The response names it the "
            "first way.",
        )
        output_format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
            default="png",
            description="Image encoding of `image`: png (lossless), jpeg or webp (quality 90, "
            "several times smaller).",
        )
        clip_skip: Integer(ge=1, le=2) = Field(
            default=1,
            description="Text-encoder layer to use, counted from the last: 1 (the last, as the "
            "model was trained) or 2 (the one before it, through the final layer norm), as in "
            "AUTOMATIC1111 and as many fine-tunes' model cards ask for.",
        )
        loras: LoraWeights(limits, lora_names) = Field(  # type: ignore[valid-type]
            default_factory=dict,
            description=f'LoRAs to apply, name to weight (`{{"green-shapes": 0.8}}`): at '
            f"most {limits.max_loras}, weights from -{limits.max_lora_weight:g} to "
            f"{limits.max_lora_weight:g}. A name is a file of the repository's `loras/` folder "
            "without `.safetensors`. `<lora:NAME:WEIGHT>` tags in `inputs` (AUTOMATIC1111's; "
            "weight 1 when left out) add up with this field per name, and stay in the prompt."
            + (f" Available: {', '.join(lora_names)}." if lora_names else ""),
        )
        metadata: Boolean = Field(
            default=True,
            description="true or false: write the generation parameters into each image, as "
            "AUTOMATIC1111 does (a PNG `parameters` text chunk; EXIF UserComment in JPEG and "
            "WebP), prompts included.",
        )

        @model_validator(mode="after")
        def _within_budget(self) -> GenerationParameters:
            height, width = self.height, self.width
            if height is not None and width is not None and height * width > limits.max_pixels:
                raise ValueError(
                    f"height × width = {height} × {width} = {height * width:,} pixels is over "
                    f"the limit of {limits.max_pixels:,}; lower height or width"
                )
            return self

    GenerationParameters.__name__ = "GenerationParameters"
    return GenerationParameters


# Field names as users write them, in the order the docs list them.
ALIASES = {"inference_steps": "num_inference_steps"}


def accepted_fields(model: type[GenerationRequest]) -> list[str]:
    names = []
    for name in model.model_fields:
        names.append(name)
        names += [alias for alias, target in ALIASES.items() if target == name]
    return names


def parse_request(
    data: Any,
    limits: Limits,
    native_size: tuple[int, int],
    lora_names: tuple[str, ...] = (),
) -> GenerationRequest:
    """Validate a request body in the seed's flat form or in Hugging Face's standard form.

    Flat: ``{"inputs": "...", "height": 512, "inference_steps": 25, ...}``.
    Standard: ``{"inputs": "...", "parameters": {"height": 512, "num_inference_steps": 25}}``.
    The two forms mean the same thing for the same values; a field may be given in only one
    place. ``lora_names`` are the LoRAs the endpoint has. Raises ``ValueError`` naming every
    bad field, before any work is done.
    """
    model = request_model(limits, lora_names)
    fields = _flatten(data, model)
    try:
        params = model.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(_explain(exc, model, fields)) from None
    loras.check_tags(params.inputs, params.loras, lora_names, limits)
    height = params.height if params.height is not None else native_size[0]
    width = params.width if params.width is not None else native_size[1]
    request = params.model_copy(update={"height": height, "width": width})
    # The default size is the model's; a model larger than the limits must still be asked for
    # explicitly, and the total work is only known once both sizes are.
    if height * width > limits.max_pixels:
        raise ValueError(
            f"height × width = {height} × {width} (the model's native size) is over the limit "
            f"of {limits.max_pixels:,} pixels; give a smaller height and width"
        )
    if request.work > limits.max_work:
        raise ValueError(
            f"this request asks for height × width × steps × images = {height} × {width} × "
            f"{request.num_inference_steps} × {request.num_images_per_prompt} = "
            f"{request.work:,}, over the limit of {limits.max_work:,}; lower the size, "
            "num_inference_steps or num_images_per_prompt"
        )
    return request


def _flatten(data: Any, model: type[GenerationRequest]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(
            "the request body must be a JSON object such as "
            f'{{"inputs": "a red circle"}}, not {_json_type(data)}'
        )
    fields = dict(data)
    parameters = fields.pop("parameters", None)
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise ValueError(
                "`parameters` must be a JSON object of generation settings, "
                f"not {_json_type(parameters)}"
            )
        twice = sorted(set(parameters) & set(fields))
        if twice:
            raise ValueError(
                "given both at the top level and in `parameters`: "
                + ", ".join(f"`{n}`" for n in twice)
                + "; give each field once"
            )
        if "inputs" in parameters:
            raise ValueError("`inputs` (the prompt) belongs at the top level, not in `parameters`")
        fields.update(parameters)
    if "inference_steps" in fields and "num_inference_steps" in fields:
        raise ValueError(
            "`inference_steps` and `num_inference_steps` are the same field; give only one"
        )
    accepted = accepted_fields(model)
    unknown = [k for k in fields if k not in accepted]
    if unknown:
        shown = ", ".join(f"`{_short(k, quote=False)}`" for k in unknown[:MAX_NAMES_SHOWN])
        if len(unknown) > MAX_NAMES_SHOWN:  # the message stays short whatever the body holds
            shown += f" and {len(unknown) - MAX_NAMES_SHOWN:,} more"
        problems = ["unknown field" + ("s " if len(unknown) > 1 else " ") + shown]
        if "inputs" not in fields:
            problems.append("`inputs` (the prompt text) is missing")
        raise ValueError(
            "; ".join(problems)
            + ". Accepted fields: "
            + ", ".join(accepted)
            + ", and `parameters` holding any of them but inputs"
        )
    return fields


def _explain(exc: ValidationError, model: type[GenerationRequest], sent: dict[str, Any]) -> str:
    messages = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        # Name the field as the client spelled it.
        name = next((a for a, target in ALIASES.items() if target == name and a in sent), name)
        if error["type"] == "missing":
            messages.append(f"`{name}` is required: {_help(model, name)}")
            continue
        reason = error["msg"].removeprefix("Value error, ")
        if not name:  # a whole-model check: its message is complete
            messages.append(reason)
            continue
        if len(error["loc"]) > 1:  # an entry of an object field: which one
            reason = f"entry {_short(str(error['loc'][1]))}: {_lowercase(reason)}"
        # Prompts must stay out of the runtime's logs, which record every error message: a
        # text field is described by its type and length, never quoted.
        got = _described(error["input"]) if _is_text(model, name) else _short(error["input"])
        messages.append(f"`{name}` {_lowercase(reason)} (got {got}). Allowed: {_help(model, name)}")
    return "invalid request: " + "; ".join(m.rstrip(".") for m in messages)


def _help(model: type[GenerationRequest], name: str) -> str:
    name = ALIASES.get(name, name)
    return model.model_fields[name].description if name in model.model_fields else ""


def _is_text(model: type[GenerationRequest], name: str) -> bool:
    info = model.model_fields.get(ALIASES.get(name, name))
    if info is None or get_origin(info.annotation) is dict:
        return False
    kinds = [info.annotation, *get_args(info.annotation)]
    return str in [get_args(k)[0] if get_origin(k) is Annotated else k for k in kinds]


def _described(value: Any) -> str:
    if isinstance(value, str):
        return f"text of {len(value):,} characters"
    if isinstance(value, list | dict):
        return f"{_json_type(value)} of {len(value):,} item{'' if len(value) == 1 else 's'}"
    return _json_type(value)


def _lowercase(reason: str) -> str:
    reason = reason.removeprefix("Input ")
    return reason[:1].lower() + reason[1:]


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60, quote: bool = True) -> str:
    """``value`` as the client wrote it (JSON), cut to ``limit`` characters."""
    # Only the start is shown, so only the start is encoded: a million-item array is refused
    # as fast as a small one.
    cut = isinstance(value, str | list | dict) and len(value) > limit
    if cut:
        value = dict(islice(value.items(), limit)) if isinstance(value, dict) else value[:limit]
    if isinstance(value, str) and not quote:
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except RecursionError:  # nested deeper than the encoder goes: repr would fail too
            text = f"{_json_type(value)} nested too deeply to show"
        except (TypeError, ValueError):  # not JSON at all (a direct Python caller)
            text = repr(value)
    # JSON strings may hold lone surrogates ("\ud800"); echoed raw, they make the error
    # response itself unencodable as UTF-8, so they are spelled as escapes.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit and not cut else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The response, as handler.py returns it. Declared for the local server's OpenAPI description
# and for typed clients; the server tests check the handler's real responses against it.


# Fields that the request may leave out but the response always fills in.
FILLED_IN = ("height", "width", "seed")


def _used_parameters(limits: Limits = DEFAULT_LIMITS) -> type[BaseModel]:
    """``GenerationRequest.used``'s shape: the request's fields but the prompt, all present."""
    fields = {}
    for name, info in request_model(limits).model_fields.items():
        if name == "inputs":
            continue
        annotation = info.annotation
        if name in FILLED_IN:
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        fields[name] = (annotation, Field(description=info.description))
    return create_model(
        "UsedParameters",
        __config__=ConfigDict(extra="forbid"),
        __doc__="The settings the images were made with, every default filled in.",
        **fields,
    )


UsedParameters = _used_parameters()


class GenerationResponse(BaseModel):
    """Generated images with the seeds and settings that reproduce them."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        description="The first image, base64-encoded, in `parameters.output_format`."
    )
    images: list[str] = Field(
        description="Every image (`num_images_per_prompt` of them), base64-encoded; the first "
        "is `image`."
    )
    seed: int = Field(
        ge=0,
        le=MAX_SEED,
        description="The seed used: send it with the same request to get the same images.",
    )
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        description="Each image's seed, seed + i: with `num_images_per_prompt` 1 it makes that "
        "image alone."
    )
    parameters: UsedParameters  # type: ignore[valid-type]
    nsfw_content_detected: list[bool] | None = Field(
        description="Per image, whether the model's safety checker flagged it (a flagged image "
        "is black unless SD_SAFETY_CHECKER=flag); null when no checker ran."
    )
    warnings: list[str] = Field(
        description="What could not be done exactly as asked (a prompt cut at the text "
        "encoder's token limit, a negative prompt without effect); empty when nothing.",
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: str = Field(description="What was wrong, naming the field, and what is allowed.")
