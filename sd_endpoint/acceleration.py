"""Which numeric type and CPU set-up make this machine fast, detected rather than guessed.

bfloat16 halves memory everywhere, but it is only faster where the CPU multiplies bfloat16
matrices in hardware: Intel's AMX tiles (Sapphire Rapids and later, the `intel-spr` endpoint
instances) or the AVX-512 BF16 dot-product instructions. Elsewhere PyTorch emulates it, and a
bfloat16 matrix product ran ~100x slower than float32 on an AVX2-only AMD EPYC here.
"""

from __future__ import annotations

import json
import logging
import struct
from functools import cache
from math import prod
from pathlib import Path

import torch

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


def auto_cpu_dtype(model_dir: Path | None) -> torch.dtype:
    """SD_DTYPE=auto on a CPU: bfloat16 for a full-size model on a CPU with fast bfloat16."""
    if not cpu_has_fast_bfloat16():
        return torch.float32
    if model_dir is not None:
        try:
            parameters = unet_parameters(model_dir)
        except (OSError, ValueError, KeyError, struct.error):
            return torch.float32  # unreadable here; the loader reports the real problem
        if parameters < BFLOAT16_MIN_UNET_PARAMETERS:
            return torch.float32
    return torch.bfloat16


def warn_if_slow_bfloat16(dtype: torch.dtype, device: torch.device) -> None:
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bfloat16():
        log.warning(
            "SD_DTYPE=bfloat16 on a CPU without AMX or AVX-512 BF16: PyTorch emulates "
            "bfloat16 there, many times slower than float32 (SD_DTYPE=auto picks float32)"
        )
