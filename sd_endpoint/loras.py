"""LoRA files and how a request names them; nothing here needs torch.

A repository's ``loras/`` folder holds ``NAME.safetensors`` files (kohya/A1111 or diffusers
layout); NAME is what a request writes, in the ``loras`` field or as AUTOMATIC1111's
``<lora:NAME:WEIGHT>`` tag in the prompt. This module finds the files, reads what a file says
about the model it was made for (from its tensor names and shapes, without loading them), and
parses and writes the prompt tags. ``sd_endpoint.adapters`` loads the files into the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Limits

FOLDER = "loras"
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Letters, digits and `_ . + -`, with single spaces inside: a name that a JSON key, a prompt
# tag (no `:` or `>`) and a file name all hold as they are.
NAME = re.compile(r"\w[\w.+-]*(?: [\w.+-]+)*")
MAX_NAME = 100
NAME_RULE = (
    f"at most {MAX_NAME} letters, digits, `_`, `.`, `+`, `-` and single inner spaces, "
    "starting with a letter or digit"
)
# A1111's extra-network syntax is `<TYPE:ARGUMENTS>`; only the `lora` type is read here, and
# any other tag stays in the prompt as text.
TAG = re.compile(r"<lora:([^>]*)>")
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
HASH_CHARS = 12  # A1111's short hash
MAX_HEADER_BYTES = 100 * 2**20
MAX_NAMES_SHOWN = 10
# Tensor-name endings of a LoRA layer's first ("down", A) matrix, one per adapted layer, in the
# layouts diffusers reads: kohya/A1111, peft, and diffusers' older attention-processor layout.
DOWN_ENDINGS = (
    "lora_down.weight",
    "lora.down.weight",
    "lora_A.weight",
    "lora_linear_layer.down.weight",
)
# Cross-attention width (the text embedding the UNet attends to) of the standard families.
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
# Key prefixes of layers in SDXL's second text encoder (kohya, diffusers, and a short form).
SECOND_TEXT_ENCODER = ("lora_te2_", "text_encoder_2.", "te2.")


class LoraFileError(RuntimeError):
    """A file in ``loras/`` that the endpoint will not load; the message names it."""


class TagError(ValueError):
    """A malformed ``<lora:...>`` tag; the message names the field, never quoting the prompt."""


def folder(model_dir: str | Path) -> Path:
    return Path(model_dir) / FOLDER


def is_name(text: str) -> bool:
    return len(text) <= MAX_NAME and NAME.fullmatch(text) is not None


def find(model_dir: str | Path) -> dict[str, Path]:
    """The LoRA files of ``model_dir/loras`` by name, sorted; raises ``LoraFileError`` for a
    pickle (unpickling can run code) or a file whose name a request could not write.
    Hidden files and files of other kinds (a README, .gitattributes) are left alone."""
    found = {}
    place = folder(model_dir)
    if not place.is_dir():
        return found
    for path in sorted(place.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise LoraFileError(
                f"{FOLDER}/{path.name} is a pickle file: loading one can run arbitrary code, so "
                "the endpoint loads LoRAs from .safetensors only. Convert it with "
                f"scripts/import_model.sh --add-lora {path.name} --allow-pickle, or remove it"
            )
        if path.suffix != SUFFIX:
            continue
        name = path.name[: -len(SUFFIX)]
        if not is_name(name):
            raise LoraFileError(
                f"{FOLDER}/{path.name}: a LoRA's name is its file name without {SUFFIX}, and "
                f"requests could not write this one; rename the file ({NAME_RULE})"
            )
        found[name] = path
    return found


def names_in(model_dir: str | Path) -> tuple[str, ...]:
    """The names a request may use, for descriptions made before the model loads (the local
    server's form and OpenAPI); a folder the endpoint would refuse gives none."""
    try:
        return tuple(find(model_dir))
    except (LoraFileError, OSError):
        return ()


# ---------------------------------------------------------------------------------------------
# What a file says about the model it was made for


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layers: int  # adapted layers (one "down" matrix each)
    text_width: int | None  # input width of its (first) text-encoder layers' attention
    cross_width: int | None  # input width of its UNet cross-attention key/value layers
    second_text_encoder: bool  # holds layers for SDXL's second text encoder
    short_hash: str  # A1111's "Lora hashes" entry
    second_text_width: int | None = None  # the same as text_width, for the second encoder

    @property
    def family(self) -> str | None:
        if self.second_text_encoder:
            return FAMILIES[2048]
        return FAMILIES.get(self.cross_width or self.text_width or 0)


def read_header(path: Path) -> dict:
    """A safetensors file's header: tensor name -> dtype, shape, offsets."""
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) != 8:
            raise LoraFileError(f"{_shown(path)} is not a safetensors file (it is empty)")
        size = struct.unpack("<Q", start)[0]
        if size > MAX_HEADER_BYTES:
            raise LoraFileError(f"{_shown(path)} is not a safetensors file (bad header)")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError):
            raise LoraFileError(f"{_shown(path)} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{_shown(path)} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    return header


def inspect(path: Path) -> LoraFile:
    """What ``path``'s tensor names and shapes say, read from its header alone."""
    header = read_header(path)
    downs = {key: entry["shape"] for key, entry in header.items() if key.endswith(DOWN_ENDINGS)}
    if not downs:
        raise LoraFileError(
            f"{_shown(path)} holds no LoRA layers: none of its {len(header)} tensor names "
            f"ends in {', '.join(DOWN_ENDINGS)} (is it a LoRA, or a LyCORIS type that diffusers "
            "does not load?)"
        )
    text_width = second_text_width = cross_width = None
    for key, shape in downs.items():
        if len(shape) < 2:
            continue
        parts = set(re.split(r"[._]", key))
        if "attn2" in parts and ({"to", "k"} <= parts or {"to", "v"} <= parts):
            cross_width = shape[1]
        elif ("te" in parts or "te1" in parts or "text" in parts) and "proj" in parts:
            # SDXL's two encoders differ in width (768 and 1280): each is checked on its own.
            if key.startswith(SECOND_TEXT_ENCODER):
                second_text_width = shape[1]
            else:
                text_width = shape[1]
    second = any(k.startswith(SECOND_TEXT_ENCODER) for k in header)
    return LoraFile(
        path,
        len(downs),
        text_width,
        cross_width,
        second,
        a1111_hash(path),
        second_text_width=second_text_width,
    )


def a1111_hash(path: Path) -> str:
    """AUTOMATIC1111's short hash of a LoRA (kohya's "addnet" hash): SHA-256 of the file's bytes
    after the header, so editing the metadata keeps it; the first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + size)
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:HASH_CHARS]


def family_name(width: int | None) -> str:
    return FAMILIES.get(width or 0, "a non-standard model")


def _shown(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name == FOLDER else str(path)


# ---------------------------------------------------------------------------------------------
# Prompt tags


def split_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its ``<lora:NAME>`` / ``<lora:NAME:WEIGHT>`` tags (weight 1 when
    left out), and the tags' (name, weight) pairs in order. The text around a tag stays as
    it was, as in AUTOMATIC1111. Raises ``TagError`` for a tag it cannot read."""
    tags: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        parts = [part.strip() for part in match.group(1).split(":")]
        if len(parts) > 2:
            raise TagError(
                f"`inputs` has a LoRA tag of {len(parts)} parts; write <lora:NAME> or "
                "<lora:NAME:WEIGHT> (separate text-encoder and UNet weights are not supported)"
            )
        name, weight = parts[0], parts[1] if len(parts) == 2 else "1"
        if not name:
            raise TagError("`inputs` has a LoRA tag without a name; write <lora:NAME:WEIGHT>")
        if NUMBER.fullmatch(weight) is None:
            raise TagError(
                f"`inputs` has a LoRA tag for {shown_name(name)} whose weight is not a number; "
                "write <lora:NAME:WEIGHT> with a WEIGHT such as 0.8"
            )
        tags.append((name, float(weight)))
        return ""

    return TAG.sub(take, prompt), tags


def shown_name(name: str) -> str:
    """A LoRA name for an error message: as written when it could be a file's name, else only
    its length (a tag's text is part of the prompt, which never goes into messages)."""
    return f"`{name}`" if is_name(name) else f"a name of {len(name):,} characters"


def added_up(field: dict[str, float], tags: list[tuple[str, float]]) -> dict[str, float]:
    """Weights per name, field and tags together (a name given twice adds up)."""
    total = dict(field)
    for name, weight in tags:
        total[name] = total.get(name, 0.0) + weight
    return total


def in_effect(prompt: str, field: dict[str, float]) -> dict[str, float]:
    """The LoRAs a request uses, name -> weight, by name: the `loras` field and the prompt's
    tags added up; a weight of 0 leaves its LoRA out."""
    total = added_up(field, split_tags(prompt)[1])
    return {name: weight for name, weight in sorted(total.items()) if weight != 0}


def tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{number(weight)}>"


def number(value: float) -> str:
    """``value`` as short as it reads back exactly: 0.8, 1, -0.25."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def with_tags(prompt: str, weights: dict[str, float]) -> str:
    """The prompt as AUTOMATIC1111 writes it into an image: the text without its LoRA tags,
    then each LoRA in effect once, as one tag with its total weight. A prompt that names no
    LoRA comes back unchanged."""
    if not weights and TAG.search(prompt) is None:
        return prompt
    text = TAG.sub("", prompt).rstrip()
    tags = " ".join(tag(name, weight) for name, weight in weights.items())
    return f"{text} {tags}" if text and tags else text or tags


# ---------------------------------------------------------------------------------------------
# A request's LoRAs against the endpoint's


def check_field(weights: dict[str, float], names: Sequence[str], most: int) -> None:
    """The `loras` field names at most ``most`` LoRAs, all of them in ``names``."""
    if len(weights) > most:
        raise ValueError(f"names {len(weights)} LoRAs; at most {most} are allowed per request")
    for name in weights:
        if name not in names:
            raise ValueError(f"names {unknown(name, names)}")


def check_tags(prompt: str, field: dict[str, float], names: Sequence[str], limits: Limits) -> None:
    """The prompt's tags name LoRAs in ``names`` and, added up with the `loras` field, stay
    within ``limits``; otherwise a ``ValueError`` that names the fields (and, of the prompt,
    only LoRA names)."""
    tags = split_tags(prompt)[1]
    if not tags:
        return
    for name, _ in tags:
        if name not in names:
            raise ValueError(f"`inputs` has a <lora:...> tag for {unknown(name, names)}")
    total = added_up(field, tags)
    fields = "`loras` and `inputs`" if field else "`inputs`"
    if len(total) > limits.max_loras:
        raise ValueError(
            f"{fields} name {len(total)} LoRAs in all; at most {limits.max_loras} are allowed "
            "per request"
        )
    most = limits.max_lora_weight
    for name, weight in total.items():
        if not abs(weight) <= most:
            raise ValueError(
                f"{fields} give the LoRA `{name}` the weight {number(weight)} in all; a weight "
                f"must be from -{most:g} to {most:g}"
            )


def unknown(name: str, names: Sequence[str]) -> str:
    """The end of the message for a name that is no LoRA of this endpoint."""
    if not names:
        return (
            f"the LoRA {shown_name(name)}, but this endpoint has none (its repository's "
            f"`{FOLDER}/` folder holds no LoRA files)"
        )
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    if len(names) > MAX_NAMES_SHOWN:
        shown += f" and {len(names) - MAX_NAMES_SHOWN:,} more"
    return f"the LoRA {shown_name(name)}, which this endpoint does not have (it has: {shown})"
