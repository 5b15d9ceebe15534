"""Which numeric type and CPU set-up make this machine fast, detected rather than guessed.

bfloat16 halves memory everywhere, but it is only faster where the CPU multiplies bfloat16
matrices in hardware: Intel's AMX tiles (Sapphire Rapids and later, the `intel-spr` endpoint
instances) or the AVX-512 BF16 dot-product instructions. Elsewhere PyTorch emulates it, and a
bfloat16 matrix product ran ~100x slower than float32 on an AVX2-only AMD EPYC here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from functools import cache
from math import prod
from pathlib import Path

import torch

from .settings import Settings

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of hardware bfloat16 matrix arithmetic.
FAST_BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")
# A UNet below this many parameters is bound by per-operator overhead, not by matrix work, so
# bfloat16 has little to win there and costs a conversion per operator; it also keeps the small
# shipped model, and the test suite that serves it, in float32 on every CPU. SD 1.x/2.x UNets
# have ~860M parameters, the shipped model ~4M.
BFLOAT16_MIN_UNET_PARAMETERS = 100_000_000


@cache
def cpu_has_fast_bfloat16() -> bool:
    """True where the CPU has AMX or AVX-512 BF16, as PyTorch's own CPU probe reports it."""
    probes = [getattr(torch.cpu, name, None) for name in _TORCH_PROBES]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    # Older torch has no probe: read the kernel's CPU flags instead.
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in FAST_BFLOAT16_FLAGS)


_TORCH_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def unet_parameters(model_dir: Path) -> int:
    """Parameters of the folder's UNet, counted from the safetensors headers (nothing loaded)."""
    total = 0
    files = sorted((model_dir / "unet").glob("*.safetensors"))
    # A folder may hold both full and fp16 variants of the same weights: count one of them.
    plain = [f for f in files if ".fp16." not in f.name] or files
    for file in plain:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def is_full_size(model_dir: Path | None) -> bool:
    """True for a UNet of SD 1.x/2.x size or more; no folder counts as full size."""
    if model_dir is None:
        return True
    try:
        parameters = unet_parameters(model_dir)
    except (OSError, ValueError, KeyError, struct.error):
        return False  # unreadable here; the loader reports the real problem
    return parameters >= BFLOAT16_MIN_UNET_PARAMETERS


def auto_cpu_dtype(model_dir: Path | None) -> torch.dtype:
    """SD_DTYPE=auto on a CPU: bfloat16 for a full-size model on a CPU with fast bfloat16."""
    if cpu_has_fast_bfloat16() and is_full_size(model_dir):
        return torch.bfloat16
    return torch.float32


def warn_if_slow_bfloat16(dtype: torch.dtype, device: torch.device) -> None:
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bfloat16():
        log.warning(
            "SD_DTYPE=bfloat16 on a CPU without AMX or AVX-512 BF16: PyTorch emulates "
            "bfloat16 there, many times slower than float32 (SD_DTYPE=auto picks float32)"
        )


def compile_arguments(mode: str, device: torch.device) -> dict:
    """torch.compile's keyword arguments for SD_COMPILE=``mode`` on ``device``.

    Shapes are static: compiled code serves only the warm-up sizes it was compiled for. On a
    CPU, Inductor also freezes the weights: it takes them as constants, so convolutions and
    linear layers get their weights packed into oneDNN's blocked layout once, at compile time,
    instead of reordered on every call.
    """
    if device.type != "cpu":
        return {"mode": mode, "dynamic": False}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(mode), "freezing": True}, "dynamic": False}


def resolve_compile(
    settings: Settings, device: torch.device, dtype: torch.dtype, model_dir: Path | None
) -> str:
    """The torch.compile mode to use, ``off`` for none; SD_COMPILE=auto decided here.

    ``auto`` compiles where it was measured to pay for its start-up time: a full-size model in
    bfloat16 on a CPU with fast bfloat16, given warm-up sizes to compile at and a C++ compiler
    for Inductor's kernels. Everywhere else (GPUs, float32, the small shipped model) it stays
    off, as it always was.
    """
    if settings.compile != "auto":
        return settings.compile
    if not (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and cpu_has_fast_bfloat16()
        and is_full_size(model_dir)
        and settings.warmup_sizes()
    ):
        return "off"
    if not cpp_compiler():
        log.warning(
            "SD_COMPILE=auto: no C++ compiler found (g++, c++ or $CXX), which torch.compile "
            "needs on a CPU; running uncompiled"
        )
        return "off"
    log.info(
        "SD_COMPILE=auto: compiling the UNet and VAE decoder with frozen weights at the "
        "SD_WARMUP sizes (full-size model, bfloat16 on a CPU with fast bfloat16)"
    )
    return "default"


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would build CPU kernels with, if one is on the PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((found for name in names if (found := shutil.which(name))), None)
