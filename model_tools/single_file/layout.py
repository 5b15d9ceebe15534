"""The original single-file layout: where each part's weights live, which keys a complete file
has, and how its EMA copies are named.

The text encoder's prefix is the family's (``model_tools.families``); the UNet's and the VAE's
are the same in every Stable Diffusion family.
"""

from __future__ import annotations

from collections.abc import Iterable

UNET = "model.diffusion_model."
VAE = "first_stage_model."
EMA = "model_ema."
# diffusers' from_single_file (extract_ema=False) and A1111 both load model.diffusion_model.*
# as stored and ignore model_ema.*; "-emaonly" files already hold the EMA weights there.
EMA_DEFAULT = False

# Keys every usable checkpoint has, by part; a missing one is named in the error.
UNET_REQUIRED = (
    UNET + "input_blocks.0.0.weight",
    UNET + "time_embed.0.weight",
    UNET + "out.2.weight",
)
VAE_REQUIRED = (
    VAE + "encoder.conv_in.weight",
    VAE + "decoder.conv_out.weight",
    VAE + "quant_conv.weight",
    VAE + "post_quant_conv.weight",
)
# A text encoder's, under its family's prefix, by the layout of its key names.
TEXT_REQUIRED = {
    "clip": (
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
    ),
    "openclip": (
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
    ),
}
# The UNet's first convolution: its input channels tell text-to-image (4) from inpainting.
CONV_IN = UNET + "input_blocks.0.0.weight"


class UnsupportedCheckpoint(ValueError):
    """A checkpoint that is not a single file of a known family with everything it needs."""


def sample_keys(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def key_groups(keys: Iterable[str]) -> str:
    groups = sorted({".".join(k.split(".")[:2]) + ".*" for k in keys})
    return ", ".join(groups[:8]) + (" ..." if len(groups) > 8 else "") if groups else "nothing"


def ema_key(unet_key: str) -> str:
    """The EMA copy's name: ``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b``.

    LDM's EMA module stores its shadow weights under the dotted name with the dots removed.
    """
    return EMA + "".join(unet_key.split(".")[1:])
