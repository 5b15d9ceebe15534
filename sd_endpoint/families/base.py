"""What a model family is: the description that the engine and the handler consult."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Protocol

import diffusers

from ..prompts import Conditioning
from ..settings import Limits

MODEL_INDEX = "model_index.json"


class UnsupportedModelError(RuntimeError):
    """The model folder is not one of the families this endpoint serves."""


class TextConditioner(Protocol):
    """Turns a request's prompts into the pipeline's text inputs (``PromptEncoder`` is one)."""

    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        *,
        guided: bool,
        clip_skip: int,
        max_chunks: int,
    ) -> Conditioning: ...


@dataclass(frozen=True)
class Family:
    """One model family: everything the serving code does differently for it."""

    name: str  # for people, in messages: "Stable Diffusion 1.x and 2.x"
    # The diffusers pipeline class, as `_class_name` in the folder's model_index.json names it.
    pipeline: str
    # The folders whose weights the start-up check requires as safetensors.
    weighted_components: tuple[str, ...]
    # Builds the prompt encoder from the loaded pipeline.
    prompt_encoder: Callable[[Any], TextConditioner]
    # Extra keyword arguments of the pipeline's `from_pretrained`.
    load_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Whether the VAE decodes in float32 when the model runs in float16 and the VAE's config
    # says `force_upcast`, as diffusers' own pipeline for the family does: its SDXL pipeline
    # does; its SD pipeline never reads the flag, which SD 1.5's VAE config sets although that
    # VAE decodes well in float16. Any float16 decode that overflows is redone in float32.
    honours_force_upcast: bool = False
    # Defaults of `Limits` fields that suit this family better; SD_* variables still win.
    limits: Mapping[str, int | float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        unknown = set(self.limits) - {f.name for f in fields(Limits)}
        if unknown:
            raise ValueError(f"{self.name}: no such limits: {', '.join(sorted(unknown))}")

    @property
    def pipeline_class(self) -> type:
        return getattr(diffusers, self.pipeline)

    def native_size(self, pipe) -> tuple[int, int]:
        """(height, width) the model was trained at: its UNet's latent size in pixels (512 for
        SD 1.5, 768 for SD 2.x's 768-v, 1024 for SDXL)."""
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return (side, side)
