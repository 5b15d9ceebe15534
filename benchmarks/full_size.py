"""Section 5: SD 1.5's exact architecture (random weights), diffusers eager against the
handler's path: with torch.compile on CUDA (the GPU target), eager on a CPU (the path works)."""

from __future__ import annotations

import statistics
import time

from benchmarks.common import (
    bare_call,
    bare_pipeline,
    device_and_dtype,
    device_name,
    ensure_sd15,
    handler_request,
    heading,
    interleaved,
    make_handler,
    paired_ratio,
    table,
    timed,
)


def section_sd15(args, results: dict) -> None:
    folder = ensure_sd15(args.sd15)
    device, dtype = device_and_dtype(args.device, folder)
    gpu = device.type == "cuda"
    size, steps = (512, 25) if gpu else (args.sd15_size, args.sd15_steps)
    compile_mode = args.compile or ("max-autotune-no-cudagraphs" if gpu else "off")
    heading(
        f"5. SD 1.5 architecture, random weights: {size}x{size}, {steps} steps, "
        f"{str(dtype).removeprefix('torch.')} on {device_name(device)}"
    )
    started = time.perf_counter()
    pipe = bare_pipeline(folder, device, dtype)
    print(f"  diffusers eager loaded in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    handler = make_handler(
        folder, device=str(device), compile=compile_mode, warmup=f"{size}x{size}"
    )
    print(
        f"  handler ready in {time.perf_counter() - started:.1f} s (SD_COMPILE={compile_mode}, "
        f"warm-up incl. compile {handler.engine.startup_timings['warmup']:.1f} s)",
        flush=True,
    )
    request = handler_request(size, steps)
    denoise = {"eager": [], "handler": []}

    def run_eager():
        denoise["eager"].append(timed(lambda: bare_call(pipe, size, steps, "latent"), device))
        return timed(lambda: bare_call(pipe, size, steps), device)

    def run_handler():
        seconds = timed(lambda: handler(request), device)
        denoise["handler"].append(handler.last_timings["denoising"])
        return seconds

    repeats = max(2, args.repeats // 2) if not gpu else max(5, args.repeats)
    times = interleaved({"diffusers eager": run_eager, "handler": run_handler}, repeats)
    rows = []
    for name, key in (("diffusers eager", "eager"), ("handler", "handler")):
        per_image = statistics.median(times[name])
        loop = statistics.median(denoise[key][1:])  # [0] was the warm-up call
        rows.append([name, f"{per_image:.3f} s", f"{steps / loop:.2f}"])
    table(rows, ["path", "s/image", "steps/s"])
    speedup = paired_ratio(times["diffusers eager"], times["handler"])
    print(
        f"  handler throughput / diffusers eager = {speedup:.3f}"
        + ("  (GPU target >= 2)" if gpu else "  (CPU: proves the path works)")
    )
    if gpu:
        print(f"  compile + warm-up at start-up: {handler.engine.startup_timings['warmup']:.1f} s")
    results["sd15"] = {
        "device": device_name(device),
        "size": size,
        "steps": steps,
        "compile": compile_mode,
        "speedup": speedup,
        "startup": handler.engine.startup_timings,
        "rows": {r[0]: r[1:] for r in rows},
    }
