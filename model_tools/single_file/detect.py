"""Reading a single file: which family it is (or what else it is), and its EMA weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from model_tools.families import FAMILIES, REFUSED, SUPPORTED

from .layout import (
    CONV_IN,
    EMA,
    EMA_DEFAULT,
    TEXT_REQUIRED,
    UNET,
    UNET_REQUIRED,
    VAE,
    VAE_REQUIRED,
    UnsupportedCheckpoint,
    ema_key,
    key_groups,
    sample_keys,
)


def detect_family(keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """The family's key (``"sd1"``, ``"sd2"``, ``"sdxl"``) from a checkpoint's key names;
    raises UnsupportedCheckpoint.

    ``shapes`` (key -> shape, e.g. from ``safe_open(...).get_slice(key).get_shape()``) adds
    the checks that need them: an inpainting UNet (9 input channels) is refused.
    """
    keys = set(keys)
    if not keys:
        raise UnsupportedCheckpoint("the checkpoint holds no tensors")
    for marker, what in REFUSED:
        if any(marker in k for k in keys):
            raise UnsupportedCheckpoint(
                f"this is {what}; only {SUPPORTED} single-file checkpoints are supported"
            )
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        raise UnsupportedCheckpoint(
            "this is a VAE on its own (encoder.*, decoder.*), not a whole model: use it as "
            "the VAE of a model"
        )
    if not any(k.startswith(UNET) for k in keys):
        raise UnsupportedCheckpoint(
            f"no UNet weights ({UNET}*): not a Stable Diffusion checkpoint in the original "
            f"layout (it holds {key_groups(keys)})"
        )
    found = [f for f in FAMILIES.values() if any(k.startswith(f.marker) for k in keys)]
    if len(found) != 1:
        if len(FAMILIES) == 2:
            detail, listing = "both" if found else "neither", " and "
        else:
            detail, listing = "several" if found else "none", ", "
        known = listing.join(
            f"{f.marker}* ({f.short}, {f.architectures})" for f in FAMILIES.values()
        )
        raise UnsupportedCheckpoint(
            f"the text encoder is missing or ambiguous: {detail} of {known} found; the file "
            f"holds {key_groups(keys)}"
        )
    family = found[0]
    parts = [("UNet", UNET, UNET_REQUIRED), ("VAE", VAE, VAE_REQUIRED)]
    for encoder in family.text_encoders:
        required = [encoder.prefix + k for k in TEXT_REQUIRED[encoder.layout]]
        parts.append((encoder.component.replace("_", " "), encoder.prefix, required))
    for label, prefix, required in parts:
        missing = [k for k in required if k not in keys]
        if not missing:
            continue
        present = sum(k.startswith(prefix) for k in keys)
        if not present:
            raise UnsupportedCheckpoint(
                f"{family.name} checkpoint without a {label}: no {prefix}* keys "
                f"(it holds {key_groups(keys)})"
            )
        raise UnsupportedCheckpoint(
            f"{family.name} checkpoint with an incomplete {label}: missing "
            f"{sample_keys(missing)} ({present} keys under {prefix}*)"
        )
    if shapes is not None:
        conv_in = shapes.get(CONV_IN)
        if conv_in is not None and conv_in[1] != 4:
            raise UnsupportedCheckpoint(
                f"the UNet takes {conv_in[1]} input channels: an inpainting or instruct "
                "model (text-to-image needs 4); only text-to-image checkpoints are supported"
            )
    return family.key


def has_ema(keys: Iterable[str]) -> bool:
    """Whether the checkpoint carries EMA copies of the UNet (``model_ema.diffusion_model*``)."""
    return any(k.startswith(EMA + "diffusion_model") for k in keys)


def select_unet_weights(
    state: Mapping[str, torch.Tensor], use_ema: bool = EMA_DEFAULT
) -> dict[str, torch.Tensor]:
    """The checkpoint without ``model_ema.*``, its UNet taken from the EMA copies if asked."""
    out = {k: v for k, v in state.items() if not k.startswith(EMA)}
    if not use_ema:
        return out
    unet_keys = [k for k in out if k.startswith(UNET)]
    missing = [ema_key(k) for k in unet_keys if ema_key(k) not in state]
    if missing:
        raise UnsupportedCheckpoint(
            f"EMA weights asked for, but {len(missing)} of the {len(unet_keys)} UNet weights "
            f"have no EMA copy (e.g. {sample_keys(missing)})"
        )
    for key in unet_keys:
        out[key] = state[ema_key(key)]
    return out
