"""Section 4: cold start in fresh processes. Imports, loading, moving, warm-up and the first
request of the handler, against the floor every endpoint pays (import, load, move).

Each measurement is a child process running this module:

    python -m benchmarks.cold_start floor --model DIR --device auto
    python -m benchmarks.cold_start handler --model DIR --device auto --size 0 --steps 25

It prints its figures as JSON; clock times are made relative to the parent's launch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import (
    PROMPT,
    SEED,
    handler_request,
    heading,
    make_handler,
    ms,
    run_child,
    table,
    timed,
)

COLD_STAGES = ["interpreter", "imports", "loading", "moving", "warmup", "ready"]


def child_floor(model_dir: str, device_name: str) -> dict:
    """The least any endpoint must do: import torch and diffusers, load, move to the device."""
    started = time.time()
    import torch
    from diffusers import StableDiffusionPipeline

    imported = time.time()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if device_name == "auto" else device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if int(os.environ.get("SD_NUM_THREADS", "0")):  # as the handler would, for a fair floor
        torch.set_num_threads(int(os.environ["SD_NUM_THREADS"]))
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        use_safetensors=True,
        local_files_only=True,
        torch_dtype=dtype,
    )
    loaded = time.time()
    pipe.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ready = time.time()
    return {
        "started": started,
        "ready": ready,
        "imports": imported - started,
        "loading": loaded - imported,
        "moving": ready - loaded,
    }


def child_handler(model_dir: str, device_name: str, size: int, steps: int, steady: int) -> dict:
    started = time.time()
    import sd_endpoint.engine  # noqa: F401  (what handler.py imports, timed on its own)
    import sd_endpoint.imaging  # noqa: F401
    import sd_endpoint.schema  # noqa: F401

    imported = time.time()
    handler = make_handler(Path(model_dir), device=device_name)
    ready = time.time()
    request = handler_request(size, steps) if size else {"inputs": PROMPT, "seed": SEED}
    first = timed(lambda: handler(request))
    rest = [timed(lambda: handler(request)) for _ in range(steady)]
    return {
        "started": started,
        "ready": ready,
        "imports": imported - started,
        **handler.engine.startup_timings,
        "first": first,
        "steady": statistics.median(rest),
    }


def run_cold(kind: str, args, env: dict | None = None, *extra: str) -> dict:
    """One child of ``kind``; its clock times (``started``, ``ready``) become seconds since
    the launch."""
    launched = time.time()
    data = run_child(
        "benchmarks.cold_start",
        kind,
        "--model",
        str(args.model),
        "--device",
        args.device,
        *extra,
        env=env,
    )
    data["interpreter"] = data.pop("started") - launched
    data["ready"] = data["ready"] - launched
    return data


def section_cold_start(args, results: dict) -> None:
    repeats = 1 if args.quick else 5
    size = f"{args.cold_size}x{args.cold_size}" if args.cold_size else "native size (the default)"
    heading(
        f"4. cold start in fresh processes, {args.model_name} (median of {repeats}; warm page "
        f"cache; requests at {size}, {args.steps} steps)"
    )
    variants = {"handler": {}}
    if not args.quick:
        variants["handler, SD_WARMUP off"] = {"SD_WARMUP": ""}
    steady = "1" if args.quick else "3"
    extra = ("--size", str(args.cold_size), "--steps", str(args.steps))
    extra += ("--steady", steady)
    runs = {"floor": [], **{name: [] for name in variants}}
    if not args.quick:
        run_cold("floor", args)  # fills the page cache, so every timed run starts alike
    for _ in range(repeats):
        runs["floor"].append(run_cold("floor", args))
        for name, env in variants.items():
            runs[name].append(run_cold("handler", args, env, *extra))
    median = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    for m in median.values():
        m["other"] = m["ready"] - sum(m.get(k, 0) for k in COLD_STAGES[:-1])
    labels = {"interpreter": "interpreter start", "warmup": "warm-up", "ready": "READY (total)"}
    rows = [
        [labels.get(stage, stage)] + [ms(m[stage]) if stage in m else "-" for m in median.values()]
        for stage in [*COLD_STAGES[:-1], "other", "ready"]
    ]
    rows += [
        [label] + [ms(m[key]) if key in m else "-" for m in median.values()]
        for label, key in (("first request", "first"), (f"steady request ({steady})", "steady"))
    ]
    table(rows, ["stage", *median])
    floor = median["floor"]["ready"]
    for name in variants:
        m = median[name]
        print(
            f"  {name}: ready / floor = {m['ready'] / floor:.3f} (target <= 1.15); "
            f"first request / steady = {m['first'] / m['steady']:.3f} (target <= 1.2)"
        )
    results["cold_start"] = median


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one cold-start child: prints its figures")
    parser.add_argument("kind", choices=["floor", "handler"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=0, help="request side (0: native)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--steady", type=int, default=3, help="steady requests after the first")
    args = parser.parse_args(argv)
    if args.kind == "floor":
        data = child_floor(str(args.model), args.device)
    else:
        data = child_handler(str(args.model), args.device, args.size, args.steps, args.steady)
    print(json.dumps(data))


if __name__ == "__main__":
    main()
