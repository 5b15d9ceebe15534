"""The speed switches: each gives a valid image, the same one as the default path where it
should, and the benchmark command runs. Speed itself is measured by scripts/benchmark.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from sd_endpoint.settings import Settings
from tests.conftest import decode_image

SMALL = {"inputs": "a red circle", "seed": 7, "inference_steps": 3}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def build(repo_root, **overrides):
    from handler import EndpointHandler

    return EndpointHandler(str(repo_root), dataclasses.replace(Settings(), **overrides))


def pixels(response) -> np.ndarray:
    return np.asarray(decode_image(response["image"]), dtype=np.int16)


@pytest.fixture(scope="module")
def plain(repo_root):
    """Every switch off: the stock diffusers execution of the same model."""
    return build(repo_root, channels_last=False, warmup="")


def test_channels_last_gives_the_plain_layout_image(handler, plain):
    assert handler.engine.settings.channels_last, "channels_last is the measured default"
    weight = next(p for p in handler.engine.pipe.unet.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    request = {**SMALL, "width": 96, "height": 64}
    here, there = pixels(handler(request)), pixels(plain(request))
    assert here.shape == (64, 96, 3)
    # Same arithmetic in another memory order: equal up to float rounding of the last bit.
    assert np.abs(here - there).max() <= 2


def test_channels_last_in_bfloat16_gives_the_plain_layout_image(repo_root):
    """bfloat16 is the default on CPUs with AMX or AVX-512 BF16, channels-last with it."""
    with_cl = build(repo_root, dtype="bfloat16", warmup="")
    without = build(repo_root, dtype="bfloat16", channels_last=False, warmup="")
    for seed in (7, 9):
        request = {**SMALL, "seed": seed, "inference_steps": 25}
        difference = np.abs(pixels(with_cl(request)) - pixels(without(request)))
        # bfloat16 keeps 8 bits of mantissa, so another summation order moves a few pixels by
        # more than float32 does; on average they stay within a level or two.
        assert difference.mean() < 3, f"seed {seed}: mean difference {difference.mean():.2f}"


def test_vae_tiles_only_above_the_pixel_threshold(repo_root, plain):
    tiled = build(repo_root, vae_tile_above_pixels=64 * 64, channels_last=False, warmup="")
    decoder_calls = []
    tiled.engine.pipe.vae.decoder.register_forward_hook(lambda *a: decoder_calls.append(1))

    at_threshold = tiled({**SMALL, "width": 64, "height": 64})
    assert len(decoder_calls) == 1, "an image at the threshold is decoded whole"
    assert np.array_equal(pixels(at_threshold), pixels(plain({**SMALL, "width": 64, "height": 64})))

    decoder_calls.clear()
    request = {**SMALL, "width": 128, "height": 128}
    above = pixels(tiled(request))
    assert len(decoder_calls) > 1, "an image above the threshold is decoded tile by tile"
    assert above.shape == (128, 128, 3)
    # Tiles overlap and are blended, so only pixels near the seams may differ noticeably.
    assert np.abs(above - pixels(plain(request))).mean() < 20


def test_warm_up_runs_each_listed_size_before_the_first_request(repo_root, caplog):
    with caplog.at_level(logging.INFO, logger="sd_endpoint.engine"):
        warmed = build(repo_root, warmup="native, 96x64")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warmed up")]
    assert [line.split(" in ")[0] for line in lines] == ["warmed up at 64x64", "warmed up at 96x64"]
    assert warmed.engine.startup_timings["warmup"] > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sd_endpoint.engine"):
        build(repo_root, warmup="")
    assert not [r for r in caplog.records if r.getMessage().startswith("warmed up")]


def test_num_threads_sets_the_torch_thread_pool(repo_root):
    before = torch.get_num_threads()
    try:
        build(repo_root, num_threads=1, warmup="")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SD_COMPILE": "fast"}, ["SD_COMPILE", "max-autotune"]),
        ({"SD_COMPILE": "default", "SD_WARMUP": ""}, ["SD_COMPILE", "SD_WARMUP"]),
        ({"SD_WARMUP": "512"}, ["SD_WARMUP", "WIDTHxHEIGHT"]),
        ({"SD_NUM_THREADS": "-1"}, ["SD_NUM_THREADS", "0 or more"]),
        ({"SD_NUM_THREADS": "two"}, ["SD_NUM_THREADS", "not a valid int"]),
        ({"SD_CHANNELS_LAST": "maybe"}, ["SD_CHANNELS_LAST", "not a valid bool"]),
    ],
)
def test_bad_speed_settings_stop_start_up_naming_the_variable(environ, expected):
    with pytest.raises(ValueError) as caught:
        Settings.from_env(environ)
    assert all(part in str(caught.value) for part in expected), str(caught.value)


def test_warm_up_size_outside_the_limits_stops_start_up_with_the_rule(repo_root):
    with pytest.raises(ValueError) as caught:
        build(repo_root, warmup="100x64")
    message = str(caught.value)
    assert "SD_WARMUP" in message and "`width`" in message and "multiple of 8" in message


@pytest.mark.slow
def test_compiled_path_gives_the_eager_image_and_never_recompiles(repo_root, plain):
    """torch.compile on the CPU at a small size: minutes of compiling on two cores."""
    from torch._dynamo.utils import counters

    compiled = build(repo_root, compile="default", warmup="64x64")
    graphs = counters["stats"]["unique_graphs"]
    request = {**SMALL, "width": 64, "height": 64}
    for seed in (7, 8):  # a second request at a warm size must reuse the compiled code
        response = compiled({**request, "seed": seed})
        assert np.abs(pixels(response) - pixels(plain({**request, "seed": seed}))).max() <= 2
    assert counters["stats"]["unique_graphs"] == graphs, "a warm size was compiled again"
    other = compiled({**SMALL, "width": 96, "height": 64})  # not warmed: runs eagerly
    assert pixels(other).shape == (64, 96, 3)
    assert counters["stats"]["unique_graphs"] == graphs, "a cold size started a compile"


@pytest.mark.gpu
@needs_cuda
def test_cuda_runs_in_half_precision_with_stage_timings(repo_root):
    gpu = build(repo_root, device="cuda")
    assert gpu.engine.dtype == torch.float16
    response = gpu({**SMALL, "width": 512, "height": 512})
    assert pixels(response).shape == (512, 512, 3)
    assert {"text_encoding", "denoising", "decoding"} <= set(gpu.last_timings)
    assert all(seconds > 0 for seconds in gpu.last_timings.values())


@pytest.mark.gpu
@needs_cuda
def test_cuda_1024_square_fits_without_tiling(repo_root):
    gpu = build(repo_root, device="cuda", warmup="")
    response = gpu({**SMALL, "width": 1024, "height": 1024, "inference_steps": 2})
    assert pixels(response).shape == (1024, 1024, 3)


@pytest.mark.slow
def test_benchmark_quick_mode_runs_every_section(repo_root, tmp_path):
    """The benchmark command works on a clean checkout; section 5 runs a tiny stand-in for
    the 2 GB SD 1.5 folder."""
    from model_tools.architecture import build as build_modules
    from model_tools.architecture import char_vocab, save, tiny

    stand_in = tmp_path / "stand-in"
    arch = tiny(len(char_vocab()))
    save(build_modules(arch), arch, stand_in)
    report = tmp_path / "figures.json"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/benchmark.py",
            "--quick",
            "--sd15",
            str(stand_in),
            "--json",
            str(report),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in ("== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6.", "== 7.", "== 8."):
        assert heading in result.stdout
    figures = json.loads(report.read_text())
    assert figures["handler_vs_bare"]["ratio"] > 0
    cpu = figures["sd15_cpu"]["results"]
    assert cpu["handler"]["speedup"] > 0 and cpu["stock"]["peak_request"] > 0
    assert set(figures["cold_start"]) == {"floor", "handler"}
    assert figures["memory"]["128x128"]["peak"] >= figures["memory"]["128x128"]["idle"]
    assert figures["encoding"]["png level 1 @256"]["bytes"] > 0
