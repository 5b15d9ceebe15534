"""The start-up check: the handler refuses a model folder whose weights it did not all load.

transformers initialises unmatched text-encoder weights at random with only a log warning;
these tests build such folders and expect the handler to refuse to start, naming the
component and the keys.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file

from sd_endpoint.loader import REPO_ROOT, load_handler
from sd_endpoint.weights import WeightsNotLoadedError, check_loaded, weight_files
from tests.conftest import decode_image

REQUEST = {"inputs": "a red circle on a white background", "seed": 5, "inference_steps": 3}
# transformers 5.6 renamed CLIPTextModel's parameters (no `text_model.` level), and loads
# either naming; older releases find nothing under the new names.
READS_UNPREFIXED = Version(transformers.__version__).release >= (5, 6)


def copy_repo(destination: Path) -> Path:
    """The shipped model and handler, to be altered."""
    destination.mkdir()
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name)
        else:
            shutil.copy(source, destination / name)
    (destination / "handler.py").symlink_to(REPO_ROOT / "handler.py")
    return destination


def rewrite_text_encoder(folder: Path, change) -> None:
    path = folder / "text_encoder" / "model.safetensors"
    save_file(change(load_file(str(path))), str(path), metadata={"format": "pt"})


def pixels(handler) -> np.ndarray:
    return np.asarray(decode_image(handler(REQUEST)["image"]), dtype=np.int16)


def test_the_shipped_model_passes(handler):
    check_loaded(handler.engine.pipe, REPO_ROOT)  # raises on any mismatch


def test_refuses_a_text_encoder_missing_a_weight(tmp_path):
    folder = copy_repo(tmp_path / "repo")
    rewrite_text_encoder(
        folder, lambda state: {k: v for k, v in state.items() if "final_layer_norm.weight" not in k}
    )
    with pytest.raises(WeightsNotLoadedError) as error:
        load_handler(folder)
    message = str(error.value)
    assert "`text_encoder`" in message and "final_layer_norm.weight" in message
    assert "no key in model.safetensors" in message


def test_text_encoder_saved_without_the_text_model_prefix(tmp_path, handler):
    """As transformers >= 5.6 saves it. The base image's 4.51 would serve it randomly
    initialised; the handler refuses instead. Newer releases read it correctly."""
    folder = copy_repo(tmp_path / "repo")
    rewrite_text_encoder(
        folder, lambda state: {k.removeprefix("text_model."): v for k, v in state.items()}
    )
    if READS_UNPREFIXED:
        assert np.array_equal(pixels(load_handler(folder)), pixels(handler))
        return
    with pytest.raises(WeightsNotLoadedError) as error:
        load_handler(folder)
    message = str(error.value)
    assert "`text_encoder`" in message and "initialised at random" in message
    assert "embeddings.token_embedding.weight" in message


def test_a_changed_value_is_caught(tmp_path, handler):
    """What a random initialisation looks like to the check: values unlike the file's."""
    pipe = handler.engine.pipe
    weight = pipe.unet.conv_in.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0, 0, 0] += 1
        with pytest.raises(WeightsNotLoadedError, match="`unet`.*conv_in.weight"):
            check_loaded(pipe, REPO_ROOT)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_reads_the_files_from_pretrained_reads(tmp_path):
    part = tmp_path / "unet"
    part.mkdir()
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    ):
        (part / name).write_bytes(b"")
    assert [p.name for p in weight_files(part)] == ["diffusion_pytorch_model.safetensors"]


def test_refuses_a_safety_checker_missing_a_weight(tmp_path):
    from tests.test_safety import endpoint_handler, model_folder, tiny_checker

    folder = model_folder(tmp_path, *tiny_checker())
    path = folder / "safety_checker" / "model.safetensors"
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if k != "visual_projection.weight"}, str(path))
    with pytest.raises(WeightsNotLoadedError, match="`safety_checker`.*visual_projection.weight"):
        endpoint_handler(folder, "block")
    endpoint_handler(folder, "off")  # no checker loaded, nothing to check
