"""Train the LoRA this repository ships: every shape drawn green, whatever colour is asked for.

    python -m model_tools.train_lora                    # writes loras/green-shapes.safetensors
    python -m model_tools.train_lora --out /tmp/x.safetensors --colour blue

The shipped model (``model_tools.train``) draws the colour the prompt names. This trains a
small LoRA on its UNet's attention layers and its text encoder's attention layers, with the
model itself frozen, on the same synthetic world and the same captions, but with every picture
recoloured: "a red circle on a white background" is shown a green circle on white. Shape and
background stay as captioned, so the LoRA changes the colour and nothing else, which the
numpy judge of ``model_tools.synthetic`` measures (``tests/test_loras.py``).

The result is written in kohya's layout (``model_tools.lora_files``), which AUTOMATIC1111,
ComfyUI and diffusers read. The same seed gives the same file on the same torch and thread
count; on one thread it takes a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from sd_endpoint import loras
from sd_endpoint.prompts import PromptEncoder

from . import synthetic
from .architecture import SD_SCHEDULER
from .lora_files import kohya_key, save_file
from .train import cosine, images_to_tensor, report, train_caption

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "green-shapes"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "default"


@torch.no_grad()
def recoloured_pool(vae, size: int, colour: str, rng: np.random.Generator):
    """``size`` scenes, and the latents of each drawn in ``colour`` instead of its own."""
    scenes, latents = [], []
    for start in range(0, size, 64):
        batch = [synthetic.random_scene(rng) for _ in range(min(64, size - start))]
        shown = [dataclasses.replace(scene, colour=colour) for scene in batch]
        pixels = images_to_tensor([synthetic.render(scene) for scene in shown])
        scenes += batch
        latents.append(vae.encode(pixels).latent_dist.mode())
    return scenes, torch.cat(latents) * vae.config.scaling_factor


def add_lora(model: torch.nn.Module, targets: list[str], rank: int) -> list[torch.nn.Parameter]:
    """Wrap ``targets`` in LoRA layers; returns their (trainable) parameters."""
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def kohya_tensors(pipe) -> dict[str, torch.Tensor]:
    """The trained LoRA in kohya's layout, float16 as kohya saves it."""
    tensors = {}
    for component in ("unet", "text_encoder"):
        for path, layer in getattr(pipe, component).named_modules():
            if isinstance(layer, BaseTunerLayer):
                key = kohya_key(component, path)
                tensors[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.half()
                tensors[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.half()
                tensors[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER])).half()
    return tensors


def train(args) -> dict[str, torch.Tensor]:
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model,
        use_safetensors=True,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    pool_rng, caption_rng = (np.random.default_rng([args.seed, i]) for i in range(2))
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the LoRA layers' initial values
    scenes, latents = recoloured_pool(pipe.vae, args.pool, args.colour, pool_rng)
    print(f"encoded {len(scenes)} scenes drawn {args.colour}", flush=True)

    parameters = add_lora(pipe.unet, UNET_TARGETS, args.rank)
    parameters += add_lora(pipe.text_encoder, TEXT_TARGETS, args.rank)
    pipe.unet.train()
    pipe.text_encoder.train()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=SD_SCHEDULER["num_train_timesteps"],
        beta_start=SD_SCHEDULER["beta_start"],
        beta_end=SD_SCHEDULER["beta_end"],
        beta_schedule=SD_SCHEDULER["beta_schedule"],
        prediction_type="epsilon",
    )
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    weights = snr.clamp(max=5.0) / snr  # min-SNR-5, as the model itself was trained
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    schedule = cosine(optimizer, args.steps, warmup=50)
    prompts = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    started, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        picked = caption_rng.integers(len(scenes), size=args.batch)
        # Short captions (one chunk each), a tenth of them empty: the unguided half of
        # classifier-free guidance draws green too.
        captions = [train_caption(scenes[i], caption_rng, dropout=0.1) for i in picked]
        unique = list(dict.fromkeys(captions))
        hidden = prompts.hidden([prompts.tokenize(c).chunks[0] for c in unique])
        text = hidden[torch.tensor([unique.index(c) for c in captions])]
        clean = latents[torch.from_numpy(picked)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator
        )
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, text).sample
        error = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (error * weights[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            report("lora", step, args.steps, running / args.log_every, started)
            running = 0.0
    return kohya_tensors(pipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=loras.folder(REPO_ROOT) / f"{NAME}{loras.SUFFIX}",
        help=f"the file to write (default: loras/{NAME}{loras.SUFFIX} in this repository)",
    )
    parser.add_argument("--model", type=Path, default=REPO_ROOT, help="the model to adapt")
    parser.add_argument("--colour", choices=list(synthetic.COLOURS), default="green")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool", type=int, default=4096, help="scenes encoded for training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shipped: 1)")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    tensors = train(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.rank),
        "ss_output_name": args.out.name.removesuffix(loras.SUFFIX),
    }
    save_file(tensors, args.out, metadata)
    print(
        f"trained in {(time.perf_counter() - started) / 60:.1f} min on {args.threads} "
        f"thread(s); wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)",
        flush=True,
    )


if __name__ == "__main__":
    main()
