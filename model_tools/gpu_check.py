"""The one prepared GPU check: GPU-marked tests, then full-size SD 1.5 and SDXL in float16.

    scripts/gpu_check.sh [OUT_DIR]        # installs diffusers/pydantic from .gpu-wheels/ first

Each workload is a model family's exact architecture with random weights, at the size and
steps people use it at: SD 1.5 (model_tools.build --arch sd15) at 512x512, 25 steps; SDXL base
(a random original-layout single file, imported by model_tools.importer as a user's would be)
at 1024x1024, 30 steps. The same prompt and seed for each contender, one contender after
another in this process (each freed before the next):
- stock: the family's diffusers pipeline in float16, eager, diffusers' default attention (SDPA);
- stock + fused QKV + channels-last: the eager switches a diffusers user can flip;
- handler: handler.py with its defaults;
- handler SD_COMPILE=<mode>: each torch.compile mode, compiled at 512x512 during warm-up
  ("reduce-overhead" adds CUDA graphs).
Per contender: seconds per image end to end (median of a few), steps/s of the denoising loop
(output_type="latent" calls for the stock pipeline, the handler's own stage timer for the
handler), load/compile/warm-up time, peak GPU memory. Then an out-of-memory check: with most
of the GPU taken, a request too large must fail with the handler's clear error, and the next
one succeed. For SDXL also the two ways of never decoding a black image with a VAE that
overflows float16: decode in float32 always (the handler, for a VAE whose config says
`force_upcast`), or decode in float16, check, and decode again in float32 on overflow (the
handler, for the others). A deadline (default 9 minutes) skips what would not fit, saying so
in the JSON. Without CUDA it stops before the first CUDA call, saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a white background"
SEED = 1234
COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    size: int
    steps: int
    goal_s: float  # seconds per image the best handler setting should reach on an H100
    needed: dict  # contender kind -> seconds that must be left before the deadline to start it


WORKLOADS = {
    "sd15": Workload("sd15", 512, 25, 0.30, {"stock": 30, "handler": 30, "compile": 150}),
    "sdxl": Workload("sdxl", 1024, 30, 1.2, {"stock": 60, "handler": 60, "compile": 240}),
}
NEEDED_OOM = 20
NEEDED_VAE = 30


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def allows(self, seconds: float) -> bool:
        return time.monotonic() + seconds < self.end


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def run_tests() -> dict:
    """The GPU-marked tests, on the shipped model."""
    files = [str(p) for p in sorted((REPO_ROOT / "tests").glob("test_*.py"))]
    files = [f for f in files if "pytest.mark.gpu" in Path(f).read_text()]
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    tail = result.stdout.strip().splitlines()[-1:] or result.stderr.strip().splitlines()[-1:]
    return {
        "files": [Path(f).name for f in files],
        "returncode": result.returncode,
        "summary": tail[0] if tail else "",
        "seconds": round(time.perf_counter() - started, 1),
        "output_tail": (result.stdout + result.stderr)[-2000:] if result.returncode else "",
    }


def ensure_model(folder: Path, workload: Workload) -> Path:
    if (folder / "model_index.json").is_file():
        return folder
    python = [sys.executable, "-m"]
    if workload.name == "sd15":
        commands = [[*python, "model_tools.build", "--arch", "sd15", "--out", str(folder)]]
    else:
        single = folder.with_suffix(".safetensors")
        commands = [
            [*python, "model_tools.single_file", "random", "--family", "sdxl-base"]
            + ["--out", str(single)],
            [*python, "model_tools.importer", str(single), "--out", str(folder)]
            + ["--dtype", "float16", "--skip-check"],
        ]
    for command in commands:
        subprocess.run(command, cwd=REPO_ROOT, check=True)
    return folder


def stock_pipeline(model: Path, fused: bool):
    from sd_endpoint import families
    from sd_endpoint.engine import _dtype_argument

    family = families.detect(model)
    pipe = family.pipeline_class.from_pretrained(
        model, **family.load_options, **_dtype_argument(torch.float16)
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    if fused:
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def measure_stock(model: Path, workload: Workload, fused: bool, repeats: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipe = stock_pipeline(model, fused)
    torch.cuda.synchronize()
    ready = time.perf_counter() - started

    def call(output_type: str):
        return pipe(
            PROMPT,
            height=workload.size,
            width=workload.size,
            num_inference_steps=workload.steps,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type=output_type,
        ).images

    warm = timed(lambda: call("pil"))
    images = [timed(lambda: call("pil")) for _ in range(repeats)]
    loops = [timed(lambda: call("latent")) for _ in range(repeats)]
    figures = {
        "ready_s": round(ready, 2),
        "first_call_s": round(warm, 3),
        "s_per_image": round(statistics.median(images), 4),
        "steps_per_s": round(workload.steps / statistics.median(loops), 2),
        "peak_gpu_memory_gib": gib(torch.cuda.max_memory_allocated()),
    }
    return figures  # the pipeline goes with this frame: free_memory() then releases it


def make_handler(model: Path, **overrides):
    import importlib.util

    from sd_endpoint.settings import Settings

    spec = importlib.util.spec_from_file_location("handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = dataclasses.replace(Settings.from_env(), **overrides)
    return module.EndpointHandler(str(model), settings)


def measure_handler(model: Path, workload: Workload, repeats: int, **overrides) -> dict:
    size = workload.size
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    handler = make_handler(model, warmup=f"{size}x{size}", **overrides)
    torch.cuda.synchronize()
    ready = time.perf_counter() - started
    request = {"inputs": PROMPT, "width": size, "height": size, "seed": SEED}
    request["num_inference_steps"] = workload.steps
    images, loops = [], []
    for _ in range(repeats):
        images.append(timed(lambda: handler(request)))
        loops.append(handler.last_timings["denoising"])
    figures = {
        "ready_s": round(ready, 2),
        "warmup_incl_compile_s": round(handler.engine.startup_timings["warmup"], 2),
        "s_per_image": round(statistics.median(images), 4),
        "steps_per_s": round(workload.steps / statistics.median(loops), 2),
        "peak_gpu_memory_gib": gib(torch.cuda.max_memory_allocated()),
        "settings": {k: v for k, v in overrides.items()},
    }
    return figures


def out_of_memory_check(model: Path) -> dict:
    """Most of the GPU taken by another tensor: a big request fails cleanly, the next works."""
    from sd_endpoint.engine import InsufficientMemoryError

    handler = make_handler(model, warmup="")
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(free - 2**30, 0), dtype=torch.uint8, device="cuda")
    big = {"inputs": PROMPT, "width": 1024, "height": 1024, "seed": SEED}
    big.update(num_inference_steps=2, num_images_per_prompt=4)
    outcome = {"free_gib_left": gib(torch.cuda.mem_get_info()[0])}
    try:
        handler(big)
        outcome["big_request"] = "succeeded (did not run out of memory)"
    except InsufficientMemoryError as exc:
        outcome["big_request"] = f"InsufficientMemoryError: {exc}"
    except Exception as exc:  # anything else is a failure of the check
        outcome["big_request"] = f"UNEXPECTED {type(exc).__name__}: {exc}"
    del filler
    gc.collect()
    torch.cuda.empty_cache()
    small = {"inputs": PROMPT, "width": 512, "height": 512, "seed": SEED}
    small["num_inference_steps"] = 4
    try:
        handler(small)
        outcome["next_request"] = "succeeded"
    except Exception as exc:
        outcome["next_request"] = f"FAILED {type(exc).__name__}: {exc}"
    outcome["passed"] = (
        outcome["big_request"].startswith("InsufficientMemoryError")
        and outcome["next_request"] == "succeeded"
    )
    del handler
    return outcome


def vae_decode_costs(model: Path, size: int, repeats: int) -> dict:
    """Seconds per image of a float32 decode and of a float16 decode with its finite check.

    Decoding in float16 and again in float32 on overflow costs fp16 + share x fp32 per image,
    decoding in float32 always costs fp32: the float16 way is cheaper only while the share of
    images that overflow stays under (fp32 - fp16) / fp32. (Random weights: whether these
    latents overflow says nothing; the timings are the real ones.)
    """
    from diffusers import AutoencoderKL

    from sd_endpoint.engine import decode_latents

    vae = AutoencoderKL.from_pretrained(
        model / "vae", torch_dtype=torch.float16, local_files_only=True
    ).to("cuda")
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator).to("cuda")

    def decode() -> None:
        decode_latents(vae, latents)[1].item()  # the finite check read, as the handler reads it

    def seconds() -> float:
        decode()
        return statistics.median(timed(decode) for _ in range(repeats))

    torch.cuda.reset_peak_memory_stats()
    fp16 = seconds()
    fp16_memory = torch.cuda.max_memory_allocated()
    vae.float()
    torch.cuda.reset_peak_memory_stats()
    fp32 = seconds()
    return {
        "size": size,
        "float16_decode_and_check_s": round(fp16, 4),
        "float32_decode_s": round(fp32, 4),
        "float16_peak_gpu_memory_gib": gib(fp16_memory),
        "float32_peak_gpu_memory_gib": gib(torch.cuda.max_memory_allocated()),
        "float16_then_float32_cheaper_below_overflow_share": round((fp32 - fp16) / fp32, 3),
    }


def attempt(run, *args) -> dict | str:
    """``run(*args)``'s figures, or what made it fail: one failure never ends the whole check."""
    try:
        return run(*args)
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc)[:500]}"


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def run_workload(workload: Workload, model: Path, repeats: int, deadline: Deadline, save) -> dict:
    """Every contender on one workload; the figures, with each one's speed-up over stock."""
    report: dict = {"size": workload.size, "steps": workload.steps}
    started = time.perf_counter()
    model = ensure_model(model, workload)
    report["model_build_s"] = round(time.perf_counter() - started, 1)
    contenders = [
        ("stock eager", "stock", lambda: measure_stock(model, workload, False, repeats)),
        (
            "stock + fused QKV + channels-last",
            "stock",
            lambda: measure_stock(model, workload, True, repeats),
        ),
        ("handler (defaults)", "handler", lambda: measure_handler(model, workload, repeats)),
    ]
    for mode in COMPILE_MODES:
        contenders.append(
            (
                f"handler SD_COMPILE={mode}",
                "compile",
                lambda mode=mode: measure_handler(model, workload, repeats, compile=mode),
            )
        )
    results = report["contenders"] = {}
    for name, kind, run in contenders:
        if not deadline.allows(workload.needed[kind]):
            results[name] = "skipped: would pass the deadline"
            continue
        results[name] = attempt(run)
        free_memory()
        print(f"  {workload.name} {name}: {results[name]}", flush=True)
        save()
    stock = results.get("stock eager")
    if isinstance(stock, dict):
        for data in results.values():
            if isinstance(data, dict):
                data["speedup_vs_stock"] = round(stock["s_per_image"] / data["s_per_image"], 2)
    measured = [d for d in results.values() if isinstance(d, dict) and "settings" in d]
    if measured:
        best = min(measured, key=lambda d: d["s_per_image"])
        report["goal"] = {
            "best_handler_s_per_image": best["s_per_image"],
            f"at_most_{workload.goal_s}_s_on_an_h100": best["s_per_image"] <= workload.goal_s,
            "at_least_2x_stock": best.get("speedup_vs_stock", 0) >= 2,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--models",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="folder for the random full-size models (built once, reused)",
    )
    parser.add_argument(
        "--workloads", default="sd15,sdxl", help="comma-separated: " + ", ".join(WORKLOADS)
    )
    parser.add_argument("--minutes", type=float, default=9.0, help="deadline for everything")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    workloads = [WORKLOADS[name] for name in args.workloads.split(",") if name]
    deadline = Deadline(args.minutes * 60)
    sys.path.insert(0, str(REPO_ROOT))
    import diffusers
    import transformers

    import handler  # noqa: F401  (the endpoint imports: the carried wheels work)

    report: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if not torch.cuda.is_available():
        report["cuda"] = False
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"no CUDA device: imports work ({report}); nothing measured. Wrote {args.out}")
        return
    report.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    print(f"GPU check on {report['gpu']}", flush=True)

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    if not args.skip_tests:
        try:
            report["tests"] = run_tests()
        except subprocess.TimeoutExpired:
            report["tests"] = {"summary": "timed out after 240 s"}
        print(f"  tests: {report['tests']['summary']}", flush=True)
        save()
    for workload in workloads:
        model = args.models / f"{workload.name}-random"
        report[workload.name] = run_workload(workload, model, args.repeats, deadline, save)
        save()
        if workload.name == "sdxl":  # the VAE that overflows float16 is SDXL's
            costs = "skipped: would pass the deadline"
            if deadline.allows(NEEDED_VAE):
                costs = attempt(vae_decode_costs, model, workload.size, args.repeats)
                free_memory()
            report["sdxl"]["vae_decode"] = costs
            print(f"  sdxl VAE decode: {costs}", flush=True)
            save()
    model = args.models / f"{workloads[0].name}-random" if workloads else None
    if model is not None and deadline.allows(NEEDED_OOM):
        report["out_of_memory"] = out_of_memory_check(model)
    else:
        report["out_of_memory"] = "skipped: would pass the deadline"
    save()
    print(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
