"""Where the time and memory of a request go, as ratios against baselines measured in the same run.

    .venv/bin/python scripts/benchmark.py                 # every section, full size
    .venv/bin/python scripts/benchmark.py --quick         # every section, small and fast
    .venv/bin/python scripts/benchmark.py --sections 1,2,3

Sections:
  1  the handler end to end vs the bare StableDiffusionPipeline call with the same arguments
  2  one request stage by stage: validation, text encoding, denoising, VAE decode, encoding...
  3  image encoding: PNG levels 0-9, optimize, JPEG and WebP, by time and size
  4  cold start in fresh processes: imports, loading, moving, warm-up, first request
  5  full-size SD 1.5 architecture (random weights): diffusers eager vs the handler's path
  6  peak memory per request at 512x512 and 1024x1024 (RSS on CPU, allocated on GPU)
  7  each speed switch on vs off: channels_last, CPU threads, torch.compile
  8  full-size SD 1.5 on the CPU, 512x512, 25 steps: stock float32 pipeline vs the handler's
     defaults vs OpenVINO, with peak RSS and the smallest intel-spr instance (bench_sd15_cpu.py)

Absolute times depend on the machine and on whatever else runs on it; ratios of runs
interleaved in the same process are what to compare. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks import sd15_cpu
from benchmarks.cold_start import section_cold_start
from benchmarks.common import (
    REPO_ROOT,
    SD15_DEFAULT_DIR,
    device_and_dtype,
    device_name,
    ensure_sd15,
    heading,
    versions,
)
from benchmarks.encoding import section_encoding
from benchmarks.full_size import section_sd15
from benchmarks.handler_vs_bare import section_handler_vs_bare, section_stages
from benchmarks.memory import section_memory
from benchmarks.switches import section_switches


def section_sd15_cpu(args, results: dict) -> None:
    size, steps = (64, 3) if args.quick else (512, args.sd15_cpu_steps)
    contenders = "stock,handler" if args.quick else "stock,handler,openvino"
    heading(f"8. full-size SD 1.5 on the CPU ({size}x{size}), stock vs handler vs OpenVINO")
    folder = args.sd15 if args.quick else ensure_sd15(args.sd15)
    results["sd15_cpu"] = sd15_cpu.measure(folder, size, steps, 25, contenders.split(","))


SECTIONS = {
    "1": section_handler_vs_bare,
    "2": section_stages,
    "3": section_encoding,
    "4": section_cold_start,
    "5": section_sd15,
    "6": section_memory,
    "7": section_switches,
    "8": section_sd15_cpu,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated section numbers (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few repeats: checks that every section runs",
    )
    parser.add_argument("--model", type=Path, default=REPO_ROOT, help="model folder")
    parser.add_argument("--device", default="auto", help="as SD_DEVICE")
    parser.add_argument("--size", type=int, help="image side for 1, 2, 4, 7 (default 512)")
    parser.add_argument("--steps", type=int, help="steps for 1, 2, 4, 7 (default 25)")
    parser.add_argument(
        "--cold-size", type=int, default=0, help="request side for 4 (default: native size)"
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per comparison (default 5)")
    parser.add_argument(
        "--sd15",
        type=Path,
        default=SD15_DEFAULT_DIR,
        help="SD 1.5 architecture folder for section 5; built there if missing",
    )
    parser.add_argument("--sd15-size", type=int, default=128, help="section 5 size on CPU")
    parser.add_argument("--sd15-steps", type=int, default=3, help="section 5 steps on CPU")
    parser.add_argument(
        "--sd15-cpu-steps", type=int, default=4, help="steps measured per contender in 8"
    )
    parser.add_argument(
        "--compile",
        help="SD_COMPILE mode for 5 and 7 (default: 5 uses "
        "max-autotune-no-cudagraphs on CUDA, off on CPU; 7 skips compile)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)

    args.size = args.size or (128 if args.quick else 512)
    args.steps = args.steps or (4 if args.quick else 25)
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.quick:
        args.sd15_size, args.sd15_steps = 64, 2
    args.model = args.model.resolve()
    args.model_name = "shipped model" if args.model == REPO_ROOT else str(args.model)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")

    import torch

    device, _ = device_and_dtype(args.device)
    print(f"machine: {device_name(device)}, {torch.get_num_threads()} torch threads; {versions()}")
    print(
        "settings from the environment: "
        + (
            ", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("SD_"))
            or "none (defaults)"
        )
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at start: {load:.2f} (absolute times are only comparable at low load)")
    results: dict = {"versions": versions(), "quick": args.quick}
    for number in chosen:
        started = time.perf_counter()
        SECTIONS[number](args, results)
        print(f"  (section {number} took {time.perf_counter() - started:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
