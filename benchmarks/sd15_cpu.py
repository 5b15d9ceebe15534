"""Full-size SD 1.5 on a CPU: the stock float32 pipeline vs the handler's defaults vs OpenVINO.

    PYTHON scripts/bench_sd15_cpu.py --steps 3                                  # 512x512
    .venv/bin/python scripts/benchmark.py --sections 8                          # the same

The contenders: ``stock``, the diffusers pipeline in float32 as most handlers run it;
``handler``, handler.py with every setting at its default, on the folder prepared for CPU
serving where PYTHON has the ``openvino`` package (the folder's UNet and VAE decoder are then
exported once, model_tools.openvino_export, and served by OpenVINO at the warm-up size);
``float``, the handler on a folder prepared with ``--unet float`` (the UNet unquantized; a
sibling folder sharing the weights); ``pytorch``, the same handler on PyTorch alone
(``SD_OPENVINO=off``: a folder without the export); ``openvino``, optimum-intel's own OpenVINO
pipeline.

SD 1.5's exact architecture with random weights (model_tools.build --arch sd15; built once),
512x512, the same prompt and seed for every contender; any other model folder with --model.
Each contender runs in a fresh process of its own (so each one's peak RSS is its own): it
loads, warms up, then makes one request of ``--steps`` denoising steps, stamping the start of
every UNet call. A 25-step request is reported as its fixed costs (text encoding, first-step
set-up, VAE decode, PNG) plus the UNet calls its scheduler makes in 25 steps times the median
call, so a float32 run of 25 steps (minutes here) is not needed every time; ``--steps 25``
measures the whole request instead and prints the measured total beside it. Most schedulers
make one UNet call per step; PNDM (SD 1.5's own) makes one more, and a step is then reported
as 26/25 of a call (benchmarks/unet_calls.py says how each figure is derived).

OpenVINO (optimum-intel, the peer a CPU user would pick) runs in its own environment,
.venv-openvino (requirements-openvino.txt); it is reported as unavailable where that is
missing. Its export to OpenVINO IR is cached beside the model folder and timed on the first run.

A contender's process runs this module: ``python -m benchmarks.sd15_cpu --child NAME ...``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    PROMPT,
    REPO_ROOT,
    SD15_DEFAULT_DIR,
    SEED,
    bare_call,
    ensure_sd15,
    make_handler,
    peak_rss,
    reset_peak_rss,
    table,
)
from benchmarks.unet_calls import per_request, stamped_calls, timed_request

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
    """One seeded request of ``steps`` steps: the benchmark's bare call, for every contender."""
    return bare_call(pipe, size, steps, output_type)[0]


def _same_threads_as_the_handler() -> None:
    import torch

    if int(os.environ.get("SD_NUM_THREADS", "0")):
        torch.set_num_threads(int(os.environ["SD_NUM_THREADS"]))


def _measure_request(pipe, run, steps: int, target_steps: int) -> dict:
    """Peak RSS over loading and warm-up, then one timed request (``run``) of ``steps`` steps
    whose UNet calls are stamped, with its peak RSS."""
    load_peak = peak_rss()
    reset_peak_rss()
    with stamped_calls(pipe.unet) as stamps:
        timing = timed_request(run, stamps)
    # The scheduler that ran (the handler builds one per request) tells how many calls make
    # a step.
    return {
        **per_request(timing, pipe.scheduler, steps, target_steps),
        "peak_load": load_peak,
        "peak_request": peak_rss(),
    }


def child_stock(model: Path, size: int, steps: int, target_steps: int) -> dict:
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
    call = functools.partial(_request, pipe, size)

    # One short call first, as the handler warms up, so that the timed call pays no
    # first-call costs of the UNet; the decoder's (milliseconds in eager float32) stay in.
    call(1, "latent")
    result = _measure_request(pipe, lambda: call(steps), steps, target_steps)
    return {**result, "ready": ready, "dtype": "float32"}


def child_handler(model: Path, size: int, steps: int, target_steps: int, **overrides) -> dict:
    """handler.py as the runtime builds it, every setting at its default (SD_WARMUP=native):
    with OpenVINO where the folder carries an export and this Python has the package."""
    started = time.perf_counter()
    handler = make_handler(model, **overrides)
    ready = time.perf_counter() - started
    engine = handler.engine
    request = {"inputs": PROMPT, "width": size, "height": size, "seed": SEED}
    request["num_inference_steps"] = steps
    result = _measure_request(engine.pipe, lambda: handler(request), steps, target_steps)
    return {
        **result,
        "ready": ready,
        "startup": engine.startup_timings,
        "dtype": handler_path(engine),
        "settings": {k: v for k, v in vars(engine.settings).items() if k not in {"limits"}},
    }


def child_pytorch(model: Path, size: int, steps: int, target_steps: int) -> dict:
    """The handler's defaults on a folder without an OpenVINO export: PyTorch alone."""
    return child_handler(model, size, steps, target_steps, openvino="off")


def child_float(model: Path, size: int, steps: int, target_steps: int) -> dict:
    """The handler's defaults on the folder prepared for CPU with ``--unet float``: its
    weights shared with ``model``, its own export (float_folder)."""
    return child_handler(float_folder(model), size, steps, target_steps)


def float_folder(model: Path) -> Path:
    """A sibling of ``model`` whose entries link to its own, all but the OpenVINO export."""
    folder = model.with_name(model.name + "-float")
    folder.mkdir(exist_ok=True)
    for entry in model.iterdir():
        if entry.name != "openvino" and not (folder / entry.name).exists():
            (folder / entry.name).symlink_to(entry)
    return folder


def handler_path(engine) -> str:
    """What the handler's defaults chose here, such as "bfloat16, channels-last"."""
    parts = [str(engine.dtype).removeprefix("torch.")]
    if engine.openvino is not None:
        unet = "int8 UNet" if "int8" in engine.openvino.unet_weights else "UNet"
        parts = [f"OpenVINO {engine.openvino.precision} {unet} + VAE decoder", *parts]
    if engine.settings.channels_last:
        parts.append("channels-last")
    if engine.settings.compile != "off":
        parts.append(f"compiled ({engine.settings.compile}) at SD_WARMUP={engine.settings.warmup}")
    return ", ".join(parts)


def child_openvino(model: Path, size: int, steps: int, target_steps: int) -> dict:
    """optimum-intel's OVStableDiffusionPipeline, static shapes (its documented fast path)."""
    try:
        import openvino
        from optimum.intel import OVStableDiffusionPipeline
    except ImportError as exc:
        return {"unavailable": f"{exc.name or exc} is not installed in {sys.executable}"}

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
    # The handler's thread count (SD_NUM_THREADS), where one is set, for OpenVINO's runtime too.
    threads = int(os.environ.get("SD_NUM_THREADS", "0"))
    ov_config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    pipe = OVStableDiffusionPipeline.from_pretrained(exported, compile=False, ov_config=ov_config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter() - started
    call = functools.partial(_request, pipe, size)

    call(1, "latent")  # OpenVINO compiled every model already; this warms its caches
    result = _measure_request(pipe, lambda: call(steps), steps, target_steps)
    # What OpenVINO's CPU plugin computes in here: bf16 where the CPU has AMX, f32 elsewhere.
    precision = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    return {
        **result,
        "ready": ready,
        "export": export_seconds,
        "dtype": f"OpenVINO {openvino.__version__}, {precision}",
    }


CHILDREN = {
    "stock": child_stock,
    "handler": child_handler,
    "pytorch": child_pytorch,
    "float": child_float,
    "openvino": child_openvino,
}


# --------------------------------------------------------------------------------------------
# In the parent: every contender in turn, then the table.


def run_contender(name: str, model: Path, size: int, steps: int, target_steps: int) -> dict | str:
    """One contender's figures from a fresh process, or why there are none."""
    python = OPENVINO_PYTHON if name == "openvino" else Path(sys.executable)
    if not python.exists():
        return (
            f"unavailable: {python.parent.parent.name} missing (scripts/setup_env.sh "
            '.venv-openvino "" requirements-openvino.txt)'
        )
    command = [str(python), "-m", "benchmarks.sd15_cpu", "--child", name, "--model", str(model)]
    command += ["--size", str(size), "--steps", str(steps), "--target-steps", str(target_steps)]
    load_before = os.getloadavg()[0]
    # A CPU benchmark: the handler must not pick a GPU the machine may also have.
    environ = {**os.environ, "SD_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    # torch.compile's caches start empty, as on a fresh endpoint replica: a compile is timed
    # in full, never served from an earlier run's cache.
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environ)
    if result.returncode != 0:
        return f"failed: {result.stderr.strip().splitlines()[-1][:300] if result.stderr else ''}"
    data = json.loads(result.stdout.strip().splitlines()[-1])
    if "unavailable" in data:
        return f"unavailable: {data['unavailable']}"
    data["load_average"] = [load_before, os.getloadavg()[0]]
    return data


def startup(data: dict) -> str:
    """Seconds from nothing loaded to ready: the handler's includes its warm-up (and compiling
    where SD_COMPILE does), OpenVINO's its compile for static shapes, plus a one-off export
    where this run made it."""
    text = f"{data['ready']:.0f} s"
    if "startup" in data:
        text += f" (warm-up {data['startup']['warmup']:.0f} s)"
    if data.get("export"):
        text += f" + export {data['export']:.0f} s once"
    return text


def smallest_instance(peak_bytes: int) -> str:
    for vcpus in SPR_VCPUS:
        if peak_bytes * MEMORY_HEADROOM <= vcpus * GB_PER_VCPU:
            return f"x{vcpus} ({vcpus * 2} GB)"
    return "none (over 32 GB)"


def cpu_description() -> str:
    import torch

    from sd_endpoint.acceleration import cpu_has_fast_bfloat16

    name = platform.processor() or platform.machine()
    threads = int(os.environ.get("SD_NUM_THREADS", "0")) or torch.get_num_threads()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return (
        f"{name}, {os.cpu_count()} CPUs, {threads} threads per contender, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"fast bfloat16 (AMX / AVX-512 BF16): {'yes' if cpu_has_fast_bfloat16() else 'no'}"
    )


def ensure_openvino_export(model: Path, unet: str) -> None:
    """The folder prepared for CPU serving with a ``unet`` UNet, where this Python can: the
    handler then runs what a person who prepared the repository gets
    (model_tools.openvino_export, timed once)."""
    record = model / "openvino" / "export.json"
    if record.is_file():
        recorded = json.loads(record.read_text()).get("unet", "float")
        if ("float" if recorded == "float" else "int8") == unet:
            return
    needed = ["openvino", *(["nncf"] if unet == "int8" else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"  no {' or '.join(missing)} package in this Python (requirements-cpu.txt): "
            f"{model.name} stays unprepared, served by PyTorch alone",
            flush=True,
        )
        return
    started = time.perf_counter()
    command = [sys.executable, "-m", "model_tools.openvino_export", "--model-dir", str(model)]
    command += ["--unet", unet]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    print(
        f"  exported the {unet} UNet and the VAE decoder for OpenVINO in "
        f"{time.perf_counter() - started:.0f} s"
    )


def measure(model: Path, size: int, steps: int, target_steps: int, contenders) -> dict:
    """Every contender in turn on ``model``; prints the table and returns the figures."""
    ensure_sd15(model)
    if "handler" in contenders:
        ensure_openvino_export(model, "int8")
    if "float" in contenders:
        ensure_openvino_export(float_folder(model), "float")
    print(f"  {cpu_description()}")
    print(
        f"  {size}x{size}; each contender measured over {steps} steps in a fresh process; "
        f"a {target_steps}-step request = fixed costs + the UNet calls its scheduler makes in "
        f"{target_steps} steps x the median call",
        flush=True,
    )
    results = {}
    for name in contenders:
        results[name] = run_contender(name, model, size, steps, target_steps)
        summary = results[name]
        if isinstance(summary, dict):
            summary = (
                f"{summary['scheduler']}, {summary['unet_calls']} UNet calls in {steps} steps "
                f"({summary['target_unet_calls']} in {target_steps}): "
                f"{summary['unet_call_median']:.2f} s/call, {summary['step']:.2f} s/step, "
                f"{summary['estimate']:.1f} s"
            )
        print(f"  measured {name}: {summary}", flush=True)
    measured = {k: v for k, v in results.items() if isinstance(v, dict)}
    stock = measured.get("stock")
    header = [
        "contender",
        f"step (of {target_steps})",
        f"UNet calls ({steps} / {target_steps} steps)",
        "fixed",
        f"{target_steps} steps" + (" (measured)" if steps > 4 else ""),
        "vs stock",
        "start-up",
        "peak RSS load",
        "peak RSS request",
        "smallest intel-spr",
    ]
    rows = []
    for name, data in results.items():
        if not isinstance(data, dict):
            rows.append([name, data] + [""] * (len(header) - 2))
            continue
        peak = max(data["peak_load"], data["peak_request"])
        speedup = stock["estimate"] / data["estimate"] if stock else float("nan")
        data.update(peak=peak, instance=smallest_instance(peak), speedup=speedup)
        rows.append(
            [
                f"{name} ({data['dtype']})",
                f"{data['step']:.2f} s",
                f"{data['unet_calls']} / {data['target_unet_calls']}",
                f"{data['fixed']:.1f} s",
                f"{data['estimate']:.1f} s" + (f" ({data['total']:.1f})" if steps > 4 else ""),
                f"{speedup:.2f}x",
                startup(data),
                f"{data['peak_load'] / 1e9:.1f} GB",
                f"{data['peak_request'] / 1e9:.1f} GB",
                data["instance"],
            ]
        )
    table(rows, header, numbers_right=False)
    return {"cpu": cpu_description(), "size": size, "steps": steps, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SD15_DEFAULT_DIR)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="steps measured per contender")
    parser.add_argument("--target-steps", type=int, default=25)
    parser.add_argument("--contenders", default="stock,handler,float,pytorch,openvino")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model.resolve()
    if args.child:
        data = CHILDREN[args.child](model, args.size, args.steps, args.target_steps)
        print(json.dumps(data))
        return
    if args.steps < 3:
        parser.error("--steps must be at least 3 (two gaps between UNet calls give a median)")
    data = measure(model, args.size, args.steps, args.target_steps, args.contenders.split(","))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
