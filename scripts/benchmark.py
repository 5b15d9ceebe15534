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
import dataclasses
import importlib.util
import io
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
sys.path.insert(0, str(REPO_ROOT))
PROMPT = "a red circle on a white background"
SEED = 1234
SD15_DEFAULT_DIR = Path(tempfile.gettempdir()) / "sd15-random"


# --------------------------------------------------------------------------------------------
# Shared helpers. torch and the endpoint are imported inside functions so that the cold-start
# children (this same file, run with --child) start from a bare interpreter.


def make_handler(model_dir: Path, **overrides):
    """handler.py's EndpointHandler for ``model_dir``, with settings from the environment and
    ``overrides`` (built as the runtime builds it: the repo folder first on sys.path)."""
    from sd_endpoint.settings import Settings

    spec = importlib.util.spec_from_file_location("handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = dataclasses.replace(Settings.from_env(), **overrides)
    return module.EndpointHandler(str(model_dir), settings)


def device_and_dtype(name: str = "auto", model_dir: Path | None = None):
    """The device and the dtype SD_DTYPE=auto gives ``model_dir`` there (as the handler's)."""
    from sd_endpoint.engine import resolve_device, resolve_dtype

    device = resolve_device(name)
    return device, resolve_dtype("auto", device, model_dir)


def bare_pipeline(model_dir: Path, device, dtype):
    """The stock pipeline, as a diffusers user would load it: no switch of this repo applied."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    from sd_endpoint.engine import _dtype_argument

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        use_safetensors=True,
        local_files_only=True,
        **_dtype_argument(dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def bare_call(pipe, size: int, steps: int, output_type: str = "pil"):
    import torch

    return pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type=output_type,
    ).images


def handler_request(size: int, steps: int) -> dict:
    return {
        "inputs": PROMPT,
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "seed": SEED,
    }


def timed(fn, device=None) -> float:
    import torch

    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def interleaved(candidates: dict, repeats: int) -> dict[str, list[float]]:
    """Run each candidate once to warm it, then ``repeats`` rounds in alternating order, so a
    load change on the machine hits every candidate alike."""
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(candidates[name]())
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of round-by-round ratios: robust to load that drifts across the run."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def table(rows: list[list], header: list[str]) -> None:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


# --------------------------------------------------------------------------------------------
# 1 and 2: the handler against the bare pipeline, and one request stage by stage.


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


# --------------------------------------------------------------------------------------------
# 3: image encoding.


def natural_image(size: int, seed: int = 0):
    """A landscape-like RGB picture: smooth sky, sun, ridged hills, textured ground, a shaded
    ball and a sensor-like grain. Compresses like a photo or a generated image, unlike noise
    (incompressible) or flat shapes (compresses to nothing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size

    def fractal(octaves: int, first: int = 4, falloff: float = 1.8) -> np.ndarray:
        total = np.zeros((size, size))
        for o in range(octaves):
            cells = min(first * 2**o, size)
            grid = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
            total += np.asarray(grid.resize((size, size), Image.BICUBIC)) / falloff**o
        return total / 2

    sky = np.stack([0.35 + 0.4 * y, 0.55 + 0.3 * y, 0.95 - 0.1 * y], -1)
    sky += 0.06 * np.clip(fractal(4), 0, None)[..., None]  # clouds
    sun = np.exp(-(((x - 0.75) ** 2 + (y - 0.2) ** 2) / 0.004))[..., None]
    image = sky + sun * np.array([0.6, 0.5, 0.2])
    ridge = 0.45 + 0.08 * np.sin(x * 9) + 0.03 * np.sin(x * 23 + 1) + 0.02 * fractal(5)[0]
    hills = (y > ridge)[..., None]
    rock = np.array([0.35, 0.38, 0.42]) * (1 - 0.6 * (y - ridge)[..., None])
    rock = rock + 0.05 * fractal(8, falloff=1.4)[..., None]
    image = np.where(hills, rock, image)
    ground = (y > 0.7 + 0.03 * np.sin(x * 5))[..., None]
    texture = fractal(8, 8, falloff=1.4)[..., None]
    grass = np.array([0.25, 0.5, 0.18]) + 0.08 * texture * np.array([1, 1.4, 0.6])
    image = np.where(ground, grass, image)
    dx, dy = x - 0.35, y - 0.72
    ball = dx**2 + dy**2 < 0.012
    shade = np.clip(1 - 3 * ((dx + 0.03) ** 2 + (dy + 0.03) ** 2) / 0.012, 0.2, 1)
    image = np.where(ball[..., None], np.array([0.85, 0.12, 0.1]) * shade[..., None], image)
    image = image + rng.normal(0, 0.006, image.shape)  # grain
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def encoders(quick: bool):
    from sd_endpoint.imaging import LOSSY_QUALITY, encode

    options = {
        f"png level {level}": (lambda im, lv=level: encode(im, "png", lv)) for level in range(10)
    }

    def png_optimize(im):
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    if not quick:
        options["png optimize=True"] = png_optimize
    options[f"jpeg quality {LOSSY_QUALITY}"] = lambda im: encode(im, "jpeg")
    options[f"webp quality {LOSSY_QUALITY}"] = lambda im: encode(im, "webp")
    return options


def section_encoding(args, results: dict) -> None:
    from sd_endpoint.imaging import to_base64
    from sd_endpoint.settings import Settings

    sizes = (256,) if args.quick else (512, 1024)
    repeats = 2 if args.quick else 5
    heading(
        "3. image encoding on a natural-looking picture (median of "
        f"{repeats}; ratios against Pillow's default, PNG level 6)"
    )
    default_level = Settings().png_compress_level
    measured = {}
    for size in sizes:
        image = natural_image(size)
        for name, encode in encoders(args.quick).items():
            data = encode(image)
            seconds = statistics.median(
                timed(lambda e=encode, im=image: e(im)) for _ in range(repeats)
            )
            measured[(name, size)] = (seconds, len(data))
            if name == "png level 6":
                png = data
        base64_s = statistics.median(timed(lambda d=png: to_base64(d)) for _ in range(repeats))
        measured[("base64 of the level-6 PNG", size)] = (base64_s, len(to_base64(png)))
    names = list(dict.fromkeys(name for name, _ in measured))
    rows = []
    for name in names:
        row = [name + (" (SD_PNG_COMPRESS_LEVEL)" if name == f"png level {default_level}" else "")]
        for size in sizes:
            seconds, size_bytes = measured[(name, size)]
            ref_s, ref_b = measured[("png level 6", size)]
            row += [
                ms(seconds),
                f"{seconds / ref_s:.2f}x",
                f"{size_bytes / 1024:,.0f} KB",
                f"{size_bytes / ref_b:.2f}x",
            ]
        rows.append(row)
    header = ["option"]
    for size in sizes:
        header += [f"time {size}", "vs 6", f"size {size}", "vs 6"]
    table(rows, header)
    # The level worth choosing is the one that minimises encode time plus transfer time of
    # the base64 text (4/3 of the bytes); print it for a few client bandwidths.
    size = sizes[-1]
    print(f"  fastest PNG level by encode + transfer of a {size}x{size} image:")
    for mbit in (10, 100, 1000):
        cost = {
            level: measured[(f"png level {level}", size)][0]
            + measured[(f"png level {level}", size)][1] * 4 / 3 * 8 / (mbit * 1e6)
            for level in range(10)
        }
        best = min(cost, key=cost.get)
        print(
            f"    at {mbit:>4} Mbit/s: level {best} ({ms(cost[best])}); level "
            f"{default_level}: {ms(cost[default_level])}; level 6: {ms(cost[6])}"
        )
    results["encoding"] = {
        f"{n} @{s}": {"seconds": t, "bytes": b} for (n, s), (t, b) in measured.items()
    }


# --------------------------------------------------------------------------------------------
# 4: cold start, in fresh processes.


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


def run_child(kind: str, args, env: dict | None = None, *extra: str) -> dict:
    launched = time.time()
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--model",
            str(args.model),
            "--device",
            args.device,
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{result.stderr[-3000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    if "started" in data:  # a cold-start child: make its clock times relative to the launch
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
    extra = ("--child-size", str(args.cold_size), "--child-steps", str(args.steps))
    extra += ("--child-steady", steady)
    runs = {"floor": [], **{name: [] for name in variants}}
    if not args.quick:
        run_child("floor", args)  # fills the page cache, so every timed run starts alike
    for _ in range(repeats):
        runs["floor"].append(run_child("floor", args))
        for name, env in variants.items():
            runs[name].append(run_child("handler", args, env, *extra))
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


COLD_STAGES = ["interpreter", "imports", "loading", "moving", "warmup", "ready"]


# --------------------------------------------------------------------------------------------
# 5: the real SD 1.5 architecture.


def ensure_sd15(folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        print(
            f"  building the SD 1.5 architecture with random weights in {folder} "
            "(about 2 GB; once)",
            flush=True,
        )
        subprocess.run(
            [sys.executable, "-m", "model_tools.build", "--arch", "sd15", "--out", str(folder)],
            cwd=REPO_ROOT,
            check=True,
        )
    return folder


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


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


# --------------------------------------------------------------------------------------------
# 6: peak memory per request.


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
    # Linux resets the peak-RSS counter (VmHWM) when "5" is written to clear_refs.
    Path("/proc/self/clear_refs").write_text("5")
    handler(request)
    return {"idle": idle, "peak": peak_rss(), "unit": "RSS"}


def rss() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


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
        data = run_child("memory", args, env, "--child-size", str(size), "--child-steps", "2")
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


# --------------------------------------------------------------------------------------------
# 7: each switch on vs off.


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


# --------------------------------------------------------------------------------------------


def section_sd15_cpu(args, results: dict) -> None:
    import bench_sd15_cpu  # this folder is on sys.path when the script runs

    size, steps = (64, 3) if args.quick else (512, args.sd15_cpu_steps)
    contenders = "stock,handler" if args.quick else "stock,handler,openvino"
    heading(f"8. full-size SD 1.5 on the CPU ({size}x{size}), stock vs handler vs OpenVINO")
    folder = args.sd15 if args.quick else ensure_sd15(args.sd15)
    results["sd15_cpu"] = bench_sd15_cpu.measure(folder, size, steps, 25, contenders.split(","))


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


def versions() -> str:
    import diffusers
    import PIL
    import torch
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}, "
        f"Pillow {PIL.__version__}"
    )


def main() -> None:
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument("--child-steady", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "floor":
            data = child_floor(str(args.model), args.device)
        elif args.child == "handler":
            data = child_handler(
                str(args.model), args.device, args.child_size, args.child_steps, args.child_steady
            )
        else:
            data = child_memory(str(args.model), args.device, args.child_size, args.child_steps)
        print(json.dumps(data))
        return

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
