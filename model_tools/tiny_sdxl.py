"""A tiny SDXL-shaped model with random weights, written as a diffusers folder for tests.

It has SDXL base's parts and wiring, far narrower: ``StableDiffusionXLPipeline`` with a UNet
that takes the pooled text embedding and the size conditioning (``addition_embed_type:
"text_time"``), CLIP ViT-L as ``text_encoder``, OpenCLIP ViT-bigG with its projection as
``text_encoder_2`` (a ``CLIPTextModelWithProjection``), ``tokenizer_2`` padding with ``!``, a
VAE that asks to be decoded in float32 (``force_upcast``) and SDXL's Euler scheduler. The two
text encoders differ in width (32 and 64, as SDXL's are 768 and 1280) and depth, so that
joining them in the wrong order or reading one's weights as the other's cannot pass unseen.

Its native size is 128x128 (a UNet ``sample_size`` of 16 and the VAE's 8x), not the shipped
model's 64x64, so tests tell a size read from the model from a fixed one. The whole folder is
about 5 MB; a 1536x640 image takes about a second per step on one core.

The folder is written as ``architecture.py`` writes the shipped model (tokenizers as
``vocab.json`` and ``merges.txt``, text-encoder keys with the ``text_model.`` prefix, float32
weights), so both version sets load it: ``python -m model_tools.tiny_sdxl OUT``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .architecture import BOS, EOS, MAX_TOKENS, char_vocab, write_text_encoder, write_tokenizer

DIFFUSERS_VERSION = "0.33.1"  # the oldest that must read the folder
TIME_EMBED = 8  # per size-conditioning number; SDXL's is 256
# (hidden size, layers, projection); SDXL's are (768, 12, 768) and (1280, 32, 1280).
CLIP_L = (32, 3, 32)
CLIP_G = (64, 4, 48)

UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=1,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    cross_attention_dim=CLIP_L[0] + CLIP_G[0],  # the two encoders' states, joined per token
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    # Six size numbers (original size, crop top-left, target size) and bigG's pooled embedding.
    projection_class_embeddings_input_dim=6 * TIME_EMBED + CLIP_G[2],
    norm_num_groups=32,
)
VAE = dict(
    sample_size=128,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(4, 8, 16, 16),  # 8x down, as SDXL's VAE
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    mid_block_add_attention=False,  # attention over a 1536x640 image's latents is slow on a CPU
    scaling_factor=0.13025,
    force_upcast=True,  # SDXL's VAE overflows float16
)
# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0), its settings that matter.
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def text_config(hidden: int, layers: int, projection: int, act: str) -> CLIPTextConfig:
    vocab = char_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def build(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The four weighted components, randomly initialised: the same for the same seed and
    torch."""
    torch.manual_seed(seed)
    return {
        "unet": UNet2DConditionModel(**UNET).eval(),
        "vae": AutoencoderKL(**VAE).eval(),
        "text_encoder": CLIPTextModel(text_config(*CLIP_L, act="quick_gelu")).eval(),
        # OpenCLIP's bigG uses GELU, CLIP ViT-L quick GELU.
        "text_encoder_2": CLIPTextModelWithProjection(text_config(*CLIP_G, act="gelu")).eval(),
    }


def tiny_sdxl_folder(dest: str | Path, seed: int = 0) -> Path:
    """Write the tiny SDXL model to ``dest`` (created) and return it."""
    dest = Path(dest)
    modules = build(seed)
    for name in ("unet", "vae"):
        modules[name].save_pretrained(dest / name, safe_serialization=True)
        _stamp(dest / name / "config.json")
    for name in ("text_encoder", "text_encoder_2"):
        write_text_encoder(modules[name], dest / name, torch.float32)
    write_tokenizer(dest / "tokenizer")
    write_tokenizer(dest / "tokenizer_2", pad_token="!")  # id 0, as in SDXL's
    _write_json(dest / "scheduler" / "scheduler_config.json", _versioned(SCHEDULER))
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", SCHEDULER["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(dest / "model_index.json", _versioned(index))
    return dest


def _versioned(config: dict) -> dict:
    return {**config, "_diffusers_version": DIFFUSERS_VERSION}


def _stamp(config_file: Path) -> None:
    """Keep the file the same whichever diffusers wrote it (each stamps its own version)."""
    config = json.loads(config_file.read_text())
    config.pop("_diffusers_version", None)
    _write_json(config_file, _versioned(config))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(tiny_sdxl_folder(args.out, args.seed))


if __name__ == "__main__":
    main()
