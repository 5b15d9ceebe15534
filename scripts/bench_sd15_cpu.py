"""Full-size SD 1.5 on a CPU: the stock float32 pipeline vs the handler's defaults vs OpenVINO.

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_sd15_cpu.py            # 512x512
    .venv/bin/python scripts/benchmark.py --sections 8                          # the same

SD 1.5's exact architecture with random weights (model_tools.build --arch sd15; built once),
512x512, the same prompt and seed for every contender. Each contender runs in a fresh process
of its own (so each one's peak RSS is its own): it loads, warms up, then makes one request of
``--steps`` denoising steps, stamping the start of every UNet call. A 25-step request is
reported as its fixed costs (text encoding, first-step set-up, VAE decode, PNG) plus 25 times
the median step, so a float32 run of 25 steps (minutes here) is not needed every time;
``--steps 25`` measures the whole request instead and prints the measured total beside it.

OpenVINO (optimum-intel, the peer a CPU user would pick) runs in its own environment,
.venv-openvino (requirements-openvino.txt); it is skipped with a note where that is missing.
Its export to OpenVINO IR is cached beside the model folder and timed on the first run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark import PROMPT, SEED, bare_call  # this folder is on sys.path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(tempfile.gettempdir()) / "sd15-random"
OPENVINO_PYTHON = REPO_ROOT / ".venv-openvino" / "bin" / "python"
# intel-spr instance sizes (vCPUs) on Inference Endpoints; each vCPU comes with 2 GB.
SPR_VCPUS = (1, 2, 4, 8, 16)
GB_PER_VCPU = 2e9
# Room kept free on an instance beside the measured peak: the server, the page cache of the
# weights file, a second request's buffers.
MEMORY_HEADROOM = 1.15


# --------------------------------------------------------------------------------------------
# In the child: one contender.


def _request(pipe, size: int, steps: int, output_type: str = "pil"):
    """One seeded request of ``steps`` steps: benchmark.py's bare call, for every contender."""
    return bare_call(pipe, size, steps, output_type)[0]


def _stamp_calls(module, stamps: list[float]) -> None:
    """Record when each call of ``module`` (a UNet: one call per guided step) starts."""
    cls = type(module)

    def __call__(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return cls.__call__(self, *args, **kwargs)

    module.__class__ = type(f"Stamped{cls.__name__}", (cls,), {"__call__": __call__})


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from VmRSS


def _timed_request(run, stamps: list[float], steps: int) -> dict:
    stamps.clear()
    started = time.perf_counter()
    run()
    total = time.perf_counter() - started
    if len(stamps) != steps:
        raise RuntimeError(f"expected {steps} UNet calls, saw {len(stamps)}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step = statistics.median(gaps)
    return {
        "total": total,
        "steps": steps,
        "step_median": step,
        "step_times": gaps,
        # Everything but the steps: text encoding and set-up before the first UNet call, the
        # VAE decode and the image after the last one.
        "fixed": total - sum(gaps) - step,
    }


def _same_threads_as_the_handler() -> None:
    import torch

    if int(os.environ.get("SD_NUM_THREADS", "0")):
        torch.set_num_threads(int(os.environ["SD_NUM_THREADS"]))


def child_stock(model: Path, size: int, steps: int) -> dict:
    """What the toolkit's default handler and typical handlers do: float32, no switches."""
    import torch
    from diffusers import StableDiffusionPipeline

    _same_threads_as_the_handler()

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter() - started
    stamps: list[float] = []
    _stamp_calls(pipe.unet, stamps)

    call = functools.partial(_request, pipe, size)

    # One short call first, as the handler warms up, so that the timed call pays no
    # first-call costs of the UNet; the decoder's (milliseconds in eager float32) stay in.
    call(1, "latent")
    load_peak = _status_bytes("VmHWM")
    _reset_peak_rss()
    result = _timed_request(lambda: call(steps), stamps, steps)
    return {
        **result,
        "ready": ready,
        "dtype": "float32",
        "peak_load": load_peak,
        "peak_request": _status_bytes("VmHWM"),
    }


def child_handler(model: Path, size: int, steps: int) -> dict:
    """handler.py as the runtime builds it, every setting at its default (SD_WARMUP=native)."""
    import importlib.util

    sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.spec_from_file_location("handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    started = time.perf_counter()
    handler = module.EndpointHandler(str(model))
    ready = time.perf_counter() - started
    engine = handler.engine
    stamps: list[float] = []
    _stamp_calls(engine.pipe.unet, stamps)
    request = {"inputs": PROMPT, "width": size, "height": size, "seed": SEED}
    request["num_inference_steps"] = steps
    load_peak = _status_bytes("VmHWM")
    _reset_peak_rss()
    result = _timed_request(lambda: handler(request), stamps, steps)
    return {
        **result,
        "ready": ready,
        "startup": engine.startup_timings,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "settings": {k: v for k, v in vars(engine.settings).items() if k not in {"limits"}},
        "peak_load": load_peak,
        "peak_request": _status_bytes("VmHWM"),
    }


def child_openvino(model: Path, size: int, steps: int) -> dict:
    """optimum-intel's OVStableDiffusionPipeline, static shapes (its documented fast path)."""
    from optimum.intel import OVStableDiffusionPipeline

    _same_threads_as_the_handler()

    exported = model.with_name(model.name + "-openvino")
    export_seconds = None
    if not (exported / "model_index.json").is_file():
        started = time.perf_counter()
        pipe = OVStableDiffusionPipeline.from_pretrained(model, export=True, compile=False)
        pipe.save_pretrained(exported)
        export_seconds = time.perf_counter() - started
        del pipe
    started = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(exported, compile=False)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter() - started
    stamps: list[float] = []
    _stamp_calls(pipe.unet, stamps)

    call = functools.partial(_request, pipe, size)

    call(1, "latent")  # OpenVINO compiled every model already; this warms its caches
    load_peak = _status_bytes("VmHWM")
    _reset_peak_rss()
    result = _timed_request(lambda: call(steps), stamps, steps)
    import openvino

    # What OpenVINO's CPU plugin computes in here: bf16 where the CPU has AMX, f32 elsewhere.
    precision = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    return {
        **result,
        "ready": ready,
        "export": export_seconds,
        "dtype": f"OpenVINO {openvino.__version__}, {precision}",
        "peak_load": load_peak,
        "peak_request": _status_bytes("VmHWM"),
    }


CHILDREN = {"stock": child_stock, "handler": child_handler, "openvino": child_openvino}


# --------------------------------------------------------------------------------------------
# In the parent: every contender in turn, then the table.


def run_contender(name: str, model: Path, size: int, steps: int) -> dict | str:
    python = OPENVINO_PYTHON if name == "openvino" else Path(sys.executable)
    if not python.exists():
        return (
            f"skipped: {python.parent.parent.name} missing (scripts/setup_env.sh "
            '.venv-openvino "" requirements-openvino.txt)'
        )
    command = [str(python), __file__, "--child", name, "--model", str(model)]
    command += ["--size", str(size), "--steps", str(steps)]
    load_before = os.getloadavg()[0]
    # A CPU benchmark: the handler must not pick a GPU the machine may also have.
    environ = {**os.environ, "SD_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environ)
    if result.returncode != 0:
        return f"failed: {result.stderr.strip().splitlines()[-1][:300] if result.stderr else ''}"
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data["load_average"] = [load_before, os.getloadavg()[0]]
    return data


def smallest_instance(peak_bytes: int) -> str:
    for vcpus in SPR_VCPUS:
        if peak_bytes * MEMORY_HEADROOM <= vcpus * GB_PER_VCPU:
            return f"x{vcpus} ({vcpus * 2} GB)"
    return "none (over 32 GB)"


def cpu_description() -> str:
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    from sd_endpoint.acceleration import cpu_has_fast_bfloat16

    return (
        f"{name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"fast bfloat16 (AMX / AVX-512 BF16): {'yes' if cpu_has_fast_bfloat16() else 'no'}"
    )


def measure(model: Path, size: int, steps: int, target_steps: int, contenders) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    if not (model / "model_index.json").is_file():
        print(f"  building SD 1.5's architecture with random weights in {model} (once)")
        subprocess.run(
            [sys.executable, "-m", "model_tools.build", "--arch", "sd15", "--out", str(model)],
            cwd=REPO_ROOT,
            check=True,
        )
    print(f"  {cpu_description()}")
    print(
        f"  {size}x{size}; each contender measured over {steps} steps in a fresh process; "
        f"a {target_steps}-step request = fixed costs + {target_steps} x median step",
        flush=True,
    )
    results = {}
    for name in contenders:
        results[name] = run_contender(name, model, size, steps)
        summary = results[name]
        if isinstance(summary, dict):
            summary["estimate"] = summary["fixed"] + target_steps * summary["step_median"]
            summary = f"{summary['step_median']:.2f} s/step, {summary['estimate']:.1f} s"
        print(f"  measured {name}: {summary}", flush=True)
    measured = {k: v for k, v in results.items() if isinstance(v, dict)}
    stock = measured.get("stock")
    rows = []
    for name, data in results.items():
        if not isinstance(data, dict):
            rows.append([name, data, "", "", "", "", "", ""])
            continue
        peak = max(data["peak_load"], data["peak_request"])
        speedup = stock["estimate"] / data["estimate"] if stock else float("nan")
        data.update(peak=peak, instance=smallest_instance(peak), speedup=speedup)
        rows.append(
            [
                f"{name} ({data['dtype']})",
                f"{data['step_median']:.2f} s",
                f"{data['fixed']:.1f} s",
                f"{data['estimate']:.1f} s" + (f" ({data['total']:.1f})" if steps > 4 else ""),
                f"{speedup:.2f}x",
                f"{data['peak_load'] / 1e9:.1f} GB",
                f"{data['peak_request'] / 1e9:.1f} GB",
                data["instance"],
            ]
        )
    _table(
        rows,
        [
            "contender",
            "step (median)",
            "fixed",
            f"{target_steps} steps" + (" (measured)" if steps > 4 else ""),
            "vs stock",
            "peak RSS load",
            "peak RSS request",
            "smallest intel-spr",
        ],
    )
    return {"cpu": cpu_description(), "size": size, "steps": steps, "results": results}


def _table(rows, header) -> None:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="steps measured per contender")
    parser.add_argument("--target-steps", type=int, default=25)
    parser.add_argument("--contenders", default="stock,handler,openvino")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.model, args.size, args.steps)))
        return
    if args.steps < 3:
        parser.error("--steps must be at least 3 (two step gaps give a median)")
    data = measure(args.model, args.size, args.steps, args.target_steps, args.contenders.split(","))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
