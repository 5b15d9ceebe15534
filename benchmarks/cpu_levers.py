"""Each CPU speed lever on each stage of a full-size request, one configuration per process.

    flock /tmp/heavy.lock .venv/bin/python -m benchmarks.cpu_levers              # 512x512
    .venv/bin/python -m benchmarks.cpu_levers --configs bf16-cl,bf16-cl-frozen --size 256

The stages of one guided request, timed apart on SD 1.5's exact architecture (random weights,
model_tools.build --arch sd15): the text encoder (a batch of 2: prompt and negative prompt),
one UNet call (a batch of 2, as classifier-free guidance makes every step) and the VAE decode
of one image (the engine's own ``latents_to_pixels``). Each configuration loads the modules
fresh in a process of its own, applies its levers the way the engine does
(``sd_endpoint.acceleration``), runs every stage once (a compiled one compiles then, and that
first call is reported as its compile time) and reports the fastest of ``--repeats`` calls
(other work on the machine only ever adds time) beside their median. Resident memory is read
once the modules are loaded and again at the end: the difference is what compiling kept (frozen
weights are a second, pre-packed copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import SD15_DEFAULT_DIR, ensure_sd15, rss, run_child, table

# name: (dtype, channels-last, torch.compile mode or None). Freezing is part of compiling on a
# CPU (acceleration.compile_arguments); "-unfrozen" compiles without it, to show its share.
CONFIGS = {
    "fp32": ("float32", False, None),
    "fp32-cl": ("float32", True, None),
    "bf16": ("bfloat16", False, None),
    "bf16-cl": ("bfloat16", True, None),
    "bf16-cl-unfrozen": ("bfloat16", True, "unfrozen"),
    "bf16-frozen": ("bfloat16", False, "default"),
    "bf16-cl-frozen": ("bfloat16", True, "default"),
}
STAGES = ("text_encoder", "unet", "vae_decode")


def child(model: Path, config: str, size: int, repeats: int, threads: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sd_endpoint.acceleration import compile_arguments
    from sd_endpoint.engine import latents_to_pixels

    if threads:
        torch.set_num_threads(threads)
    dtype_name, channels_last, mode = CONFIGS[config]
    dtype = getattr(torch, dtype_name)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(dtype)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(dtype)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    for module in (text_encoder, unet, vae):
        module.eval()
    loaded_rss = rss()

    latent = size // 8
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=generator)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    latents = torch.randn(1, vae.config.latent_channels, latent, latent, generator=generator)
    sample, context, latents = sample.to(dtype), context.to(dtype), latents.to(dtype)
    timestep = torch.tensor(500)

    run_unet, to_pixels = unet, latents_to_pixels
    if mode is not None:
        options = compile_arguments("default", torch.device("cpu"))
        if mode == "unfrozen":
            options = {"mode": "default", "dynamic": False}
        run_unet = torch.compile(unet, **options)
        to_pixels = torch.compile(latents_to_pixels, **options)
    calls = {
        "text_encoder": lambda: text_encoder(tokens)[0],
        "unet": lambda: run_unet(sample, timestep, context).sample,
        "vae_decode": lambda: to_pixels(vae, latents),
    }
    figures = {}
    with torch.inference_mode():
        for stage, call in calls.items():
            started = time.perf_counter()
            call()
            first = time.perf_counter() - started
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                times.append(time.perf_counter() - started)
            figures[stage] = {
                "first": first,
                "fastest": min(times),
                "median": statistics.median(times),
                "times": times,
            }
    return {"config": config, "stages": figures, "rss_loaded": loaded_rss, "rss_end": rss()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SD15_DEFAULT_DIR)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=", ".join(CONFIGS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model.resolve()
    if args.child:
        print(json.dumps(child(model, args.child, args.size, args.repeats, args.threads)))
        return
    ensure_sd15(model)
    results, rows = {}, []
    for config in args.configs.split(","):
        # An empty compile cache for each: compile times are a fresh replica's.
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            data = run_child(
                "benchmarks.cpu_levers",
                *("--child", config, "--model", str(model), "--size", str(args.size)),
                *("--repeats", str(args.repeats), "--threads", str(args.threads)),
                env={"TORCHINDUCTOR_CACHE_DIR": cache},
            )
        results[config] = data
        stages = data["stages"]
        row = [config]
        row += [f"{stages[s]['fastest']:.3f} ({stages[s]['median']:.3f}) s" for s in STAGES]
        compiles = sum(stages[s]["first"] - stages[s]["median"] for s in STAGES)
        row += [f"{compiles:.0f} s", f"{data['rss_loaded'] / 1e9:.2f} GB"]
        row += [f"{(data['rss_end'] - data['rss_loaded']) / 1e9:+.2f} GB"]
        rows.append(row)
        print(f"  measured {config}: {' '.join(row[1:])}", flush=True)
    header = ["configuration", *(f"{s}: fastest (median)" for s in STAGES)]
    table(rows, [*header, "first calls' extra", "RSS loaded", "RSS added by the calls"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
