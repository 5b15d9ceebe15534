"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, ``StableDiffusionPipeline``.

SD 1.x (CLIP ViT-L) and SD 2.x (OpenCLIP ViT-H) differ only in what their folders hold
(hidden size, padding token, prediction type in the scheduler config), which the pipeline and
``PromptEncoder`` read from there: one family serves both.
"""

from __future__ import annotations

from types import MappingProxyType

from ..prompts import PromptEncoder
from .base import Family


def prompt_encoder(pipe) -> PromptEncoder:
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder)


SD = Family(
    name="Stable Diffusion 1.x and 2.x",
    pipeline="StableDiffusionPipeline",
    weighted_components=("unet", "vae", "text_encoder"),
    prompt_encoder=prompt_encoder,
    # The pipeline's own checker blacks out images without a word: safety.py screens them
    # instead, when the folder ships a checker, and the response says what it found.
    load_options=MappingProxyType(
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    ),
)
