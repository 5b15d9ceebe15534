"""Key maps from diffusers' names to the original single-file layout's, for each part: the
UNet (LDM's ``openaimodel``, SDXL's ``label_emb`` included), the VAE (LDM's ``autoencoder``)
and each text encoder in the layout its family stores it in (``TEXT_TO_ORIGINAL``, keyed by
``TextEncoder.layout``: SDXL's CLIP ViT-L as ``clip``, its ViT-bigG as ``openclip``).

Reading the original layout is diffusers' job (``from_single_file``); these are the inverse,
which diffusers does not ship. They are built from the published layouts and a folder's own
configs, so they fit the tiny shipped model as well as full SD sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from model_tools.families import FAMILIES, SUPPORTED_SHORT

from .layout import UNET, VAE, UnsupportedCheckpoint, sample_keys


def _resnet_unet(key: str) -> str:
    for new, old in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ):
        if key.startswith(new + "."):
            return old + key[len(new) :]
    raise KeyError(key)


def _rename(key: str, prefixes: Sequence[tuple[str, str, object]]) -> str:
    for diffusers_prefix, original_prefix, inner in prefixes:
        if key.startswith(diffusers_prefix):
            rest = key[len(diffusers_prefix) :]
            return original_prefix + (inner(rest) if inner else rest)
    raise KeyError(key)


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping) -> dict:
    """A diffusers UNet2DConditionModel state dict in LDM's ``openaimodel`` names (unprefixed)."""
    per_level = config["layers_per_block"] + 1  # resnets (+ a downsampler) per down level
    levels = len(config["block_out_channels"])
    prefixes: list[tuple[str, str, object]] = [
        ("time_embedding.linear_1.", "time_embed.0.", None),
        ("time_embedding.linear_2.", "time_embed.2.", None),
        ("conv_in.", "input_blocks.0.0.", None),
        ("conv_norm_out.", "out.0.", None),
        ("conv_out.", "out.2.", None),
    ]
    if config.get("addition_embed_type") == "text_time":
        # SDXL's embedding of the pooled text and the size numbers, LDM's label_emb (a
        # Sequential: linear, SiLU, linear); the sinusoidal add_time_proj has no weights.
        prefixes += [
            ("add_embedding.linear_1.", "label_emb.0.0.", None),
            ("add_embedding.linear_2.", "label_emb.0.2.", None),
        ]
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            block = 1 + i * per_level + j
            prefixes.append(
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", _resnet_unet)
            )
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", None))
        prefixes.append(
            (
                f"down_blocks.{i}.downsamplers.0.conv.",
                f"input_blocks.{1 + i * per_level + per_level - 1}.0.op.",
                None,
            )
        )
        up_has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        for j in range(per_level):
            block = i * per_level + j
            prefixes.append(
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", _resnet_unet)
            )
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", None))
        upsampler = f"output_blocks.{i * per_level + per_level - 1}.{2 if up_has_attention else 1}."
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", upsampler, None))
    for k in range(2):  # LDM's middle block alternates resnet, attention, resnet
        prefixes.append((f"mid_block.resnets.{k}.", f"middle_block.{2 * k}.", _resnet_unet))
    prefixes.append(("mid_block.attentions.0.", "middle_block.1.", None))
    return _map_all(state, prefixes, "UNet")


def _resnet_vae(key: str) -> str:
    return (
        key.replace("conv_shortcut.", "nin_shortcut.", 1)
        if key.startswith("conv_shortcut.")
        else key
    )


def _vae_attention(key: str) -> str:
    for new, old in (
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
        # names of diffusers < 0.14, still found in old folders
        ("query.", "q."),
        ("key.", "k."),
        ("value.", "v."),
        ("proj_attn.", "proj_out."),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(key)


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping) -> dict:
    """A diffusers AutoencoderKL state dict in LDM's ``autoencoder`` names (unprefixed)."""
    levels = len(config["block_out_channels"])
    prefixes: list[tuple[str, str, object]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", None),
        ("decoder.conv_norm_out.", "decoder.norm_out.", None),
    ]
    for same in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out."):
        prefixes.append((same, same, None))
    prefixes += [
        ("quant_conv.", "quant_conv.", None),
        ("post_quant_conv.", "post_quant_conv.", None),
    ]
    for i in range(levels):
        prefixes.append(
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", _vae_block)
        )
        prefixes.append(
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", None)
        )
        # LDM numbers the decoder's levels from the bottom, diffusers from the top.
        up = levels - 1 - i
        prefixes.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block.", _vae_block))
        prefixes.append(
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", None)
        )
    for part in ("encoder", "decoder"):
        for k in range(2):
            prefixes.append(
                (f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", _resnet_vae)
            )
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _vae_attention))
    out = _map_all(state, prefixes, "VAE")
    for key, tensor in out.items():
        # LDM's attention projections are 1x1 convolutions, diffusers' are linear layers.
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def _vae_block(rest: str) -> str:
    index, _, key = rest.partition(".")
    return f"{index}.{_resnet_vae(key)}"


def _map_all(state: Mapping[str, torch.Tensor], prefixes, what: str) -> dict:
    out, unknown = {}, []
    for key, tensor in state.items():
        try:
            out[_rename(key, prefixes)] = tensor
        except KeyError:
            unknown.append(key)
    if unknown:
        raise UnsupportedCheckpoint(
            f"{what} weights with no place in the original layout: {sample_keys(unknown)} "
            f"(not an {SUPPORTED_SHORT} architecture)"
        )
    return out


def text_state(state: Mapping[str, torch.Tensor]) -> dict:
    """A CLIPTextModel state dict with the ``text_model.`` prefix, whatever saved it.

    transformers >= 5.6 names CLIPTextModel's weights without the prefix.
    """
    out = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):  # a buffer, rebuilt at load time
            continue
        if not key.startswith("text_model.") and key not in (
            "text_projection.weight",
            "logit_scale",
        ):
            key = "text_model." + key
        out[key] = tensor
    return out


def clip_to_original(state: Mapping[str, torch.Tensor]) -> dict:
    """SD 1.x: the CLIP text model as transformers names it (LDM's FrozenCLIPEmbedder wraps it)."""
    state = text_state(state)
    out = {k: v for k, v in state.items() if k.startswith("text_model.")}
    tokens = state["text_model.embeddings.position_embedding.weight"].shape[0]
    # Real SD 1.x files carry the position ids buffer; diffusers skips it on load.
    out["text_model.embeddings.position_ids"] = torch.arange(tokens)[None]
    return out


def openclip_to_original(state: Mapping[str, torch.Tensor]) -> dict:
    """SD 2.x: OpenCLIP's text tower (``model.`` in LDM's FrozenOpenCLIPEmbedder) from CLIP."""
    state = text_state(state)
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    hidden = out["token_embedding.weight"].shape[1]
    layers = sorted(
        {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    )
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for new, old in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[dst + f"{old}.{kind}"] = state[src + f"{new}.{kind}"]
    used = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    } | {k for k in state if k.startswith("text_model.encoder.layers.")}
    leftover = set(state) - used - {"text_projection.weight", "logit_scale"}
    if leftover:
        raise UnsupportedCheckpoint(
            f"text encoder weights with no OpenCLIP name: {sample_keys(leftover)}"
        )
    # OpenCLIP multiplies the pooled output by text_projection ([width, embed]); a
    # CLIPTextModel has none, so the identity keeps the file well-formed (diffusers ignores it
    # and reads the width from its first dimension to split in_proj).
    projection = state.get("text_projection.weight")
    out["text_projection"] = (
        projection.T.contiguous()
        if projection is not None
        else torch.eye(hidden, dtype=out["ln_final.weight"].dtype)
    )
    out["logit_scale"] = torch.tensor(math.log(100.0))
    return out


# How each text-encoder layout (TextEncoder.layout) is written under its family's prefix.
TEXT_TO_ORIGINAL: dict[str, Callable[[Mapping[str, torch.Tensor]], dict]] = {
    "clip": clip_to_original,
    "openclip": openclip_to_original,
}


def to_original(
    family: str,
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping,
    *text_encoders: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Diffusers state dicts (the family's text encoders last, in its order) as one
    original-layout checkpoint."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    encoders = FAMILIES[family].text_encoders
    if len(text_encoders) != len(encoders):
        raise ValueError(
            f"{FAMILIES[family].name} has {len(encoders)} text encoder(s), "
            f"{len(text_encoders)} given"
        )
    out = {UNET + k: v for k, v in unet_to_original(unet, unet_config).items()}
    out |= {VAE + k: v for k, v in vae_to_original(vae, vae_config).items()}
    for encoder, state in zip(encoders, text_encoders, strict=True):
        text = TEXT_TO_ORIGINAL[encoder.layout](state)
        out |= {encoder.prefix + k: v for k, v in text.items()}
    return out
