"""What LoRAs cost: start-up time and memory per LoRA, and a request with one or two LoRAs
against the same request without any, as ratios measured in one run.

    python -m benchmarks.lora_cost                  # the shipped model, then SD 1.5's size
    python -m benchmarks.lora_cost --quick          # the shipped model only, fewer rounds
    python -m benchmarks.lora_cost --json out.json  # the figures as JSON too

Each model gets two random LoRAs of the layout kohya's trainer makes by default (every linear
layer of the UNet's transformer blocks and of the text encoder's attention and MLP), at rank
32, the size of many published SD 1.5 LoRAs. SD 1.5 is its real architecture with random
weights (``model_tools.build --arch sd15``, about 2 GB, built once into ``--sd15``): its
timings are those of SD 1.5, which depend on shapes, not values.

Two handlers are built the way the runtime builds them: one on the model alone (no ``loras/``
folder, as before LoRAs existed), one on the same model with the two LoRAs, which reports what
each LoRA took at start-up (reading, checking and loading it) and the bytes its matrices take
in memory (totals of two handlers in one process would measure the machine's file cache and
allocator, not the LoRAs). Requests then run
in rounds of alternating order, so that load on the machine hits every contender alike: the
model alone, and the LoRA handler asked for no LoRA, one, and two. Ratios are medians of the
per-round ratios. Absolute times depend on the machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SD15_DIR = Path(tempfile.gettempdir()) / "sd15-random"
PROMPT = "a red circle on a white background"
SEED = 1234
RANK = 32
MODEL_ENTRIES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
NAMES = ("style-a", "style-b")


def make_handler(model_dir: Path, **overrides):
    """handler.py's EndpointHandler for ``model_dir``, built as the runtime builds it, with the
    settings of the environment and ``overrides``."""
    from sd_endpoint.settings import Settings

    spec = importlib.util.spec_from_file_location("handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = dataclasses.replace(Settings.from_env(), **overrides)
    return module.EndpointHandler(str(model_dir), settings)


def linked_model(model_dir: Path, folder: Path) -> Path:
    """``model_dir``'s model, linked into ``folder`` (no ``loras/`` yet)."""
    folder.mkdir(parents=True)
    for name in MODEL_ENTRIES:
        (folder / name).symlink_to(model_dir.resolve() / name)
    return folder


def ensure_sd15(folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        print(f"  building SD 1.5's architecture with random weights in {folder} (once)")
        command = [sys.executable, "-m", "model_tools.build", "--arch", "sd15", "--out"]
        subprocess.run([*command, str(folder)], cwd=REPO_ROOT, check=True)
    return folder


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())  # fmt: skip
    amx = " with AMX" if "amx_bf16" in info else ""
    return f"{model}{amx}, {os.cpu_count()} cores"


def interleaved(candidates: dict, repeats: int) -> dict[str, list[float]]:
    """Each candidate once to warm it, then ``repeats`` rounds in alternating order."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(candidates[name]())
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def measure(
    model_dir: Path, work: Path, size: int | None, steps: int, repeats: int, threads: int
) -> dict:
    """Start-up, memory and request times of ``model_dir`` without and with two LoRAs."""
    from model_tools.lora_files import random_lora, save_file

    overrides = {"num_threads": threads}
    if size is not None:
        overrides["warmup"] = f"{size}x{size}"
    plain = make_handler(linked_model(model_dir, work / "plain"), **overrides)

    folder = linked_model(model_dir, work / "with-loras")
    (folder / "loras").mkdir()
    files = {}
    for seed, name in enumerate(NAMES, start=1):
        tensors = random_lora(plain.engine.pipe, RANK, seed=seed, strength=0.05)
        files[name] = save_file(tensors, folder / "loras" / f"{name}.safetensors")
    with_loras = make_handler(folder, **overrides)
    adapters = with_loras.engine.adapters

    side = size or plain.engine.native_size[0]
    body = {"inputs": PROMPT, "height": side, "width": side, "num_inference_steps": steps}
    body["seed"] = SEED
    one, two = {NAMES[0]: 1.0}, {NAMES[0]: 1.0, NAMES[1]: 1.0}
    same = plain(body)["image"] == with_loras(body)["image"]

    def timed(handler, request: dict):
        def run() -> float:
            began = time.perf_counter()
            handler(request)
            return time.perf_counter() - began

        return run

    times = interleaved(
        {
            "model alone (no loras/)": timed(plain, body),
            "2 LoRAs loaded, none asked": timed(with_loras, body),
            "1 LoRA": timed(with_loras, {**body, "loras": one}),
            "2 LoRAs": timed(with_loras, {**body, "loras": two}),
        },
        repeats,
    )
    alone = times["model alone (no loras/)"]
    pipe = with_loras.engine.pipe
    return {
        "model": str(model_dir),
        "dtype": str(with_loras.engine.dtype).removeprefix("torch."),
        "device": str(with_loras.engine.device),
        "size": f"{side}x{side}",
        "steps": steps,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "lora_file_bytes": statistics.mean(f.stat().st_size for f in files.values()),
        "lora_device_bytes": statistics.mean(adapters.sizes.values()),
        "lora_load_seconds": statistics.mean(adapters.load_seconds.values()),
        "none_asked_same_bytes": same,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "ratios": {name: paired_ratio(t, alone) for name, t in times.items()},
        "rounds": repeats,
    }


def report(label: str, result: dict) -> None:
    mib = 2**20
    print(
        f"\n== {label}: {result['size']}, {result['steps']} steps, {result['dtype']} on "
        f"{result['device']}, UNet {result['unet_parameters'] / 1e6:,.0f} M parameters"
    )
    print(
        f"  a rank-{RANK} LoRA: file {result['lora_file_bytes'] / mib:,.1f} MiB, "
        f"{result['lora_device_bytes'] / mib:,.1f} MiB in memory, loaded in "
        f"{result['lora_load_seconds']:.2f} s at start-up"
    )
    print(f"  no LoRA asked gives the bytes of the model alone: {result['none_asked_same_bytes']}")
    print(f"  {'request':28} {'median':>10} {'vs model alone':>15}   ({result['rounds']} rounds)")
    for name, seconds in result["median_seconds"].items():
        print(f"  {name:28} {seconds * 1000:>8,.0f} ms {result['ratios'][name]:>15.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shipped model only")
    parser.add_argument("--sd15", type=Path, default=SD15_DIR, help=f"default: {SD15_DIR}")
    parser.add_argument("--size", type=int, default=256, help="SD 1.5's side (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="SD 1.5's steps (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 10, 6)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: a shared machine)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here as JSON too")
    args = parser.parse_args(argv)

    import diffusers
    import torch
    import transformers

    print(f"{cpu_name()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"transformers {transformers.__version__}; {args.threads} thread(s)")  # fmt: skip
    results = {"cpu": cpu_name(), "torch": torch.__version__, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="lora-cost-") as work:
        # The first handler of a process pays for imports and first calls: not a LoRA's cost.
        make_handler(linked_model(REPO_ROOT, Path(work) / "first"), num_threads=args.threads)
        rounds = args.repeats or 10
        shipped = measure(REPO_ROOT, Path(work) / "shipped", None, 25, rounds, args.threads)
        report("the shipped model", shipped)
        results["shipped"] = shipped
        if not args.quick:
            sd15 = ensure_sd15(args.sd15)
            rounds = args.repeats or 6
            full = measure(sd15, Path(work) / "sd15", args.size, args.steps, rounds, args.threads)
            report("SD 1.5's architecture (random weights)", full)
            results["sd15"] = full
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
