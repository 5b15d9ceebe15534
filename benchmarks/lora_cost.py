"""What LoRAs cost: start-up time and memory per LoRA, a request with one or two LoRAs
against the same request without any, and the cost of switching LoRAs, as ratios measured in
one run.

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
model alone, and the LoRA handler asked for no LoRA, one, and two, each after a request that
asked for the same (the LoRAs stay patched into the weights: the steady state of an endpoint
serving one style), and one LoRA and none after a request with two (a switch: the originals
copied back, the new LoRAs patched in). Ratios are medians of the per-round ratios. Absolute
times depend on the machine; the ratios are what to compare.

A fused LoRA costs nothing per step, so a longer request costs what a short one does, plus
the steps: ``--extrapolate N`` also gives the ratios at N steps, from the model alone's time
per step (measured at 1 step and at ``--steps``).
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

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SD15_DIR = Path(tempfile.gettempdir()) / "sd15-random"
PROMPT = "a red circle on a white background"
SEED = 1234
RANK = 32
MODEL_ENTRIES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
NAMES = ("style-a", "style-b")
ALONE = "model alone (no loras/)"


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
    model_dir: Path,
    work: Path,
    size: int | None,
    steps: int,
    repeats: int,
    threads: int,
    extrapolate: tuple[int, ...] = (),
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

    side = size or plain.engine.native_size[0]
    body = {"inputs": PROMPT, "height": side, "width": side, "num_inference_steps": steps}
    body["seed"] = SEED
    one, two = {NAMES[0]: 1.0}, {NAMES[0]: 1.0, NAMES[1]: 1.0}
    same = plain(body)["image"] == with_loras(body)["image"]
    adapters = with_loras.engine.adapters

    def timed(handler, request: dict, after: dict | None = None):
        """A request's time, right after a request that asked for the LoRAs ``after``."""

        def run() -> float:
            if after is not None:  # patch those in, as that request would have
                with torch.inference_mode(), adapters.active(after):
                    pass
            began = time.perf_counter()
            handler(request)
            return time.perf_counter() - began

        return run

    times = interleaved(
        {
            ALONE: timed(plain, body),
            "model alone, 1 step": timed(plain, {**body, "num_inference_steps": 1}),
            "2 LoRAs loaded, none asked": timed(with_loras, body, after={}),
            "1 LoRA": timed(with_loras, {**body, "loras": one}, after=one),
            "2 LoRAs": timed(with_loras, {**body, "loras": two}, after=two),
            "1 LoRA, after 2 (switch)": timed(with_loras, {**body, "loras": one}, after=two),
            "none, after 2 (switch)": timed(with_loras, body, after=two),
        },
        repeats,
    )
    backups = {}
    for label, weights in (("1 LoRA", one), ("2 LoRAs", two)):
        with torch.inference_mode(), adapters.active(weights):
            backups[label] = adapters.backup_bytes
    medians = {name: statistics.median(t) for name, t in times.items()}
    step = (medians[ALONE] - medians["model alone, 1 step"]) / max(steps - 1, 1)
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
        "backup_bytes": backups,
        "none_asked_same_bytes": same,
        "median_seconds": medians,
        "ratios": {name: paired_ratio(t, times[ALONE]) for name, t in times.items()},
        "step_seconds": step,
        "extrapolated": {
            steps_n: {
                name: (seconds + (steps_n - steps) * step)
                / (medians[ALONE] + (steps_n - steps) * step)
                for name, seconds in medians.items()
                if name != "model alone, 1 step"
            }
            for steps_n in extrapolate
            if steps_n > steps
        },
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
    backups = ", ".join(f"{n} {b / mib:,.1f} MiB" for n, b in result["backup_bytes"].items())
    print(f"  original weights kept while patched (host memory): {backups}")
    print(f"  no LoRA asked gives the bytes of the model alone: {result['none_asked_same_bytes']}")
    extrapolated = result["extrapolated"]
    heads = "".join(f"{f'at {n} steps':>12}" for n in extrapolated)
    rounds = f"({result['rounds']} rounds)"
    print(f"  {'request':28} {'median':>10} {'vs model alone':>15}{heads}   {rounds}")
    for name, seconds in result["median_seconds"].items():
        more = "".join(
            f"{ratios[name]:>12.3f}" for ratios in extrapolated.values() if name in ratios
        )
        print(f"  {name:28} {seconds * 1000:>8,.0f} ms {result['ratios'][name]:>15.3f}{more}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shipped model only")
    parser.add_argument("--sd15", type=Path, default=SD15_DIR, help=f"default: {SD15_DIR}")
    parser.add_argument("--size", type=int, default=256, help="SD 1.5's side (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="SD 1.5's steps (default 3)")
    parser.add_argument(
        "--extrapolate", type=int, default=25, help="SD 1.5's ratios at this many steps too"
    )
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 10, 6)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: a shared machine)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here as JSON too")
    args = parser.parse_args(argv)

    import diffusers
    import transformers

    load = os.getloadavg()[0]
    print(f"{cpu_name()}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"transformers {transformers.__version__}; {args.threads} thread(s); "
          f"load average {load:.2f}")  # fmt: skip
    results = {"cpu": cpu_name(), "torch": torch.__version__, "threads": args.threads}
    results["load_average_before"] = load
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
            full = measure(
                sd15,
                Path(work) / "sd15",
                args.size,
                args.steps,
                rounds,
                args.threads,
                (args.extrapolate,),
            )
            report("SD 1.5's architecture (random weights)", full)
            results["sd15"] = full
    results["load_average_after"] = os.getloadavg()[0]
    print(f"\nload average after: {results['load_average_after']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
