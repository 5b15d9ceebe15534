"""Section 7: each speed switch of the handler on against off, in interleaved rounds:
channels_last, CPU threads, and torch.compile when a mode is given."""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.common import (
    device_and_dtype,
    handler_request,
    heading,
    interleaved,
    make_handler,
    ms,
    paired_ratio,
    table,
    timed,
)


def section_switches(args, results: dict) -> None:
    import torch

    heading(
        f"7. speed switches on vs off ({args.size}x{args.size}, {args.steps} steps, "
        f"{args.model_name}; ratio < 1 means the switch is faster)"
    )
    device, _ = device_and_dtype(args.device)
    request = handler_request(args.size, args.steps)
    rows, measured = [], {}

    def compare(name: str, on, off) -> None:
        times = interleaved({"on": on, "off": off}, args.repeats)
        ratio = paired_ratio(times["on"], times["off"])
        measured[name] = {
            "on": statistics.median(times["on"]),
            "off": statistics.median(times["off"]),
            "on/off": ratio,
        }
        rows.append([name, ms(measured[name]["on"]), ms(measured[name]["off"]), f"{ratio:.3f}"])
        print(f"  measured {name}", flush=True)

    with_cl = make_handler(args.model, device=str(device), channels_last=True)
    without_cl = make_handler(args.model, device=str(device), channels_last=False)
    compare(
        "channels_last",
        lambda: timed(lambda: with_cl(request), device),
        lambda: timed(lambda: without_cl(request), device),
    )
    if device.type == "cpu" and os.cpu_count() > 1:
        # One thread per core is PyTorch's own default (SD_NUM_THREADS=0).
        cores, default_threads = os.cpu_count(), torch.get_num_threads()

        def with_threads(n):
            def run():
                torch.set_num_threads(n)
                try:
                    return timed(lambda: with_cl(request), device)
                finally:
                    torch.set_num_threads(default_threads)

            return run

        compare(f"{cores} threads (on) vs 1 (off)", with_threads(cores), with_threads(1))
    if args.compile and args.compile != "off":
        started = time.perf_counter()
        compiled = make_handler(
            args.model, device=str(device), compile=args.compile, warmup=f"{args.size}x{args.size}"
        )
        ready = time.perf_counter() - started
        warmup = compiled.engine.startup_timings["warmup"]
        print(
            f"  SD_COMPILE={args.compile}: ready in {ready:.1f} s, of which warm-up with "
            f"compiling {warmup:.1f} s",
            flush=True,
        )
        compare(
            f"compile {args.compile}",
            lambda: timed(lambda: compiled(request), device),
            lambda: timed(lambda: with_cl(request), device),
        )
        measured[f"compile {args.compile}"].update(ready=ready, warmup=warmup)
    table(rows, ["switch", "on", "off", "on / off"])
    results["switches"] = measured
