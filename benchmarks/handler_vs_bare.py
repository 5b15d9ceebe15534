"""Sections 1 and 2: the handler end to end against the bare StableDiffusionPipeline call with
the same arguments, and one request of the handler stage by stage."""

from __future__ import annotations

import statistics

from benchmarks.common import (
    bare_call,
    bare_pipeline,
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


def section_handler_vs_bare(args, results: dict) -> None:
    heading(
        f"1. handler end to end vs bare StableDiffusionPipeline call "
        f"({args.size}x{args.size}, {args.steps} steps, {args.model_name})"
    )
    device, dtype = device_and_dtype(args.device, args.model)
    handler = make_handler(args.model, device=str(device))
    # The same handler with its speed switches off: what the handler's own code costs.
    plain = make_handler(args.model, device=str(device), channels_last=False, compile="off")
    pipe = bare_pipeline(args.model, device, dtype)
    request = handler_request(args.size, args.steps)
    stages = []

    def run_handler():
        seconds = timed(lambda: handler(request), device)
        stages.append(handler.last_timings)
        return seconds

    times = interleaved(
        {
            "handler": run_handler,
            "handler, switches off": lambda: timed(lambda: plain(request), device),
            "bare": lambda: timed(lambda: bare_call(pipe, args.size, args.steps), device),
        },
        args.repeats,
    )
    table(
        [[name, ms(statistics.median(t)), ms(min(t))] for name, t in times.items()],
        ["call", "median", "best"],
    )
    ratio = paired_ratio(times["handler"], times["bare"])
    overhead = paired_ratio(times["handler, switches off"], times["bare"])
    print(f"  handler / bare = {ratio:.3f}  (target <= 1.03)")
    print(f"  handler with switches off / bare = {overhead:.3f}  (the handler's own cost)")
    print(f"  (each the median of {args.repeats} interleaved rounds' ratios)")
    results["handler_vs_bare"] = {
        "ratio": ratio,
        "ratio_switches_off": overhead,
        **{k: statistics.median(v) for k, v in times.items()},
    }
    results["_stages"] = stages[1:]  # the first was the warm-up call


def section_stages(args, results: dict) -> None:
    heading(f"2. one request stage by stage ({args.size}x{args.size}, {args.steps} steps)")
    stages = results.pop("_stages", None)
    if not stages:
        device, _ = device_and_dtype(args.device)
        handler = make_handler(args.model, device=str(device))
        request = handler_request(args.size, args.steps)
        handler(request)
        stages = []
        for _ in range(args.repeats):
            handler(request)
            stages.append(handler.last_timings)
    other = "other (handler code between stages)"
    stages = [{**s, other: 2 * s["total"] - sum(s.values())} for s in stages]
    median = {name: statistics.median(s[name] for s in stages) for name in stages[0]}
    total = median.pop("total")
    table(
        [[name, ms(s), f"{s / total:.2%}"] for name, s in median.items()]
        + [["total", ms(total), "100%"]],
        ["stage", "median", "share"],
    )
    outside = sum(
        v for k, v in median.items() if k not in ("text_encoding", "denoising", "decoding")
    )
    print(
        f"  handler's own work (validation, encoding, base64, other) = {outside / total:.2%}"
        " of the request"
    )
    results["stages"] = {**median, "total": total}
