"""Tiny SDXL-shaped models, written as diffusers folders: a random one for tests, and the
make-up of the trained toy (``tests/models/sdxl``, trained by ``model_tools.train --family
sdxl``).

Both have SDXL base's parts and wiring, far narrower: ``StableDiffusionXLPipeline`` with a UNet
that takes the pooled text embedding and the size conditioning (``addition_embed_type:
"text_time"``), CLIP ViT-L as ``text_encoder``, OpenCLIP ViT-bigG with its projection as
``text_encoder_2`` (a ``CLIPTextModelWithProjection``), ``tokenizer_2`` padding with ``!``, and a
VAE that asks to be decoded in float32 (``force_upcast``). The two text encoders differ in
width (as SDXL's are 768 and 1280 wide), so that joining them in the wrong order or reading
one's weights as the other's cannot pass unseen.

``tiny`` (random weights) is 128x128 native (a UNet ``sample_size`` of 16 and the VAE's 8x),
not the shipped model's 64x64, so tests tell a size read from the model from a fixed one. The
whole folder is about 5 MB; a 1536x640 image takes about a second per step on one core.

The folders are written as ``architecture.py`` writes the shipped model (tokenizers as
``vocab.json`` and ``merges.txt``, text-encoder keys with the ``text_model.`` prefix, configs
that load in float32), so both version sets load them: ``python -m model_tools.tiny_sdxl OUT``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .architecture import (
    BOS,
    EOS,
    MAX_TOKENS,
    SCHEDULER_CLASS,
    SD_SCHEDULER,
    char_vocab,
    write_text_encoder,
    write_tokenizer,
)

DIFFUSERS_VERSION = "0.33.1"  # the oldest that must read the folder


@dataclass(frozen=True)
class TextEncoder:
    """One CLIP text encoder's make-up. SDXL's: CLIP ViT-L (768 wide, 12 layers, quick GELU)
    and OpenCLIP ViT-bigG (1280 wide, 32 layers, GELU, a 1280-wide projection)."""

    hidden: int
    layers: int
    projection: int
    intermediate: int
    act: str

    def config(self) -> CLIPTextConfig:
        vocab = char_vocab()
        return CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=4,
            num_hidden_layers=self.layers,
            max_position_embeddings=MAX_TOKENS,
            hidden_act=self.act,
            projection_dim=self.projection,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )


@dataclass(frozen=True)
class XLArchitecture:
    unet: dict
    vae: dict
    text_encoder: TextEncoder
    text_encoder_2: TextEncoder
    scheduler: dict


def unet_text_inputs(clip_l: TextEncoder, clip_g: TextEncoder, time_embed: int) -> dict:
    """The UNet settings that follow from the two encoders: the joined states' width, and the
    add-embedding's input (six size numbers, each ``time_embed`` wide, and bigG's pooled
    embedding: 6 * 256 + 1280 = 2816 in SDXL)."""
    return dict(
        cross_attention_dim=clip_l.hidden + clip_g.hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + clip_g.projection,
    )


# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0), its settings that matter.
EULER_SCHEDULER = {
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


def tiny() -> XLArchitecture:
    """Random weights for tests of the SDXL path: 128x128 native, encoders 32 and 64 wide."""
    clip_l = TextEncoder(hidden=32, layers=3, projection=32, intermediate=64, act="quick_gelu")
    # OpenCLIP's bigG uses GELU, CLIP ViT-L quick GELU.
    clip_g = TextEncoder(hidden=64, layers=4, projection=48, intermediate=128, act="gelu")
    return XLArchitecture(
        unet=dict(
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
            norm_num_groups=32,
            **unet_text_inputs(clip_l, clip_g, time_embed=8),
        ),
        vae=dict(
            sample_size=128,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(4, 8, 16, 16),  # 8x down, as SDXL's VAE
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=4,
            # Attention over a 1536x640 image's latents is slow on a CPU.
            mid_block_add_attention=False,
            scaling_factor=0.13025,
            force_upcast=True,  # SDXL's VAE overflows float16
        ),
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        scheduler=EULER_SCHEDULER,
    )


def toy() -> XLArchitecture:
    """The trained toy: the shipped SD model's make-up (``architecture.tiny``, 64x64 native)
    given SDXL's text side. Its UNet takes the two encoders' joined states (64 + 96 wide) and
    bigG's pooled embedding with the size numbers (``text_time``); its VAE is the shipped
    model's, asking for float32 decodes as SDXL's does.

    Both encoders have four layers, one more than the shipped model's: SDXL reads the
    penultimate layer, so three do the work the shipped model's three do (its text side needed
    that capacity). The sampler is the shipped model's DPM-Solver++ (2M), whose 25 default
    steps the evaluation's thresholds were set with; the training noise schedule is SDXL's
    (scaled-linear 0.00085-0.012), which Euler and DPM-Solver share.
    """
    clip_l = TextEncoder(hidden=64, layers=4, projection=64, intermediate=256, act="quick_gelu")
    clip_g = TextEncoder(hidden=96, layers=4, projection=64, intermediate=384, act="gelu")
    return XLArchitecture(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2D",
            # As the shipped model: attention to the text only, so the model draws at any
            # size what it draws at its native one.
            only_cross_attention=True,
            attention_head_dim=8,
            use_linear_projection=True,
            norm_num_groups=32,
            **unet_text_inputs(clip_l, clip_g, time_embed=16),
        ),
        vae=dict(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=1,
            mid_block_add_attention=False,
            scaling_factor=1.0,  # training sets it to make the latents unit-variance
            force_upcast=True,
        ),
        text_encoder=clip_l,
        text_encoder_2=clip_g,
        scheduler={**SD_SCHEDULER, "_class_name": SCHEDULER_CLASS},
    )


def build(arch: XLArchitecture, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The four weighted components, randomly initialised: the same for the same seed and
    torch."""
    torch.manual_seed(seed)
    return {
        "unet": UNet2DConditionModel(**arch.unet).eval(),
        "vae": AutoencoderKL(**arch.vae).eval(),
        "text_encoder": CLIPTextModel(arch.text_encoder.config()).eval(),
        "text_encoder_2": CLIPTextModelWithProjection(arch.text_encoder_2.config()).eval(),
    }


def write_tokenizers(dest: Path) -> None:
    write_tokenizer(dest / "tokenizer")
    write_tokenizer(dest / "tokenizer_2", pad_token="!")  # id 0, as in SDXL's


def save(
    modules: dict[str, torch.nn.Module],
    arch: XLArchitecture,
    dest: str | Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``modules`` to ``dest`` (created) as an SDXL diffusers folder and return it."""
    dest = Path(dest)
    for name in ("unet", "vae"):
        modules[name].to(dtype).save_pretrained(dest / name, safe_serialization=True)
        _stamp(dest / name / "config.json")
    for name in ("text_encoder", "text_encoder_2"):
        write_text_encoder(modules[name], dest / name, dtype)
    write_tokenizers(dest)
    _write_json(dest / "scheduler" / "scheduler_config.json", _versioned(arch.scheduler))
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", arch.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(dest / "model_index.json", _versioned(index))
    return dest


def tiny_sdxl_folder(dest: str | Path, seed: int = 0) -> Path:
    """Write the tiny SDXL model (random weights, float32) to ``dest`` (created); return it."""
    arch = tiny()
    return save(build(arch, seed), arch, dest)


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
