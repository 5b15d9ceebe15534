"""Model families: what the serving code does differently for each, in one place.

A family is a description (``Family``): the diffusers pipeline that loads it, the components
whose weights the start-up check covers, how a prompt becomes the pipeline's text inputs (a
``Conditioning``), its native size and the limits that suit it. ``detect`` reads which family a
model folder holds from its ``model_index.json``; nobody configures it. The engine and the
handler consult the family they are given and branch on none.

Adding a family is adding a module beside ``sd.py`` and an entry in ``FAMILIES``, as
``sdxl.py`` is: a prompt encoder (SDXL's is built on two ``PromptEncoder`` objects and returns
a ``Conditioning`` subclass that adds the pooled embeddings), its pipeline's load options, the
limits that admit its sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import MODEL_INDEX, Family, TextConditioner, UnsupportedModelError
from .sd import SD
from .sdxl import SDXL

__all__ = [
    "FAMILIES",
    "SD",
    "SDXL",
    "Family",
    "TextConditioner",
    "UnsupportedModelError",
    "detect",
]

FAMILIES: tuple[Family, ...] = (SD, SDXL)


def detect(model_dir: str | Path) -> Family:
    """The family of the diffusers folder ``model_dir``, from its pipeline's class name.

    Raises ``UnsupportedModelError`` (a ``RuntimeError``: it stops start-up) naming the file,
    what it found and the pipelines this endpoint serves.
    """
    path = Path(model_dir)
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        raise UnsupportedModelError(
            f"{path} holds no {MODEL_INDEX}: it must be a diffusers model folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsupportedModelError(f"{index_file} is not valid JSON: {exc}") from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    for family in FAMILIES:
        if class_name == family.pipeline:
            return family
    served = ", ".join(f"`{f.pipeline}` ({f.name})" for f in FAMILIES)
    if isinstance(class_name, str):
        raise UnsupportedModelError(
            f"{index_file} names the pipeline `{class_name}` (its `_class_name`), which this "
            f"endpoint does not serve; it serves {served}"
        )
    raise UnsupportedModelError(
        f"{index_file} has no `_class_name`, which names the model's pipeline (diffusers' "
        f"save_pretrained writes it); this endpoint serves {served}"
    )
