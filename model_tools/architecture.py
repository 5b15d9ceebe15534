"""Stable Diffusion 1.5 shaped components, and writing them as a classic diffusers folder.

Two sizes share one code path:

* ``tiny``: the few-MB model this repo ships (same classes as SD 1.5, far smaller).
* ``sd15``: the real SD 1.5 UNet / VAE / CLIP-L configs with random weights, for speed work.
  Its timings are those of real SD 1.5 because compute depends on shapes, not on weights.

The folder is written so that both the endpoint base image's stack (transformers 4.51,
diffusers 0.33) and the newest releases load it completely. transformers 5.x would otherwise
write the tokenizer only as ``tokenizer.json`` and (from 5.6) drop the ``text_model.`` key
prefix, both of which 4.51 cannot read; so the text side is written by hand here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2, CLIP) uses for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def char_vocab() -> dict[str, int]:
    """A CLIP vocabulary with no merges: every word is spelled one character per token.

    It works offline (no 49k-entry vocabulary to download) and loads in the stock
    ``CLIPTokenizer`` of every transformers version.
    """
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


@dataclass(frozen=True)
class Architecture:
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict


# DPM-Solver++ (2M): the sampler that does best at the default 25 steps.
SCHEDULER_CLASS = "DPMSolverMultistepScheduler"
SD_SCHEDULER = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def tiny(vocab_size: int) -> Architecture:
    """The shipped model: 64x64 native, VAE 8x down, UNet levels of 64 and 128 channels.

    Nothing attends across image positions: the UNet's attention layers attend to the text
    only (``only_cross_attention``, a mid block without attention) and the VAE has no
    mid-block attention. Self-attention trained over the 4x4 coarse grid of a 64x64 image
    spreads thin over the 32x32 grid of a 512x512 one; without it the model draws at any size
    what it draws at 64x64, and a 512x512 UNet pass costs about 0.7x of the self-attending
    version on 2 cores.

    The text reaches the UNet only through cross-attention, as in SD 1.5. An earlier version
    also added a pooled text embedding to the timestep embedding (SDXL's ``addition_embed_type
    = "text"``); that model followed its prompts as well without guidance as with it (97% vs
    97% all right), so classifier-free guidance had nothing to add. Without it: 86% unguided,
    99% at guidance 7.5 on short captions; 75% vs 90% once trained on long ones too
    (``python -m model_tools.evaluate``).
    """
    return Architecture(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2D",
            only_cross_attention=True,
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            # Flat colours need few channels at full resolution, where a 512x512 decode
            # spends most of its time.
            block_out_channels=(16, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            # One group: normalising small channel groups separately scrambled flat colours
            # (red on white came back orange after 1,200 steps; with one group every colour
            # came back within a few levels after as many).
            norm_num_groups=1,
            mid_block_add_attention=False,
            scaling_factor=1.0,  # training sets it to make the latents unit-variance
        ),
        text_encoder=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=64,
        ),
        scheduler=SD_SCHEDULER,
    )


def sd15(vocab_size: int) -> Architecture:
    """Stable Diffusion 1.5's own component configs (CompVis/stable-diffusion-v1-5)."""
    return Architecture(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            sample_size=512,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            norm_num_groups=32,
            scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=vocab_size,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        scheduler=SD_SCHEDULER,
    )


ARCHITECTURES = {"tiny": tiny, "sd15": sd15}


def text_encoder_config(arch: Architecture) -> CLIPTextConfig:
    vocab = char_vocab()
    return CLIPTextConfig(
        **arch.text_encoder,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def build(arch: Architecture, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Randomly initialised modules, identical for the same seed on the same torch."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet)
    vae = AutoencoderKL(**arch.vae)
    text_encoder = CLIPTextModel(text_encoder_config(arch))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    """The one-character-per-token CLIP tokenizer; SD 2.x's and SDXL's second pad with "!"."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", char_vocab())
    (folder / "merges.txt").write_text("#version: 0.2\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **specials,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_TOKENS,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
        },
    )


def write_text_encoder(model: CLIPTextModel, folder: Path, dtype: torch.dtype) -> None:
    """Weights with the ``text_model.`` prefix and a config that transformers 4.x and 5.x read.

    ``model`` is a ``CLIPTextModel`` or (SDXL's second encoder) a
    ``CLIPTextModelWithProjection``, whose ``text_projection`` sits beside ``text_model``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        if "position_ids" in key:  # a buffer, rebuilt at load time
            continue
        key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        state[key] = tensor.detach().to(dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    _write_json(
        folder / "config.json",
        {
            "architectures": [type(model).__name__],
            "model_type": "clip_text_model",
            **{k: getattr(config, k) for k in model_config_keys()},
            # The dtype to load in, not the one stored: transformers 5 loads a model in its
            # config's dtype, and a float16 text encoder next to diffusers' float32 UNet fails
            # a plain `from_pretrained(repo)` ("mat1 and mat2 must have the same dtype").
            # SD repos on the Hub say float32 beside their float16 files too.
            "torch_dtype": "float32",
        },
    )


def model_config_keys() -> tuple[str, ...]:
    return (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "projection_dim",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "attention_dropout",
        "initializer_range",
        "initializer_factor",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )


def save(
    modules: dict[str, torch.nn.Module],
    arch: Architecture,
    out: Path,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``modules`` to ``out`` in the layout of a Stable Diffusion repo on the Hub."""
    out = Path(out)
    modules["unet"].to(dtype).save_pretrained(out / "unet", safe_serialization=True)
    modules["vae"].to(dtype).save_pretrained(out / "vae", safe_serialization=True)
    for name in ("unet", "vae"):  # keep a stable file: diffusers stamps its own version in
        config = json.loads((out / name / "config.json").read_text())
        config.pop("_diffusers_version", None)
        _write_json(out / name / "config.json", {**config, "_diffusers_version": "0.33.1"})
    write_text_encoder(modules["text_encoder"], out / "text_encoder", dtype)
    write_tokenizer(out / "tokenizer")
    # Only the settings that matter: each diffusers version fills in its own defaults.
    _write_json(
        out / "scheduler" / "scheduler_config.json",
        {**arch.scheduler, "_class_name": SCHEDULER_CLASS, "_diffusers_version": "0.33.1"},
    )
    _write_json(
        out / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.33.1",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", SCHEDULER_CLASS],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
