"""The model's safety checker, when its folder ships one: block, flag or off, always said.

The checker here is a real ``StableDiffusionSafetyChecker`` with a tiny CLIP vision tower. It
flags an image when the image's embedding is close enough to one of its concept embeddings;
the tests set those to the embeddings of the images they want flagged, with thresholds
between them and every other image's, so it flags exactly the chosen ones.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
    cosine_distance,
)
from transformers import CLIPConfig, CLIPImageProcessor

from sd_endpoint.loader import REPO_ROOT
from sd_endpoint.safety import SafetyChecker, Unchecked
from sd_endpoint.settings import Settings
from tests.conftest import decode_image

REQUEST = {"inputs": "a red circle", "seed": 1, "num_images_per_prompt": 3, "inference_steps": 4}
NEVER = 2.0  # a threshold no cosine reaches
TINY = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}
MODEL_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def tiny_checker() -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=TINY,
        vision_config={**TINY, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return StableDiffusionSafetyChecker(config).eval(), processor


def flag_the_most_distinct(checker, processor, images) -> int:
    """Make ``checker`` flag one image and no other: the one least like any other (the shipped
    model draws a prompt much alike across seeds, so which one is the model's). Returns it."""
    with torch.no_grad():
        pixels = processor(images, return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        similar = cosine_distance(embeds, embeds).fill_diagonal_(-1)
        nearest = similar.max(dim=1).values  # each image's likeness to its closest other
        chosen = int(nearest.argmin())
        closest = nearest[chosen].item()
        # The checker rounds its scores to 3 decimals: leave room on both sides.
        assert 1 - closest > 0.004, f"image {chosen} is too like another to flag alone"
        checker.concept_embeds.fill_(0)
        checker.concept_embeds_weights.fill_(NEVER)
        checker.special_care_embeds_weights.fill_(NEVER)
        checker.concept_embeds[0] = embeds[chosen]
        checker.concept_embeds_weights[0] = (1 + closest) / 2
    return chosen


def model_folder(tmp_path, checker=None, processor=None):
    folder = tmp_path / "model"
    folder.mkdir()
    for part in MODEL_PARTS:
        source = REPO_ROOT / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / part)
    if checker is not None:
        checker.save_pretrained(folder / "safety_checker", safe_serialization=True)
        processor.save_pretrained(folder / "feature_extractor")
        # As the real SD 1.5 repository lists them.
        index = json.loads((folder / "model_index.json").read_text())
        index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def endpoint_handler(folder, mode: str):
    """REPO_ROOT's handler.py, built on ``folder`` (a model-only copy) with ``mode``."""
    spec = importlib.util.spec_from_file_location("handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = Settings(warmup="", num_threads=torch.get_num_threads(), safety_checker=mode)
    return module.EndpointHandler(str(folder), settings)


@pytest.fixture(scope="module")
def unchecked(handler):
    return handler(REQUEST)


@pytest.fixture(scope="module")
def flagging_one(tmp_path_factory, unchecked):
    """A model folder whose checker flags one of REQUEST's three images (and which one)."""
    checker, processor = tiny_checker()
    images = [decode_image(p).convert("RGB") for p in unchecked["images"]]
    flagged = flag_the_most_distinct(checker, processor, images)
    return model_folder(tmp_path_factory.mktemp("flagging"), checker, processor), flagged


def test_block_returns_a_black_image_and_says_so(flagging_one, unchecked):
    folder, flagged = flagging_one
    handler = endpoint_handler(folder, "block")
    assert isinstance(handler.safety, SafetyChecker)
    response = handler(REQUEST)
    assert response["nsfw_content_detected"] == [i == flagged for i in range(3)]
    assert np.asarray(decode_image(response["images"][flagged])).max() == 0, "flagged, not black"
    # The others are untouched.
    for i in set(range(3)) - {flagged}:
        assert response["images"][i] == unchecked["images"][i]
    assert response["image"] == response["images"][0]
    said = f"image {flagged + 1}"
    assert any(said in w and "black" in w for w in response["warnings"])


def test_flag_returns_the_image_with_the_flag(flagging_one, unchecked):
    folder, flagged = flagging_one
    response = endpoint_handler(folder, "flag")(REQUEST)
    assert response["nsfw_content_detected"] == [i == flagged for i in range(3)]
    assert response["images"] == unchecked["images"]
    said = f"image {flagged + 1}"
    assert any(said in w and "SD_SAFETY_CHECKER=flag" in w for w in response["warnings"])


def test_a_clean_image_passes_with_its_flag_false(flagging_one, handler):
    folder, flagged = flagging_one
    request = {**REQUEST, "seed": REQUEST["seed"] + (0 if flagged else 1)}  # a seed not flagged
    request["num_images_per_prompt"] = 1
    response = endpoint_handler(folder, "block")(request)
    assert response["nsfw_content_detected"] == [False]
    assert response["image"] == handler(request)["image"]
    assert response["warnings"] == []


def test_off_never_loads_the_checker_not_even_a_pickled_one(tmp_path):
    folder = model_folder(tmp_path)
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "pytorch_model.bin").write_bytes(b"not read")
    handler = endpoint_handler(folder, "off")
    assert isinstance(handler.safety, Unchecked)
    assert handler({**REQUEST, "num_images_per_prompt": 1})["nsfw_content_detected"] is None


@pytest.mark.parametrize("mode", ["block", "flag"])
def test_a_pickled_checker_is_refused_at_start_up(tmp_path, mode):
    folder = model_folder(tmp_path)
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(
        RuntimeError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors"
    ):
        endpoint_handler(folder, mode)


def test_a_bad_mode_stops_start_up_naming_the_variable():
    with pytest.raises(ValueError, match="SD_SAFETY_CHECKER='maybe'"):
        Settings.from_env({"SD_SAFETY_CHECKER": "maybe"})
