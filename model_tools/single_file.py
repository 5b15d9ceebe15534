"""Single-file Stable Diffusion checkpoints: which family a file is, and writing one.

A single-file checkpoint is the original (CompVis / Stability) layout that A1111 and most model
sites share: one ``.safetensors`` holding ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` (text encoder: CLIP ViT-L/14 under
``cond_stage_model.transformer.`` for SD 1.x, OpenCLIP ViT-H under ``cond_stage_model.model.``
with fused q/k/v for SD 2.x), sometimes with ``model_ema.*`` copies of the UNet.

Reading such a file is diffusers' job (``StableDiffusionPipeline.from_single_file(path,
config=CONFIGS[family], local_files_only=True)``); this module says which family a file is and
refuses what it cannot be, and writes the inverse, which diffusers does not ship: a diffusers
folder back to one original-layout file. The writer maps keys from the published layouts and
the folder's own configs, so it handles the tiny shipped model as well as full SD sizes; its
output read back by ``from_single_file`` gives tensors equal to the source.

    python -m model_tools.single_file write FOLDER OUT.safetensors [--dtype float32] [--ema]
    python -m model_tools.single_file random --family sd15 --out sd15.safetensors
    python -m model_tools.single_file detect FILE.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_ROOT = Path(__file__).parent / "configs"
# Complete diffusers folders without weights: ``config=`` for from_single_file, and the
# templates of an imported model. SD 2.x's is SD 2.1-768 (v-prediction, 768 px), which is
# also what diffusers assumes for an SD 2.x file; see apply_prediction_type for the 512 base.
CONFIGS = {"sd1": CONFIG_ROOT / "sd1", "sd2": CONFIG_ROOT / "sd2"}
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}
# Native latent size (pixels / 8) for each SD 2.x prediction type: v-prediction is the 768 px
# model (SD 2.0-v, 2.1), epsilon the 512 px base.
PREDICTION_SAMPLE_SIZES = {"v_prediction": 96, "epsilon": 64}

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model."}
EMA = "model_ema."
# diffusers' from_single_file (extract_ema=False) and A1111 both load model.diffusion_model.*
# as stored and ignore model_ema.*; "-emaonly" files already hold the EMA weights there.
EMA_DEFAULT = False

# Keys every usable checkpoint of a family has; a missing one is named in the error.
REQUIRED = {
    "UNet": [
        UNET + "input_blocks.0.0.weight",
        UNET + "time_embed.0.weight",
        UNET + "out.2.weight",
    ],
    "VAE": [
        VAE + "encoder.conv_in.weight",
        VAE + "decoder.conv_out.weight",
        VAE + "quant_conv.weight",
        VAE + "post_quant_conv.weight",
    ],
    "sd1 text encoder": [
        TEXT["sd1"] + "text_model.embeddings.token_embedding.weight",
        TEXT["sd1"] + "text_model.embeddings.position_embedding.weight",
        TEXT["sd1"] + "text_model.final_layer_norm.weight",
    ],
    "sd2 text encoder": [
        TEXT["sd2"] + "token_embedding.weight",
        TEXT["sd2"] + "positional_embedding",
        TEXT["sd2"] + "ln_final.weight",
        TEXT["sd2"] + "transformer.resblocks.0.attn.in_proj_weight",
    ],
}
# Layouts that are not SD 1.x / 2.x, recognised by a key prefix or fragment.
OTHER_LAYOUTS = (
    ("conditioner.embedders.", "an SDXL checkpoint (conditioner.embedders.*)"),
    ("text_encoders.clip_g.", "an SD3 checkpoint (text_encoders.clip_g.*)"),
    ("joint_blocks.", "an SD3 checkpoint (joint_blocks.*)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks.*)"),
    ("single_transformer_blocks.", "a Flux checkpoint in diffusers layout"),
    ("lora_unet_", "a LoRA (lora_unet_*), not a model: pass it as a LoRA"),
    ("lora_te_", "a LoRA (lora_te_*), not a model: pass it as a LoRA"),
    (".lora_down.", "a LoRA (*.lora_down.*), not a model: pass it as a LoRA"),
    (".lora_A.", "a LoRA (*.lora_A.*), not a model: pass it as a LoRA"),
    ("control_model.", "a ControlNet (control_model.*)"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers component (diffusers key names)"),
)


class UnsupportedCheckpoint(ValueError):
    """A checkpoint that is not an SD 1.x / 2.x single file with everything it needs."""


def _sample(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _groups(keys: Iterable[str]) -> str:
    groups = sorted({".".join(k.split(".")[:2]) + ".*" for k in keys})
    return ", ".join(groups[:8]) + (" ..." if len(groups) > 8 else "") if groups else "nothing"


def detect_family(keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """``"sd1"`` or ``"sd2"``, from a checkpoint's key names; raises UnsupportedCheckpoint.

    ``shapes`` (key -> shape, e.g. from ``safe_open(...).get_slice(key).get_shape()``) adds
    the checks that need them: an inpainting UNet (9 input channels) is refused.
    """
    keys = set(keys)
    if not keys:
        raise UnsupportedCheckpoint("the checkpoint holds no tensors")
    for marker, what in OTHER_LAYOUTS:
        if any(marker in k for k in keys):
            raise UnsupportedCheckpoint(
                f"this is {what}; only Stable Diffusion 1.x and 2.x single-file checkpoints "
                "are supported"
            )
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        raise UnsupportedCheckpoint(
            "this is a VAE on its own (encoder.*, decoder.*), not a whole model: use it as "
            "the VAE of a model"
        )
    if not any(k.startswith(UNET) for k in keys):
        raise UnsupportedCheckpoint(
            f"no UNet weights ({UNET}*): not a Stable Diffusion checkpoint in the original "
            f"layout (it holds {_groups(keys)})"
        )
    has_sd1 = any(k.startswith(TEXT["sd1"]) for k in keys)
    has_sd2 = any(k.startswith(TEXT["sd2"]) for k in keys)
    if has_sd1 == has_sd2:
        detail = "both" if has_sd1 else "neither"
        raise UnsupportedCheckpoint(
            f"the text encoder is missing or ambiguous: {detail} of {TEXT['sd1']}* (SD 1.x, "
            f"CLIP ViT-L) and {TEXT['sd2']}* (SD 2.x, OpenCLIP ViT-H) found; the file holds "
            f"{_groups(keys)}"
        )
    family = "sd1" if has_sd1 else "sd2"
    for group in ("UNet", "VAE", f"{family} text encoder"):
        missing = [k for k in REQUIRED[group] if k not in keys]
        if not missing:
            continue
        label = group.removeprefix(f"{family} ")
        prefix = {"UNet": UNET, "VAE": VAE}.get(group, TEXT[family])
        present = sum(k.startswith(prefix) for k in keys)
        if not present:
            raise UnsupportedCheckpoint(
                f"{FAMILY_NAMES[family]} checkpoint without a {label}: no {prefix}* keys "
                f"(it holds {_groups(keys)})"
            )
        raise UnsupportedCheckpoint(
            f"{FAMILY_NAMES[family]} checkpoint with an incomplete {label}: missing "
            f"{_sample(missing)} ({present} keys under {prefix}*)"
        )
    if shapes is not None:
        conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in[1] != 4:
            raise UnsupportedCheckpoint(
                f"the UNet takes {conv_in[1]} input channels: an inpainting or instruct "
                "model (text-to-image needs 4); only text-to-image checkpoints are supported"
            )
    return family


def has_ema(keys: Iterable[str]) -> bool:
    """Whether the checkpoint carries EMA copies of the UNet (``model_ema.diffusion_model*``)."""
    return any(k.startswith(EMA + "diffusion_model") for k in keys)


def ema_key(unet_key: str) -> str:
    """The EMA copy's name: ``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b``.

    LDM's EMA module stores its shadow weights under the dotted name with the dots removed.
    """
    return EMA + "".join(unet_key.split(".")[1:])


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
            f"have no EMA copy (e.g. {_sample(missing)})"
        )
    for key in unet_keys:
        out[key] = state[ema_key(key)]
    return out


def apply_prediction_type(folder: str | Path, prediction_type: str) -> None:
    """Set an SD 2.x folder's scheduler prediction type and the matching native size."""
    if prediction_type not in PREDICTION_SAMPLE_SIZES:
        raise ValueError(
            f"prediction type {prediction_type!r} is not one of "
            f"{', '.join(PREDICTION_SAMPLE_SIZES)}"
        )
    folder = Path(folder)
    for path, key, value in (
        (folder / "scheduler" / "scheduler_config.json", "prediction_type", prediction_type),
        (folder / "unet" / "config.json", "sample_size", PREDICTION_SAMPLE_SIZES[prediction_type]),
        (
            folder / "vae" / "config.json",
            "sample_size",
            8 * PREDICTION_SAMPLE_SIZES[prediction_type],
        ),
    ):
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# diffusers -> original layout


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
            f"{what} weights with no place in the original layout: {_sample(unknown)} "
            "(not an SD 1.x / 2.x architecture)"
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
            f"text encoder weights with no OpenCLIP name: {_sample(leftover)}"
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


def to_original(
    family: str,
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping,
    text_encoder: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Three diffusers state dicts as one original-layout checkpoint."""
    if family not in TEXT:
        raise ValueError(f"family {family!r} is not one of {', '.join(TEXT)}")
    text = clip_to_original(text_encoder) if family == "sd1" else openclip_to_original(text_encoder)
    out = {UNET + k: v for k, v in unet_to_original(unet, unet_config).items()}
    out |= {VAE + k: v for k, v in vae_to_original(vae, vae_config).items()}
    out |= {TEXT[family] + k: v for k, v in text.items()}
    return out


def add_ema(state: dict[str, torch.Tensor]) -> None:
    """Add ``model_ema.*`` copies of the UNet, as a training checkpoint has them."""
    for key in [k for k in state if k.startswith(UNET)]:
        state[ema_key(key)] = state[key].clone()
    state[EMA + "decay"] = torch.tensor(0.9999)
    state[EMA + "num_updates"] = torch.tensor(0, dtype=torch.int32)


def read_weights(component: str | Path) -> dict[str, torch.Tensor]:
    """One diffusers component folder's safetensors weights (plain, fp16 variant or sharded)."""
    component = Path(component)
    for stem in ("diffusion_pytorch_model", "model"):
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            if (component / name).is_file():
                return _read_files([component / name])
        for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json"):
            if (component / name).is_file():
                index = json.loads((component / name).read_text())
                files = sorted(set(index["weight_map"].values()))
                return _read_files([component / f for f in files])
    raise FileNotFoundError(f"{component} holds no safetensors weights")


def _read_files(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = f.get_tensor(key)
    return state


def family_of_folder(folder: str | Path) -> str:
    """SD 2.x text encoders use GELU (OpenCLIP), SD 1.x's CLIP ViT-L quick GELU."""
    config = json.loads((Path(folder) / "text_encoder" / "config.json").read_text())
    return "sd2" if config.get("hidden_act") == "gelu" else "sd1"


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def save_checkpoint(state: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Write ``state`` to ``out`` through a temporary file, so no half-written file is left."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        save_file(dict(state), str(partial), metadata={"format": "pt"})
        # safetensors creates its files owner-only (0600); a model file is meant to be shared.
        partial.chmod(0o644)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def write_single_file(
    folder: str | Path,
    out: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype = torch.float16,
    ema: bool = False,
) -> Path:
    """Write the diffusers folder ``folder`` as one original-layout ``.safetensors``.

    ``family`` defaults to what the text encoder's config says; ``ema`` adds ``model_ema.*``
    copies of the UNet (equal to it), as training checkpoints carry them.
    """
    folder = Path(folder)
    family = family or family_of_folder(folder)
    state = to_original(
        family,
        read_weights(folder / "unet"),
        json.loads((folder / "unet" / "config.json").read_text()),
        read_weights(folder / "vae"),
        json.loads((folder / "vae" / "config.json").read_text()),
        read_weights(folder / "text_encoder"),
    )
    state = _cast(state, dtype)
    if ema:
        add_ema(state)
    return save_checkpoint(state, out)


# ---------------------------------------------------------------------------------------------
# Test fixtures: the shipped model's SD 2.x-layout twin, and full-size random checkpoints


def tiny_sd2_folder(dest: str | Path, source: str | Path | None = None, seed: int = 0) -> Path:
    """A diffusers folder shaped like SD 2.x around the shipped (or ``source``) UNet and VAE.

    The text encoder is OpenCLIP-like (GELU, padding with ``!``, which is id 0 in the shipped
    one-character-per-token vocabulary as in the real one) with seeded random weights.
    """
    from transformers import CLIPTextModel

    from .architecture import text_encoder_config, tiny, write_text_encoder, write_tokenizer

    source = Path(source) if source else Path(__file__).resolve().parent.parent
    dest = Path(dest)
    for name in ("unet", "vae", "scheduler"):
        shutil.copytree(source / name, dest / name, dirs_exist_ok=True)
    shutil.copy(source / "model_index.json", dest / "model_index.json")
    source_config = json.loads((source / "text_encoder" / "config.json").read_text())
    arch = tiny(source_config["vocab_size"])
    config = text_encoder_config(arch)
    config.hidden_act = "gelu"
    config.pad_token_id = 0
    torch.manual_seed(seed)
    # Stored in float16 like the shipped model's weights, so a float16 file holds them exactly.
    write_text_encoder(CLIPTextModel(config).eval(), dest / "text_encoder", torch.float16)
    write_tokenizer(dest / "tokenizer")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = dest / "tokenizer" / name
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "pad_token": "!"}, indent=2, sort_keys=True)
            + "\n"
        )
    return dest


def miniature_folder(dest: str | Path, family: str, seed: int = 0) -> Path:
    """A few-MB diffusers folder with the family's exact layout: SD's block types and counts,
    attention in the mid blocks and the VAE, SD 2.x's linear projections; narrow channels.

    Built from ``CONFIGS[family]`` (tokenizer, scheduler and all), for tests of key maps that
    the shipped model, which lacks some of those layers, cannot reach.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .architecture import write_text_encoder

    dest = Path(dest)
    shutil.copytree(CONFIGS[family], dest, dirs_exist_ok=True)
    configs = {n: json.loads((dest / n / "config.json").read_text()) for n in ("unet", "vae")}
    unet = {
        **configs["unet"],
        "block_out_channels": [32, 32, 64, 64],
        "attention_head_dim": 4,
        "cross_attention_dim": 32,
        "sample_size": 8,
    }
    vae = {**configs["vae"], "block_out_channels": [32, 32, 32, 32], "sample_size": 64}
    text = json.loads((dest / "text_encoder" / "config.json").read_text())
    text |= {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    text |= {"num_hidden_layers": 2, "projection_dim": 32}
    torch.manual_seed(seed)
    for name, model in (
        ("unet", UNet2DConditionModel.from_config(unet)),
        ("vae", AutoencoderKL.from_config(vae)),
    ):
        model.save_pretrained(dest / name, safe_serialization=True)
    config = CLIPTextConfig(**{k: v for k, v in text.items() if k != "architectures"})
    write_text_encoder(CLIPTextModel(config).eval(), dest / "text_encoder", torch.float32)
    return dest


FIXTURES = {"sd15": "sd1", "sd21-768": "sd2"}


class _Noise:
    """Seeded standard-normal values, fast: slices of one random pool at random offsets.

    Drawing a billion normals one by one takes minutes on a small CPU; copying slices of a
    16M-value pool takes seconds. The pool's odd length keeps rows of a tiled tensor from
    lining up. Timings of a model do not depend on its weights, only their scale matters.
    """

    POOL = 2**24 + 1

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(self.POOL, generator=self.generator)

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        n = math.prod(shape)
        start = int(torch.randint(self.POOL, (1,), generator=self.generator))
        repeats = -(-(start + n) // self.POOL)
        return self.pool.repeat(repeats)[start : start + n].reshape(shape)


def _random_like(shapes: Mapping[str, Sequence[int]], noise: _Noise, dtype) -> dict:
    """Small seeded weights that keep activations finite: norms 1, biases 0, others ~ fan-in."""
    out = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            continue
        if key.endswith("bias") or len(shape) == 0:
            tensor = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 1:  # every 1-D weight here is a normalisation's scale
            tensor = torch.ones(shape, dtype=dtype)
        else:
            std = 0.02 if "embedding" in key else 1 / math.sqrt(math.prod(shape[1:]))
            tensor = (noise(shape) * std).to(dtype)
        out[key] = tensor
    return out


def random_checkpoint(fixture: str, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict:
    """SD 1.5's or SD 2.1's exact architecture with seeded random weights, original layout.

    The modules are built on the meta device (no memory, no init) only for their names and
    shapes. SD 2.x files also get OpenCLIP's 24th layer, which SD 2.x does not use but real
    files carry.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    family = FIXTURES[fixture]
    folder = CONFIGS[family]
    configs = {
        n: json.loads((folder / n / "config.json").read_text())
        for n in ("unet", "vae", "text_encoder")
    }
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    noise = _Noise(seed)
    states = {
        name: _random_like({k: v.shape for k, v in m.state_dict().items()}, noise, dtype)
        for name, m in modules.items()
    }
    state = to_original(
        family,
        states["unet"],
        configs["unet"],
        states["vae"],
        configs["vae"],
        states["text_encoder"],
    )
    if family == "sd2":
        last = configs["text_encoder"]["num_hidden_layers"]  # the layer SD 2.x skips
        src = f"{TEXT['sd2']}transformer.resblocks.{last - 1}."
        extra = {
            k.replace(src, f"{TEXT['sd2']}transformer.resblocks.{last}."): v.shape
            for k, v in state.items()
            if k.startswith(src)
        }
        width = configs["text_encoder"]["hidden_size"]
        extra[TEXT["sd2"] + "text_projection"] = (width, width)
        state |= _random_like(extra, noise, dtype)
    return _cast(state, dtype)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="a diffusers folder as one original-layout file")
    write.add_argument("folder", type=Path)
    write.add_argument("out", type=Path)
    random = commands.add_parser("random", help="a full-size SD checkpoint with random weights")
    random.add_argument("--family", choices=sorted(FIXTURES), required=True)
    random.add_argument("--out", type=Path, required=True)
    random.add_argument("--seed", type=int, default=0)
    for sub in (write, random):
        sub.add_argument("--dtype", choices=("float16", "float32"), default="float16")
        sub.add_argument("--ema", action="store_true", help="add model_ema.* copies of the UNet")
    detect = commands.add_parser("detect", help="say which family a checkpoint is")
    detect.add_argument("file", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.command == "detect":
        with safe_open(str(args.file), framework="pt") as f:
            keys = list(f.keys())
            shapes = {
                k: f.get_slice(k).get_shape()
                for k in keys
                if k.startswith(UNET + "input_blocks.0.")
            }
        try:
            family = detect_family(keys, shapes)
        except UnsupportedCheckpoint as exc:
            raise SystemExit(f"{args.file}: {exc}") from None
        print(
            f"{args.file}: {FAMILY_NAMES[family]} ({family}), "
            f"EMA weights: {'yes' if has_ema(keys) else 'no'}"
        )
        return
    dtype = getattr(torch, args.dtype)
    if args.command == "write":
        out = write_single_file(args.folder, args.out, dtype=dtype, ema=args.ema)
    else:
        state = random_checkpoint(args.family, args.seed, dtype)
        if args.ema:
            add_ema(state)
        out = save_checkpoint(state, args.out)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
