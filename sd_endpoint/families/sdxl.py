"""Stable Diffusion XL: two text encoders, a pooled text embedding, ``StableDiffusionXLPipeline``.

A prompt is read as AUTOMATIC1111 reads it for SDXL: each encoder (``text_encoder``, CLIP
ViT-L, padding with its end token; ``text_encoder_2``, OpenCLIP ViT-bigG with a projection,
padding with ``!``) takes it in 75-token chunks with emphasis (a ``PromptEncoder`` each), both
at their penultimate layer without the final layer norm, and the two hidden states are joined
per token (768 + 1280 = 2048 wide in SDXL). The UNet also takes a pooled embedding: bigG's
projected end-token state for the prompt's **first** chunk, unweighted, as AUTOMATIC1111 and
ComfyUI take it. An empty negative prompt (or none) is zeros, embeddings and pooled alike, as
in AUTOMATIC1111 and in diffusers for a model whose ``force_zeros_for_empty_prompt`` is true
(SDXL base's is).

``clip_skip``: SDXL was trained on the penultimate layer, which is what AUTOMATIC1111 and
ComfyUI read for SDXL whatever their clip-skip setting ("clip skip 2" on a Pony-style model
card means that reading). So 1 and 2 both give it; N > 2 reads layer -N of both encoders.

The size conditioning is the pipeline's own default: original size = target size = the
requested height and width, crop (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

from ..prompts import Conditioning, PromptEncoder, Tokenized
from .base import Family

# Both encoders are read at this layer, counted from the last, unless clip_skip goes deeper.
NATIVE_LAYER = 2


@dataclass(frozen=True)
class PooledConditioning(Conditioning):
    """SDXL's text inputs: the joined hidden states and the pooled embeddings."""

    pooled_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor | None  # None without guidance


class XLPromptEncoder:
    """Prompts of any length, with emphasis, through SDXL's two tokenizers and encoders."""

    def __init__(
        self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, zero_empty_negative=True
    ):
        self.encoders = (
            PromptEncoder(tokenizer, text_encoder, final_norm=False),
            PromptEncoder(tokenizer_2, text_encoder_2, final_norm=False),
        )
        if self.encoders[0].length != self.encoders[1].length:
            raise ValueError("SDXL's two text encoders must take chunks of the same length")
        self.length = self.encoders[0].length
        self.layers = min(encoder.layers for encoder in self.encoders)
        self.zero_empty_negative = zero_empty_negative

    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        *,
        guided: bool,
        clip_skip: int = 1,
        max_chunks: int,
        names: tuple[str, str] = ("inputs", "negative_prompt"),
    ) -> PooledConditioning:
        """The prompt's (and with ``guided`` the negative prompt's) joined hidden states
        ``(1, 77 * chunks, 2048)``, the same number of chunks for both, and pooled embeddings
        ``(1, 1280)``. Raises ``PromptTooLongError`` before any forward pass, as
        ``PromptEncoder.encode`` does."""
        if clip_skip not in range(1, self.layers + 1):
            raise ValueError(f"clip_skip must be from 1 to {self.layers}, got {clip_skip}")
        layer = max(clip_skip, NATIVE_LAYER)
        positive = [e.checked(prompt, names[0], max_chunks) for e in self.encoders]
        # Checked even without guidance, so that a request is valid or not whatever its scale.
        negative = [e.checked(negative_prompt or "", names[1], max_chunks) for e in self.encoders]
        zeros = self.zero_empty_negative and not negative_prompt
        counted = positive if zeros or not guided else positive + negative
        count = max(len(tokenized.chunks) for tokenized in counted)
        embeds, pooled = self.embed(positive, count, layer)
        if not guided:
            return PooledConditioning(embeds, None, pooled, None)
        if zeros:
            return PooledConditioning(
                embeds, torch.zeros_like(embeds), pooled, torch.zeros_like(pooled)
            )
        negative_embeds, negative_pooled = self.embed(negative, count, layer)
        return PooledConditioning(embeds, negative_embeds, pooled, negative_pooled)

    def embed(
        self, tokenized: list[Tokenized], count: int, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One text, tokenized by each encoder, padded to ``count`` chunks: the joined hidden
        states of ``layer`` (counted from the last) and the first chunk's pooled embedding."""
        states = []
        for encoder, text in zip(self.encoders, tokenized, strict=True):
            hidden, output = encoder.encode_chunks(encoder.padded(text.chunks, count), layer)
            states.append(hidden)
        joined = torch.cat(states, dim=-1)
        # `output` is text_encoder_2's: its projected end-token state, before any emphasis.
        return joined.reshape(1, count * self.length, joined.shape[-1]), output.text_embeds[:1]


def prompt_encoder(pipe) -> XLPromptEncoder:
    return XLPromptEncoder(
        pipe.tokenizer,
        pipe.text_encoder,
        pipe.tokenizer_2,
        pipe.text_encoder_2,
        zero_empty_negative=pipe.config.get("force_zeros_for_empty_prompt", True),
    )


SDXL = Family(
    name="Stable Diffusion XL",
    pipeline="StableDiffusionXLPipeline",
    weighted_components=("unet", "vae", "text_encoder", "text_encoder_2"),
    prompt_encoder=prompt_encoder,
    # The invisible watermark (on whenever its package is installed) changes the pixels after
    # decoding: without it, a seed gives the same image on every install.
    load_options=MappingProxyType({"add_watermarker": False}),
    # SDXL's VAE overflows float16 and says so in its config; the fp16-fix VAE says it need
    # not be upcast, and decodes in float16.
    honours_force_upcast=True,
    # SDXL's training buckets (1024x1024, 1152x896, 1216x832, 1344x768, 1536x640 and their
    # transposes) stay within a megapixel but reach 1536 on a side; the work limit admits
    # four 1024x1024 images at the default 25 steps (or one at 100).
    limits=MappingProxyType(
        {"max_side": 1536, "max_pixels": 1024 * 1024, "max_work": 1024 * 1024 * 100}
    ),
)
