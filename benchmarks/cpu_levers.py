"""Each CPU speed lever on each stage of a full-size request, one configuration per process.

    .venv/bin/python -m benchmarks.cpu_levers              # 512x512
    .venv/bin/python -m benchmarks.cpu_levers --configs bf16-cl,bf16-cl-frozen --size 256

The stages of one guided request, timed apart on SD 1.5's exact architecture (random weights,
model_tools.build --arch sd15): the text encoder (a batch of 2: prompt and negative prompt),
one UNet call (a batch of 2, as classifier-free guidance makes every step) and the VAE decode
of one image (the engine's own ``latents_to_pixels``). Each configuration loads the modules
fresh in a process of its own in its dtype and memory layout, runs every stage once (a
compiled one compiles then, with an empty compile cache, and that first call is reported as
its compile time) and reports the fastest of ``--repeats`` calls
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

# name: (dtype, channels-last, torch.compile with frozen weights or not, None for eager).
CONFIGS = {
    "fp32": ("float32", False, None),
    "fp32-cl": ("float32", True, None),
    "bf16": ("bfloat16", False, None),
    "bf16-cl": ("bfloat16", True, None),
    "bf16-cl-compiled": ("bfloat16", True, "unfrozen"),
    "bf16-frozen": ("bfloat16", False, "frozen"),
    "bf16-cl-frozen": ("bfloat16", True, "frozen"),
}
STAGES = ("text_encoder", "unet", "vae_decode")


def torch_stages(model: Path, config: str, size: int) -> dict:
    """The three stages of a request as calls, in ``config``'s dtype, layout and compilation."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sd_endpoint.engine import latents_to_pixels

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

    inputs = stage_inputs(size, text_encoder.config.vocab_size, unet.config.cross_attention_dim)
    tokens = torch.from_numpy(inputs["tokens"])
    sample, context, latents = (
        torch.from_numpy(inputs[name]).to(dtype) for name in ("sample", "context", "latents")
    )
    timestep = torch.tensor(inputs["timestep"])

    run_unet, to_pixels = unet, latents_to_pixels
    if mode is not None:
        # Freezing takes the weights as constants, so that oneDNN gets them pre-packed once.
        # It must be set globally: torch.compile(options={"freezing": True}) compiled the same
        # unfrozen code here (torch 2.13). One configuration per process, so this stays in it.
        torch._inductor.config.freezing = mode == "frozen"
        run_unet = torch.compile(unet, dynamic=False)
        to_pixels = torch.compile(latents_to_pixels, dynamic=False)

    def no_grad(call):
        def run():
            with torch.inference_mode():
                call()

        return run

    return {
        "text_encoder": no_grad(lambda: text_encoder(tokens)[0]),
        "unet": no_grad(lambda: run_unet(sample, timestep, context).sample),
        "vae_decode": no_grad(lambda: to_pixels(vae, latents)),
    }


def stage_inputs(size: int, vocab_size: int, context_width: int) -> dict:
    """Seeded inputs for the stages (numpy, so that an OpenVINO process can share them)."""
    import numpy as np

    latent = size // 8
    rng = np.random.default_rng(0)
    return {
        "tokens": rng.integers(0, vocab_size, (2, 77)),
        "sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
        "context": rng.standard_normal((2, 77, context_width), dtype=np.float32),
        "latents": rng.standard_normal((1, 4, latent, latent), dtype=np.float32),
        "timestep": 500,
    }


def child(model: Path, config: str, size: int, repeats: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    calls = torch_stages(model, config, size)
    loaded_rss = rss()
    figures = {}
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
