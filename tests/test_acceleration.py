"""SD_DTYPE=auto: bfloat16 only where the CPU multiplies it in hardware and the model is
full-size; float32 for everything else. A seed gives the same image in either."""

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


def test_a_seed_gives_the_float32_image_in_bfloat16(repo_root, handler):
    """The starting noise is drawn in float32 whatever the dtype (torch 2.5 draws other numbers
    for a seed in bfloat16), so bfloat16 moves pixels by its rounding only."""
    from handler import EndpointHandler

    settings = dataclasses.replace(Settings(), dtype="bfloat16", warmup="")
    bfloat16 = EndpointHandler(str(repo_root), settings)
    for seed in (7, 8):
        request = {"inputs": "a red circle", "seed": seed, "num_inference_steps": 25}
        here = np.asarray(decode_image(bfloat16(request)["image"]), dtype=np.int16)
        there = np.asarray(decode_image(handler(request)["image"]), dtype=np.int16)
        difference = np.abs(here - there).mean()
        assert difference < 2, f"seed {seed}: mean difference {difference:.2f} of 255"
