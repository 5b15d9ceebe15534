"""Test fixtures: the shipped model's SD 2.x-layout twin, miniature folders with each family's
exact layout, and full-size checkpoints with seeded random weights (SDXL's tiny serving model
is ``model_tools.tiny_sdxl``)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from model_tools.families import CONFIGS, FAMILIES, SD2

from .key_maps import to_original
from .write import cast

REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_sd2_folder(dest: str | Path, source: str | Path | None = None, seed: int = 0) -> Path:
    """A diffusers folder shaped like SD 2.x around the shipped (or ``source``) UNet and VAE.

    The text encoder is OpenCLIP-like (GELU, padding with ``!``, which is id 0 in the shipped
    one-character-per-token vocabulary as in the real one) with seeded random weights.
    """
    from transformers import CLIPTextModel

    from model_tools.architecture import (
        text_encoder_config,
        tiny,
        write_text_encoder,
        write_tokenizer,
    )

    source = Path(source) if source else REPO_ROOT
    dest = Path(dest)
    for name in ("unet", "vae", "scheduler"):
        shutil.copytree(source / name, dest / name, dirs_exist_ok=True)
    shutil.copy(source / "model_index.json", dest / "model_index.json")
    source_config = json.loads((source / "text_encoder" / "config.json").read_text())
    arch = tiny(source_config["vocab_size"])
    config = text_encoder_config(arch)
    encoder = SD2.text_encoders[0]
    config.hidden_act = encoder.hidden_act
    config.pad_token_id = 0  # "!" in both vocabularies
    torch.manual_seed(seed)
    # Stored in float16 like the shipped model's weights, so a float16 file holds them exactly.
    write_text_encoder(CLIPTextModel(config).eval(), dest / "text_encoder", torch.float16)
    write_tokenizer(dest / "tokenizer")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = dest / "tokenizer" / name
        path.write_text(
            json.dumps(
                {**json.loads(path.read_text()), "pad_token": encoder.pad_token},
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
    return dest


def miniature_folder(dest: str | Path, family: str, seed: int = 0) -> Path:
    """A few-MB diffusers folder with the family's exact layout: its block types and counts,
    attention in the mid blocks and the VAE, SD 2.x's and SDXL's linear projections, SDXL's
    ten-layer transformers and pooled-text embedding; narrow channels.

    Built from ``CONFIGS[family]`` (tokenizers, scheduler and all), for tests of key maps that
    the shipped model, which lacks some of those layers, cannot reach. A family's text encoders
    get different widths (32, 48), as diffusers tells SDXL's two apart by width.
    """
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from model_tools.architecture import write_text_encoder

    dest = Path(dest)
    shutil.copytree(CONFIGS[family], dest, dirs_exist_ok=True)
    configs = {n: json.loads((dest / n / "config.json").read_text()) for n in ("unet", "vae")}
    encoders = FAMILIES[family].text_encoders
    widths = [32 + 16 * i for i in range(len(encoders))]
    levels = len(configs["unet"]["block_out_channels"])
    unet = {
        **configs["unet"],
        "block_out_channels": [32, 32, 64, 64][:levels],
        "attention_head_dim": 4,
        "cross_attention_dim": sum(widths),  # the encoders' hidden states, joined per token
        "sample_size": 8,
    }
    if unet.get("addition_embed_type") == "text_time":  # six size numbers and the pooled text
        unet |= {"addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32}
    vae = {**configs["vae"], "block_out_channels": [32, 32, 32, 32], "sample_size": 64}
    torch.manual_seed(seed)
    for name, model in (
        ("unet", UNet2DConditionModel.from_config(unet)),
        ("vae", AutoencoderKL.from_config(vae)),
    ):
        model.save_pretrained(dest / name, safe_serialization=True)
    for encoder, width in zip(encoders, widths, strict=True):
        text = json.loads((dest / encoder.component / "config.json").read_text())
        text |= {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2}
        text |= {"num_hidden_layers": 2, "projection_dim": 32}
        config = CLIPTextConfig(**{k: v for k, v in text.items() if k != "architectures"})
        model = getattr(transformers, encoder.model_class)(config).eval()
        write_text_encoder(model, dest / encoder.component, torch.float32)
    return dest


# Full-size fixtures (random_checkpoint) by name, and the family of each.
FIXTURES = {"sd15": "sd1", "sd21-768": "sd2", "sdxl-base": "sdxl"}


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
    """SD 1.5's, SD 2.1's or SDXL base's exact architecture with seeded random weights, in the
    original layout.

    The modules are built on the meta device (no memory, no init) only for their names and
    shapes. SD 2.x files also get OpenCLIP's 24th layer, which SD 2.x does not use but real
    files carry. An SDXL one takes 6.9 GB in float16, built in memory: about that much RAM.
    """
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    family = FAMILIES[FIXTURES[fixture]]
    folder = CONFIGS[family.key]
    names = ("unet", "vae", *family.text_components)
    configs = {n: json.loads((folder / n / "config.json").read_text()) for n in names}
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
        }
        for encoder in family.text_encoders:
            text = {k: v for k, v in configs[encoder.component].items() if k != "architectures"}
            model_class = getattr(transformers, encoder.model_class)
            modules[encoder.component] = model_class(CLIPTextConfig(**text))
    noise = _Noise(seed)
    states = {
        name: _random_like({k: v.shape for k, v in m.state_dict().items()}, noise, dtype)
        for name, m in modules.items()
    }
    del modules
    state = to_original(
        family.key,
        states.pop("unet"),
        configs["unet"],
        states.pop("vae"),
        configs["vae"],
        *(states.pop(name) for name in family.text_components),
    )
    if family is SD2:
        last = configs["text_encoder"]["num_hidden_layers"]  # the layer SD 2.x skips
        prefix = SD2.text_encoders[0].prefix
        src = f"{prefix}transformer.resblocks.{last - 1}."
        extra = {
            k.replace(src, f"{prefix}transformer.resblocks.{last}."): v.shape
            for k, v in state.items()
            if k.startswith(src)
        }
        width = configs["text_encoder"]["hidden_size"]
        extra[prefix + "text_projection"] = (width, width)
        state |= _random_like(extra, noise, dtype)
    return cast(state, dtype)
