"""Train a toy model on the synthetic world of ``model_tools.synthetic``.

    python -m model_tools.train                  # the shipped SD model, into the repo root
    python -m model_tools.train --out /tmp/m     # anywhere else
    python -m model_tools.train --family sdxl    # the SDXL toy, into tests/models/sdxl

Two stages, both on freshly rendered pictures: the VAE learns to reconstruct them, then the
text encoder and the UNet learn to denoise their latents given the caption (epsilon
prediction on Stable Diffusion's own scaled-linear noise schedule, so the shipped
DPM-Solver++ sampler fits).

A share of captions is dropped to "" so that classifier-free guidance has an unconditional
model to push from (the SDXL toy also drops its pooled text embedding alone from a share of
the others, ``--pooled-dropout``: ``model_tools.toys.XLText``), and about a third name only
some attributes ("a red shape", "a circle on a black background", "red") so that a one-word
negative prompt means something. A share of the captions (``--long-captions``) is padded
with filler ("highly detailed, sharp focus, ...") before, after or around the key words, past
the 75-token boundary, and every caption is encoded by the endpoint's own chunked encoder for
the family (``model_tools.toys``): the model learns to find what is asked for in any chunk of
a long prompt. What differs by family (the
make-up, the text encoders, the UNet's text inputs) comes from ``model_tools.toys``; the loop
is the same.

The same seed gives the same weights on the same torch and thread count.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from . import synthetic
from .architecture import SD_SCHEDULER
from .toys import TOYS

# Options of some toys' text sides only, each toy's own in ``Toy.text_options``.
TEXT_OPTIONS = tuple(dict.fromkeys(name for toy in TOYS.values() for name in toy.text_options))


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 pictures as the VAE's input: NCHW floats in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1


def scene_batch(rng: np.random.Generator, size: int) -> list[synthetic.Scene]:
    return [synthetic.random_scene(rng) for _ in range(size)]


def random_crop(image: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    # The VAE is all convolutions, so crops teach it the same thing at a fraction of the cost.
    y, x = rng.integers(image.shape[0] - side + 1), rng.integers(image.shape[1] - side + 1)
    return image[y : y + side, x : x + side]


def train_caption(
    scene: synthetic.Scene, rng: np.random.Generator, dropout: float, long: float = 0.0
) -> str:
    """The caption the text side sees for ``scene`` in training: a share ``dropout`` is "",
    and the rest keep one mix whatever that share (at the default 0.1, 5% of all captions
    are a bare colour word, 55% whole captions, 30% partial ones); a share ``long`` of the
    non-empty ones is padded with filler past the 75-token chunk boundary."""
    draw = rng.random()
    if draw < dropout:
        return ""
    kept = (draw - dropout) / (1 - dropout)  # uniform on [0, 1), as draw was
    if kept < 0.05 / 0.9:
        text = scene.colour  # a bare colour word, as users write negative prompts
    elif kept < 0.6 / 0.9:
        text = scene.caption
    else:
        keep = [False] * 3
        while not any(keep):
            keep = list(rng.random(3) < 0.5)
        text = synthetic.caption(
            scene.colour if keep[0] else None,
            scene.shape if keep[1] else None,
            scene.background if keep[2] else None,
        )
    return synthetic.long_caption(text, rng) if rng.random() < long else text


def train_vae(vae, args, rng: np.random.Generator) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = cosine(optimizer, args.vae_steps, warmup=50)
    started, running = time.perf_counter(), 0.0
    for step in range(1, args.vae_steps + 1):
        pixels = images_to_tensor(
            [
                random_crop(synthetic.render(s), args.vae_crop, rng)
                for s in scene_batch(rng, args.vae_batch)
            ]
        )
        posterior = vae.encode(pixels).latent_dist
        # The mean is decoded: the diffusion model is trained on means and sampling noise
        # only slowed the VAE down here (a near-zero KL weight leaves it unused anyway).
        reconstruction = vae.decode(posterior.mode()).sample
        # Flat colours: an L1 term keeps edges sharp where MSE alone would blur them.
        loss = (
            F.mse_loss(reconstruction, pixels)
            + 0.5 * F.l1_loss(reconstruction, pixels)
            + args.kl_weight * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % args.log_every == 0 or step == args.vae_steps:
            report("vae", step, args.vae_steps, running / args.log_every, started)
            running = 0.0
    vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_accuracy(vae, rng: np.random.Generator, count: int = 64) -> float:
    """Share of pictures whose VAE round trip still measures as their scene."""
    scenes = scene_batch(rng, count)
    pixels = images_to_tensor([synthetic.render(s) for s in scenes])
    decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    images = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    right = 0
    for scene, image in zip(scenes, images, strict=True):
        m = synthetic.measure(image)
        right += (m.background, m.colour, m.shape) == (scene.background, scene.colour, scene.shape)
    return right / count


@torch.no_grad()
def encode_pool(vae, size: int, rng: np.random.Generator):
    """Render and encode ``size`` scenes once: encoding costs more than a UNet step, and
    drawing from this pool for every step loses nothing in a world this small."""
    scenes, latents = [], []
    for start in range(0, size, 64):
        batch = scene_batch(rng, min(64, size - start))
        pixels = images_to_tensor([synthetic.render(s) for s in batch])
        scenes += batch
        latents.append(vae.encode(pixels).latent_dist.mode())
    return scenes, torch.cat(latents)


def latent_scale(latents: torch.Tensor) -> float:
    """1 / std of the latents, to 4 significant digits: the VAE's ``scaling_factor``."""
    return float(f"{1 / latents.std().item():.4g}")


def train_denoiser(unet, text_side, pool, scale, args, rng, generator) -> dict:
    """Train the UNet and the text side's encoders together; returns their exponential moving
    averages, by component name."""
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=SD_SCHEDULER["num_train_timesteps"],
        beta_start=SD_SCHEDULER["beta_start"],
        beta_end=SD_SCHEDULER["beta_end"],
        beta_schedule=SD_SCHEDULER["beta_schedule"],
        prediction_type="epsilon",
    )
    scenes, latents = pool
    # Min-SNR-5 weighting (Hang et al., 2023): the nearly clean timesteps, which only polish
    # edges, stop crowding out the noisy ones where the prompt decides colour and shape.
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    weights = snr.clamp(max=5.0) / snr
    latents = latents * scale
    modules = torch.nn.ModuleDict(
        {"unet": unet.train(), **{name: m.train() for name, m in text_side.modules.items()}}
    )
    average = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = cosine(optimizer, args.unet_steps, warmup=200)

    started, running = time.perf_counter(), 0.0
    for step in range(1, args.unet_steps + 1):
        picked = rng.integers(len(scenes), size=args.batch)
        captions = [
            train_caption(scenes[i], rng, args.caption_dropout, args.long_captions) for i in picked
        ]
        clean = latents[torch.from_numpy(picked)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator
        )
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        # The endpoint's own encoder, so training sees the chunks it serves: 77-token chunks
        # of [bos] + 75 tokens + [eos], one after the other.
        text, mask, extra = text_side.embed(captions, rng)
        # The UNet's first attention layers attend to the text too (only_cross_attention), so
        # the mask goes to both.
        prediction = unet(
            noisy, timesteps, text, attention_mask=mask, encoder_attention_mask=mask, **extra
        ).sample
        error = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (error * weights[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        # Averaging starts slow so the early, random weights wash out of the average.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(average.parameters(), modules.parameters(), strict=True):
                kept.lerp_(live, 1 - decay)
        running += loss.item()
        if step % args.log_every == 0 or step == args.unet_steps:
            report("unet", step, args.unet_steps, running / args.log_every, started)
            running = 0.0
    return dict(average.items())


def cosine(optimizer, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def report(stage: str, step: int, steps: int, loss: float, started: float) -> None:
    elapsed = time.perf_counter() - started
    print(f"{stage} step {step}/{steps} loss {loss:.4f} {elapsed:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TOYS), default="sd", help="which toy to train")
    parser.add_argument(
        "--out",
        type=Path,
        help="model folder to write (default: the repo root for sd, tests/models/sdxl for sdxl)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-crop", type=int, default=32, help="side of the VAE's crops")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=16384, help="scenes encoded for the UNet")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument(
        "--caption-dropout",
        type=float,
        default=0.1,
        help='share of captions replaced by "" (default 0.1; the SDXL toy 0.4)',
    )
    parser.add_argument(
        "--long-captions",
        type=float,
        default=0.25,
        help="share of non-empty captions padded with filler past the 75-token chunk boundary",
    )
    parser.add_argument(
        "--pooled-dropout",
        type=float,
        help="SDXL toy: share of the kept captions whose pooled embedding alone is zeroed "
        "(default 0.3)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; the shipped weights were trained with 1",
    )
    parser.add_argument("--log-every", type=int, default=100)
    # Each toy's own defaults (its step counts, the SDXL toy's dropouts), then what the
    # command line says.
    parser.set_defaults(**TOYS[parser.parse_known_args()[0].family].training)
    args = parser.parse_args()
    toy = TOYS[args.family]
    text_options = {n: getattr(args, n) for n in TEXT_OPTIONS if getattr(args, n) is not None}
    for name in text_options.keys() - set(toy.text_options):
        parser.error(f"--{name.replace('_', '-')}: the {args.family} toy has no such option")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Separate streams, so changing one stage's length leaves the other stage's data alone.
    vae_rng, pool_rng, unet_rng = (np.random.default_rng([args.seed, i]) for i in range(3))
    generator = torch.Generator().manual_seed(args.seed)

    out = args.out or toy.folder
    arch = toy.architecture()
    modules = toy.build(arch, args.seed)
    text_side = toy.text_side(modules, out, **text_options)  # writes the tokenizers into `out`

    started = time.perf_counter()
    train_vae(modules["vae"], args, vae_rng)
    vae_done = time.perf_counter()
    accuracy = reconstruction_accuracy(modules["vae"], np.random.default_rng([args.seed, 9]))
    print(f"VAE round trips measured right: {accuracy:.0%}", flush=True)
    pool = encode_pool(modules["vae"], args.pool, pool_rng)
    scale = latent_scale(pool[1])
    modules["vae"].register_to_config(scaling_factor=scale)
    print(f"encoded {args.pool} scenes; latent scaling factor {scale}", flush=True)
    modules.update(
        train_denoiser(modules["unet"], text_side, pool, scale, args, unet_rng, generator)
    )
    done = time.perf_counter()
    toy.save({k: m.eval() for k, m in modules.items()}, arch, out, torch.float16)
    print(
        f"trained in {(done - started) / 60:.1f} min (VAE {(vae_done - started) / 60:.1f}, "
        f"UNet + text encoders {(done - vae_done) / 60:.1f}) on {args.threads} thread(s); "
        f"wrote {out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
