"""Section 6: peak memory of one request over the idle, loaded endpoint (RSS on a CPU,
allocated memory on a GPU), each in a fresh process running this module:

    python -m benchmarks.memory --model DIR --device auto --size 512 --steps 2

which prints its figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import (
    handler_request,
    heading,
    make_handler,
    peak_rss,
    reset_peak_rss,
    rss,
    run_child,
    table,
)


def child_memory(model_dir: str, device_name_: str, size: int, steps: int) -> dict:
    """Peak memory of one request over the idle, loaded endpoint, in a process of its own."""
    import torch

    handler = make_handler(Path(model_dir), device=device_name_, warmup="")
    device = handler.engine.device
    request = handler_request(size, steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        idle = torch.cuda.memory_allocated()
        handler(request)
        return {"idle": idle, "peak": torch.cuda.max_memory_allocated(), "unit": "allocated"}
    idle = rss()
    reset_peak_rss()
    handler(request)
    return {"idle": idle, "peak": peak_rss(), "unit": "RSS"}


def section_memory(args, results: dict) -> None:
    sizes = [(128, {})] if args.quick else [(512, {}), (1024, {})]
    if not args.quick:
        sizes.append((1024, {"SD_VAE_TILE_ABOVE_PIXELS": "0"}))
    heading(
        f"6. peak memory of one request, {args.model_name} (fresh process each; "
        "2 steps: memory does not grow with steps)"
    )
    rows, measured = [], {}
    for size, env in sizes:
        data = run_child(
            "benchmarks.memory",
            *("--model", str(args.model), "--device", args.device),
            *("--size", str(size), "--steps", "2"),
            env=env,
        )
        label = f"{size}x{size}" + (" VAE tiled" if env else "")
        measured[label] = data
        rows.append(
            [
                label,
                f"{data['idle'] / 2**20:,.0f} MiB",
                f"{data['peak'] / 2**20:,.0f} MiB",
                f"{(data['peak'] - data['idle']) / 2**20:,.0f} MiB",
            ]
        )
    unit = next(iter(measured.values()))["unit"]
    table(rows, ["request", f"idle {unit}", f"peak {unit}", "added by the request"])
    results["memory"] = measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one memory child: prints its figures")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(child_memory(str(args.model), args.device, args.size, args.steps)))


if __name__ == "__main__":
    main()
