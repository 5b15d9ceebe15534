"""Single-file Stable Diffusion checkpoints: which family a file is, and writing one.

A single-file checkpoint is the original (CompVis / Stability) layout that A1111 and most model
sites share: one ``.safetensors`` holding ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and the text encoders under their family's prefixes (CLIP ViT-L/14
under ``cond_stage_model.transformer.`` for SD 1.x, OpenCLIP ViT-H under
``cond_stage_model.model.`` with fused q/k/v for SD 2.x, both CLIP ViT-L under
``conditioner.embedders.0.transformer.`` and OpenCLIP ViT-bigG under
``conditioner.embedders.1.model.`` for SDXL; ``model_tools.families`` lists them), sometimes with
``model_ema.*`` copies of the UNet.

Reading such a file is diffusers' job (``StableDiffusionPipeline.from_single_file(path,
config=CONFIGS[family], local_files_only=True)``, ``StableDiffusionXLPipeline`` for SDXL); this
package says which family a file is and refuses what it cannot be, and writes the inverse, which
diffusers does not ship: a diffusers folder back to one original-layout file.

    layout.py     the layout's prefixes, the keys a complete file has, EMA names
    detect.py     which family a file is (or what else), its EMA weights
    key_maps.py   diffusers names -> original names: UNet, VAE, CLIP, OpenCLIP
    write.py      a diffusers folder as one file (read back equal by from_single_file)
    fixtures.py   miniature and full-size random models for tests
    cli.py        python -m model_tools.single_file write | random | detect
"""

from model_tools.families import CONFIGS

from .detect import detect_family, has_ema, select_unet_weights
from .fixtures import FIXTURES, miniature_folder, random_checkpoint, tiny_sd2_folder
from .key_maps import (
    clip_to_original,
    openclip_to_original,
    text_state,
    to_original,
    unet_to_original,
    vae_to_original,
)
from .layout import EMA, EMA_DEFAULT, UNET, VAE, UnsupportedCheckpoint, ema_key
from .write import (
    add_ema,
    apply_prediction_type,
    family_of_folder,
    read_weights,
    save_checkpoint,
    write_single_file,
)

__all__ = [
    "CONFIGS",
    "EMA",
    "EMA_DEFAULT",
    "FIXTURES",
    "UNET",
    "VAE",
    "UnsupportedCheckpoint",
    "add_ema",
    "apply_prediction_type",
    "clip_to_original",
    "detect_family",
    "ema_key",
    "family_of_folder",
    "has_ema",
    "miniature_folder",
    "openclip_to_original",
    "random_checkpoint",
    "read_weights",
    "save_checkpoint",
    "select_unet_weights",
    "text_state",
    "tiny_sd2_folder",
    "to_original",
    "unet_to_original",
    "vae_to_original",
    "write_single_file",
]
