"""The CPU contest's accounting (benchmarks/sd15_cpu.py, unet_calls.py): a request split into
UNet calls and fixed costs, projected to 25 steps by the calls its scheduler really makes, on
the shipped model's scheduler and on SD 1.5's own PNDM (one UNet call more than steps)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

from benchmarks import sd15_cpu
from benchmarks.unet_calls import per_request, stamped_calls, timed_request, unet_calls

# SD 1.5's own scheduler, as runwayml/stable-diffusion-v1-5 ships it.
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SIZE, STEPS, TARGET = 64, 3, 25


def model_copy(repo_root, folder, scheduler_config: dict | None = None):
    """The shipped model in ``folder``, its scheduler replaced by ``scheduler_config``."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(repo_root / part, folder / part)
    shutil.copy(repo_root / "model_index.json", folder)
    if scheduler_config:
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
        index = json.loads((folder / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", scheduler_config["_class_name"]]
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def folders(repo_root, tmp_path_factory):
    """The shipped model (DPM-Solver++) and the same with SD 1.5's PNDM scheduler."""
    root = tmp_path_factory.mktemp("models")
    return {
        "DPMSolverMultistepScheduler": model_copy(repo_root, root / "shipped"),
        "PNDMScheduler": model_copy(repo_root, root / "pndm", SD15_PNDM_CONFIG),
    }


def test_intel_spr_sizing_keeps_headroom_over_the_peak():
    assert sd15_cpu.smallest_instance(5.4e9) == "x4 (8 GB)"  # bfloat16 SD 1.5 (issue 11)
    assert sd15_cpu.smallest_instance(8.1e9) == "x8 (16 GB)"  # float32: 8 GB leaves no room
    assert sd15_cpu.smallest_instance(40e9).startswith("none")


def test_pndm_makes_one_unet_call_more_than_steps_and_dpm_solver_one_per_step():
    pndm = PNDMScheduler.from_config(SD15_PNDM_CONFIG)
    assert [unet_calls(pndm, n) for n in (2, 3, 25)] == [3, 4, 26]
    dpm = DPMSolverMultistepScheduler()
    assert [unet_calls(dpm, n) for n in (2, 3, 25)] == [2, 3, 25]


def test_unet_call_stamps_split_a_request_into_calls_and_fixed_costs(handler):
    unet = handler.engine.pipe.unet
    original = type(unet)
    request = {"inputs": "a red circle", "seed": 3, "num_inference_steps": 4}
    with stamped_calls(unet) as stamps:
        timing = timed_request(lambda: handler(request), stamps)
    assert type(unet) is original, "the UNet is left as it was"
    assert timing["unet_calls"] == 4 and len(timing["unet_call_times"]) == 3
    assert timing["unet_call_median"] > 0 and 0 < timing["fixed"] < timing["total"]
    gaps = sum(timing["unet_call_times"])
    assert timing["fixed"] + gaps + timing["unet_call_median"] == pytest.approx(timing["total"])


def test_a_count_of_calls_the_scheduler_does_not_make_is_refused():
    timing = {"total": 1.0, "unet_calls": 3, "unet_call_median": 0.1, "fixed": 0.6}
    with pytest.raises(RuntimeError, match="PNDMScheduler makes 4 UNet calls in 3 steps"):
        per_request(timing, PNDMScheduler.from_config(SD15_PNDM_CONFIG), 3, 25)


@pytest.mark.parametrize("contender", ["stock", "handler"])
@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_a_contender_is_timed_by_the_unet_calls_its_scheduler_makes(folders, contender, scheduler):
    data = sd15_cpu.CHILDREN[contender](folders[scheduler], SIZE, STEPS, TARGET)
    extra = 1 if scheduler == "PNDMScheduler" else 0
    assert data["scheduler"] == scheduler
    assert data["unet_calls"] == STEPS + extra
    assert data["target_unet_calls"] == TARGET + extra
    call = data["unet_call_median"]
    assert call > 0 and 0 < data["fixed"] < data["total"]
    assert data["step"] == pytest.approx(call * (TARGET + extra) / TARGET)
    assert data["estimate"] == pytest.approx(data["fixed"] + (TARGET + extra) * call)
    assert data["peak_request"] > 0 and data["peak_load"] > 0


@pytest.mark.skipif(
    importlib.util.find_spec("optimum") is not None, reason="optimum-intel is installed here"
)
def test_openvino_without_optimum_intel_is_reported_unavailable(folders):
    data = sd15_cpu.child_openvino(folders["PNDMScheduler"], SIZE, STEPS, TARGET)
    assert list(data) == ["unavailable"]
    assert data["unavailable"].endswith(f"is not installed in {sys.executable}")


def test_the_contest_runs_on_a_pndm_folder_with_openvino_unavailable(
    folders, tmp_path, monkeypatch, capsys
):
    """The whole contest, each contender in its own process, as the command runs it."""
    monkeypatch.setattr(sd15_cpu, "OPENVINO_PYTHON", tmp_path / ".venv-openvino/bin/python")
    figures = sd15_cpu.measure(
        folders["PNDMScheduler"], SIZE, STEPS, TARGET, ["stock", "handler", "openvino"]
    )
    results = figures["results"]
    assert results["openvino"].startswith("unavailable: .venv-openvino missing")
    for name in ("stock", "handler"):
        assert results[name]["unet_calls"] == STEPS + 1, results[name]
        assert results[name]["target_unet_calls"] == TARGET + 1
        assert results[name]["speedup"] > 0
    # The shipped model is small: float32, and OpenVINO in float32 where the test environment
    # has it (the benchmark then prepares the folder for CPU serving, as a person would).
    prepared = importlib.util.find_spec("openvino") is not None
    expected = "OpenVINO f32 int8 UNet + VAE decoder, " if prepared else ""
    assert results["handler"]["dtype"] == expected + "float32, channels-last"
    table = capsys.readouterr().out
    assert "step (of 25)" in table and "4 / 26" in table and "unavailable" in table
    assert "start-up" in table and "(warm-up " in table


@pytest.mark.parametrize(
    ("script", "usage"),
    [
        ("benchmark.py", "--sections SECTIONS"),
        ("bench_sd15_cpu.py", "--contenders CONTENDERS"),
        ("soak.py", "--clients CLIENTS"),
        ("fuzz.py", "--examples EXAMPLES"),
    ],
)
def test_the_measuring_commands_start_from_any_folder(repo_root, tmp_path, script, usage):
    result = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert usage in result.stdout
