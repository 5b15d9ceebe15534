"""What every measurement shares: the request, the handler and the bare pipeline built alike,
timing and interleaved rounds, tables, resident memory, versions, child processes.

torch and the endpoint are imported inside functions so that a cold-start child, which
imports this module, starts from a bare interpreter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
PROMPT = "a red circle on a white background"
SEED = 1234
SD15_DEFAULT_DIR = Path(tempfile.gettempdir()) / "sd15-random"


# --------------------------------------------------------------------------------------------
# The contenders, built alike.


def make_handler(model_dir: Path, **overrides):
    """handler.py's EndpointHandler for ``model_dir``, with settings from the environment and
    ``overrides`` (built as the runtime builds it: handler.py executed by file path)."""
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
    """One seeded call of a diffusers pipeline: the request every bare contender makes."""
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
    """The same request as ``bare_call``, as a request body for the handler."""
    return {
        "inputs": PROMPT,
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "seed": SEED,
    }


def ensure_sd15(folder: Path) -> Path:
    """SD 1.5's exact architecture with random weights in ``folder``, built there if missing."""
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


# --------------------------------------------------------------------------------------------
# Timing.


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


# --------------------------------------------------------------------------------------------
# Printing.


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def table(rows: list[list], header: list[str], numbers_right: bool = True) -> None:
    """``rows`` under ``header``, indented, in aligned columns: the first one left-aligned and,
    with ``numbers_right``, the others right-aligned."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i and numbers_right else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


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


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


# --------------------------------------------------------------------------------------------
# Resident memory of this process (Linux).


def rss() -> int:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Linux restarts the peak-RSS counter (VmHWM) from VmRSS when "5" is written here."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


# --------------------------------------------------------------------------------------------
# Child processes.


def run_child(module: str, *arguments: str, env: dict | None = None) -> dict:
    """``python -m module arguments`` in a fresh process at the repo root, with ``env`` added
    to this environment; the child prints its figures as JSON on its last line."""
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
    )
    if result.returncode != 0:
        command = " ".join(["python -m", module, *arguments])
        raise RuntimeError(f"{command} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
