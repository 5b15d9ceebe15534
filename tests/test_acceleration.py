"""SD_DTYPE=auto and SD_COMPILE=auto: bfloat16, and compiling with frozen weights, only where
the CPU multiplies bfloat16 in hardware and the model is full-size; float32 and eager execution,
as before, for everything else."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from sd_endpoint import acceleration
from sd_endpoint.engine import resolve_dtype
from sd_endpoint.settings import Settings
from tests.conftest import decode_image

CPU = torch.device("cpu")


def cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}


def write_header_only_unet(folder: Path, parameters: int) -> Path:
    """A UNet folder whose safetensors header declares ``parameters`` weights (no data: the
    dtype rule reads headers only, so a full-size model costs nothing to fake)."""
    (folder / "unet").mkdir(parents=True)
    header = json.dumps(
        {"w": {"dtype": "F16", "shape": [parameters], "data_offsets": [0, 2 * parameters]}}
    ).encode()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header
    )
    return folder


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc/cpuinfo")
def test_fast_bfloat16_detection_agrees_with_the_cpu_flags():
    expected = any(flag in cpuinfo_flags() for flag in acceleration.FAST_BFLOAT16_FLAGS)
    assert acceleration.cpu_has_fast_bfloat16() is expected


def test_parameter_count_from_the_headers_matches_the_loaded_unet(repo_root):
    unet = UNet2DConditionModel.from_pretrained(repo_root, subfolder="unet")
    assert acceleration.unet_parameters(repo_root) == sum(p.numel() for p in unet.parameters())


def test_auto_is_float32_on_a_cpu_without_fast_bfloat16(tmp_path, monkeypatch):
    monkeypatch.setattr(acceleration, "cpu_has_fast_bfloat16", lambda: False)
    full_size = write_header_only_unet(tmp_path, 860_000_000)
    assert resolve_dtype("auto", CPU, full_size) == torch.float32


def test_auto_is_bfloat16_only_for_a_full_size_model_on_a_fast_bfloat16_cpu(
    tmp_path, monkeypatch, repo_root
):
    # The probe is replaced only because this CPU may lack AMX; the rule under test is real.
    monkeypatch.setattr(acceleration, "cpu_has_fast_bfloat16", lambda: True)
    full_size = write_header_only_unet(tmp_path / "sd15", 860_000_000)
    assert resolve_dtype("auto", CPU, full_size) == torch.bfloat16
    assert resolve_dtype("auto", CPU, repo_root) == torch.float32, "the shipped model is small"
    assert resolve_dtype("float32", CPU, full_size) == torch.float32, "an explicit choice wins"
    unreadable = tmp_path / "broken"
    (unreadable / "unet").mkdir(parents=True)
    (unreadable / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x01")
    assert resolve_dtype("auto", CPU, unreadable) == torch.float32


def test_cuda_auto_stays_float16():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


def auto_settings(**overrides) -> Settings:
    return dataclasses.replace(Settings(), **overrides)


@pytest.fixture
def fast_bfloat16_cpu(monkeypatch):
    """A CPU with AMX or AVX-512 BF16 and a C++ compiler, whatever this machine has: only the
    probes are replaced, the rule under test is real."""
    monkeypatch.setattr(acceleration, "cpu_has_fast_bfloat16", lambda: True)
    monkeypatch.setattr(acceleration, "cpp_compiler", lambda: "/usr/bin/g++")


def test_compile_is_auto_by_default_and_auto_needs_no_warm_up_sizes():
    assert Settings().compile == "auto"
    assert Settings.from_env({"SD_WARMUP": ""}).compile == "auto"


def test_auto_compiles_a_full_size_bfloat16_model_on_a_fast_bfloat16_cpu(
    tmp_path, fast_bfloat16_cpu
):
    full_size = write_header_only_unet(tmp_path, 860_000_000)
    settings = auto_settings()
    assert acceleration.resolve_compile(settings, CPU, torch.bfloat16, full_size) == "default"


def test_auto_compiles_nothing_anywhere_else(tmp_path, monkeypatch, fast_bfloat16_cpu, repo_root):
    full_size = write_header_only_unet(tmp_path, 860_000_000)
    settings = auto_settings()
    resolve = acceleration.resolve_compile
    assert resolve(settings, CPU, torch.bfloat16, repo_root) == "off", "the shipped model is small"
    assert resolve(settings, CPU, torch.float32, full_size) == "off", "float32 was not measured"
    assert resolve(settings, torch.device("cuda"), torch.float16, full_size) == "off"
    assert resolve(auto_settings(warmup=""), CPU, torch.bfloat16, full_size) == "off"
    monkeypatch.setattr(acceleration, "cpp_compiler", lambda: None)
    assert resolve(settings, CPU, torch.bfloat16, full_size) == "off", (
        "Inductor needs a C++ compiler"
    )
    monkeypatch.setattr(acceleration, "cpu_has_fast_bfloat16", lambda: False)
    assert resolve(settings, CPU, torch.bfloat16, full_size) == "off"


def test_an_explicit_compile_mode_is_kept_as_asked(tmp_path, repo_root):
    for mode in ("off", "default", "max-autotune"):
        settings = auto_settings(compile=mode, warmup="native")
        assert acceleration.resolve_compile(settings, CPU, torch.float32, repo_root) == mode


def test_cpu_compiling_freezes_the_weights_and_gpu_compiling_keeps_the_mode():
    cpu = acceleration.compile_arguments("max-autotune", CPU)
    assert cpu["dynamic"] is False and cpu["options"]["freezing"] is True
    assert cpu["options"]["max_autotune"] is True, "the mode's own options stay"
    assert acceleration.compile_arguments("default", CPU)["options"] == {"freezing": True}
    gpu = acceleration.compile_arguments("reduce-overhead", torch.device("cuda"))
    assert gpu == {"mode": "reduce-overhead", "dynamic": False}


def test_the_shipped_model_runs_uncompiled_with_every_default(handler):
    assert handler.engine.settings.compile == "auto"
    assert handler.engine.compile_mode == "off"


def test_a_seed_gives_the_float32_image_in_bfloat16(repo_root, handler):
    """The starting noise is drawn in float32 whatever the dtype (torch 2.5 draws other numbers
    for a seed in bfloat16), so bfloat16 moves pixels by its rounding only."""
    from handler import EndpointHandler

    bfloat16 = EndpointHandler(str(repo_root), auto_settings(dtype="bfloat16", warmup=""))
    for seed in (7, 8):
        request = {"inputs": "a red circle", "seed": seed, "num_inference_steps": 25}
        here = np.asarray(decode_image(bfloat16(request)["image"]), dtype=np.int16)
        there = np.asarray(decode_image(handler(request)["image"]), dtype=np.int16)
        difference = np.abs(here - there).mean()
        assert difference < 2, f"seed {seed}: mean difference {difference:.2f} of 255"
