"""Faults: out of memory and other failures inside the real pipeline, pickle weights, logs.

Faults are raised from forward pre-hooks on the real modules (text encoder, UNet, VAE
decoder), so they surface exactly where a real one would: deep inside diffusers' call, with
the engine's lock held and a half-used scheduler.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import threading
import weakref
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from sd_endpoint.engine import InsufficientMemoryError
from sd_endpoint.loader import REPO_ROOT, load_handler
from sd_endpoint.settings import Settings

REQUEST = {"inputs": "a red circle", "height": 64, "width": 72, "inference_steps": 3, "seed": 11}
COMPONENTS = ("text_encoder", "unet", "vae")


def module_of(handler, component: str) -> torch.nn.Module:
    pipe = handler.engine.pipe
    return pipe.vae.decoder if component == "vae" else getattr(pipe, component)


@contextmanager
def fault(module: torch.nn.Module, error: BaseException, on_call: int = 1):
    """``module`` raises ``error`` at the start of its ``on_call``-th forward pass."""
    calls = 0

    def hook(_module, _args):
        nonlocal calls
        calls += 1
        if calls == on_call:
            raise error

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    assert calls >= on_call, "the fault was never reached"


def call_within(handler, body, seconds: float = 300):
    """``handler(body)``, failing (not hanging) if it does not return: a lock left held by a
    failed call would block every later one."""
    result: dict = {}

    def run():
        try:
            result["value"] = handler(body)
        except BaseException as exc:  # noqa: BLE001  handed to the test below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the handler did not answer within {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def reference(handler):
    return handler(REQUEST)


# ---------------------------------------------------------------- out of memory

OUT_OF_MEMORY = [
    pytest.param(
        "unet",
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        2,
        id="cuda-oom-in-the-second-unet-step",
    ),
    pytest.param(
        "unet", RuntimeError("CUDA error: out of memory"), 1, id="runtime-error-in-the-unet"
    ),
    pytest.param(
        "vae", torch.cuda.OutOfMemoryError("CUDA out of memory."), 1, id="cuda-oom-in-the-vae"
    ),
    pytest.param(
        "text_encoder",
        RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"),
        1,
        id="mps-oom-in-the-text-encoder",
    ),
    pytest.param(
        "unet",
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
            "you tried to allocate 21474836480 bytes."
        ),
        1,
        id="cpu-allocator-out-of-memory",
    ),
]


@pytest.mark.parametrize(("component", "error", "on_call"), OUT_OF_MEMORY)
def test_out_of_memory_names_size_and_steps_and_the_next_request_gets_its_image(
    handler, reference, component, error, on_call
):
    with (
        fault(module_of(handler, component), error, on_call),
        pytest.raises(InsufficientMemoryError) as caught,
    ):
        handler(REQUEST)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # the runtime answers 400 with the message
    assert "72x64" in message and "3 steps" in message
    assert "ran out of memory" in message and "lower height and width" in message
    # Nothing of the failed call lingers: the same request gives the same bytes as before.
    assert call_within(handler, REQUEST)["image"] == reference["image"]


def test_a_failed_generations_tensors_are_freed_before_the_caller_sees_the_error(handler):
    """Cached GPU memory can only be returned once nothing refers to it: the error must not
    carry the failed call's frames (and with them its latents and activations) to the caller,
    and the engine empties the cache after those are gone."""
    alive = []

    def run_out(_module, args):
        held = torch.ones(64, 64)  # stands for the activations of the failed forward pass
        alive.extend([weakref.ref(args[0]), weakref.ref(held)])
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    handle = module_of(handler, "unet").register_forward_pre_hook(run_out)
    try:
        with pytest.raises(InsufficientMemoryError) as caught:
            handler(REQUEST)
    finally:
        handle.remove()
    # Still holding the error, as a server does while it writes the response.
    assert caught.value is not None
    assert [ref() for ref in alive] == [None, None], "the error keeps the failed call's tensors"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_reserved_by_a_failed_generation_is_returned_to_the_device(handler):
    handler(REQUEST)
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()

    def run_out(_module, _args):
        held = torch.empty(2**28, device="cuda")  # 1 GiB the failed call had claimed
        held.fill_(0)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    handle = module_of(handler, "unet").register_forward_pre_hook(run_out)
    try:
        with pytest.raises(InsufficientMemoryError):
            handler(REQUEST)
    finally:
        handle.remove()
    assert torch.cuda.memory_reserved() <= before + 2**26


# ---------------------------------------------------------------- any other failure

OTHER_FAULTS = [
    ("text_encoder", RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), 1),
    ("unet", RuntimeError("Expected all tensors to be on the same device"), 2),
    ("unet", KeyError("down_blocks"), 3),
    ("vae", ZeroDivisionError("division by zero"), 1),
    ("unet", AssertionError(), 1),
]


@pytest.mark.parametrize(
    ("component", "error", "on_call"), OTHER_FAULTS, ids=lambda v: type(v).__name__
)
def test_any_other_failure_inside_the_pipeline_leaves_the_handler_usable(
    handler, reference, component, error, on_call
):
    # Not a ValueError: the server answers 500 for it, with the traceback in its log.
    with fault(module_of(handler, component), error, on_call), pytest.raises(type(error)) as caught:
        handler(REQUEST)
    assert not isinstance(caught.value, ValueError)
    assert call_within(handler, REQUEST)["image"] == reference["image"]
    # A different request too: the failed call left no scheduler state behind.
    other = call_within(handler, {**REQUEST, "scheduler": "dpm++2m", "seed": 12})
    assert other["image"] != reference["image"]


# ---------------------------------------------------------------- weights are never unpickled


def model_folder(tmp_path, pickled: dict[str, str] | None = None, traps: bool = False):
    """A copy of the shipped model (links, mostly) where the ``pickled`` components hold
    their weights as a pickle of the given suffix instead of safetensors; ``traps`` adds a
    pickle beside every safetensors file that, once unpickled, creates ``unpickled/``."""
    folder = tmp_path / "model"
    folder.mkdir()
    for item in REPO_ROOT.iterdir():
        if item.name in ("model_index.json", "tokenizer", "scheduler"):
            (folder / item.name).symlink_to(item)
    for component in COMPONENTS:
        (folder / component).mkdir()
        for source in (REPO_ROOT / component).iterdir():
            target = folder / component / source.name
            if source.suffix == ".safetensors" and component in (pickled or {}):
                weights = load_file(source)
                torch.save(weights, target.with_suffix(pickled[component]))
            else:
                target.symlink_to(source)
        if traps:
            name = (
                "pytorch_model.bin"
                if component == "text_encoder"
                else "diffusion_pytorch_model.bin"
            )
            (folder / component / name).write_bytes(trap(tmp_path / "unpickled"))
    return folder


class _Trap:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def trap(marker) -> bytes:
    return pickle.dumps(_Trap(marker))


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("suffix", [".bin", ".ckpt"])
def test_a_folder_with_only_pickle_weights_is_refused_at_start(
    handler, tmp_path, component, suffix
):
    folder = model_folder(tmp_path, {component: suffix})
    with pytest.raises(RuntimeError) as caught:
        type(handler)(str(folder), settings=Settings(warmup=""))
    message = str(caught.value)
    assert str(folder / component) in message
    assert suffix in message and "safetensors" in message and "arbitrary code" in message


def test_pickles_beside_safetensors_are_never_unpickled(handler, tmp_path):
    marker = tmp_path / "unpickled"
    pickle.loads(trap(tmp_path / "trap-works"))  # the trap does fire when unpickled...
    assert (tmp_path / "trap-works").is_dir()
    folder = model_folder(tmp_path, traps=True)
    loaded = type(handler)(str(folder), settings=Settings(warmup=""))
    assert loaded({**REQUEST, "inference_steps": 1})["image"]
    assert not marker.exists(), "a pickle weights file was unpickled"  # ...and never did here
    shutil.rmtree(folder)


# ---------------------------------------------------------------- prompts stay out of the logs

SECRET = "zq-secret-prompt-4471"
# Past 77 tokens, in the second chunk: the stock pipeline would log it as cut off.
LONG_PROMPT = "a red circle " * 30 + SECRET


def _everything_logged(caplog, capfd) -> str:
    out, err = capfd.readouterr()
    return caplog.text + out + err


def test_prompts_never_reach_the_logs_by_default(handler, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    response = handler(
        {"inputs": LONG_PROMPT, "negative_prompt": "neg " + SECRET, "inference_steps": 1}
    )
    assert response["warnings"] == []  # used whole, in chunks: nothing was cut
    with pytest.raises(ValueError):  # a rejection echoes the prompt to the caller only
        handler({"inputs": SECRET * 200})
    with pytest.raises(ValueError):  # past the chunk limit
        handler({"inputs": "a red circle " * 60 + SECRET})
    out_of_memory = fault(module_of(handler, "unet"), RuntimeError("CUDA out of memory"))
    with out_of_memory, pytest.raises(InsufficientMemoryError):
        handler({"inputs": SECRET, "inference_steps": 1})
    logged = _everything_logged(caplog, capfd)
    assert "generated" in logged  # the handler did log its requests...
    assert SECRET not in logged  # ...without their prompts


def test_sd_log_prompts_1_logs_the_prompt(monkeypatch, caplog):
    monkeypatch.setenv("SD_LOG_PROMPTS", "1")
    monkeypatch.setenv("SD_WARMUP", "")
    debugging = load_handler(REPO_ROOT)
    caplog.set_level(logging.INFO)
    debugging({"inputs": SECRET, "inference_steps": 1})
    assert SECRET in caplog.text
