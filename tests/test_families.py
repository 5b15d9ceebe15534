"""The model-family seam: which family a folder holds is read from it, and the engine, the
handler and the server consult that family's description (sd_endpoint/families/)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model_tools.single_file import tiny_sd2_folder
from sd_endpoint import families
from sd_endpoint.loader import REPO_ROOT, load_handler
from sd_endpoint.prompts import Conditioning
from sd_endpoint.server import served_limits
from sd_endpoint.settings import Limits, Settings
from tests.conftest import decode_image

FAST = {"seed": 4, "inference_steps": 2}
MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def linked_model(folder: Path, index: dict | str | None) -> Path:
    """The shipped model and handler.py, linked, with ``index`` as its model_index.json
    (written as JSON; a str as is; None: no model_index.json)."""
    folder.mkdir()
    for name in (*MODEL_PARTS, "handler.py"):
        (folder / name).symlink_to(REPO_ROOT / name)
    if index is not None:
        text = index if isinstance(index, str) else json.dumps(index, indent=2)
        (folder / "model_index.json").write_text(text)
    return folder


def shipped_index() -> dict:
    return json.loads((REPO_ROOT / "model_index.json").read_text())


# ---------------------------------------------------------------- detection


def test_the_shipped_model_is_served_as_stable_diffusion(handler):
    assert families.detect(REPO_ROOT) is families.SD
    assert handler.engine.family is families.SD
    assert type(handler.engine.pipe).__name__ == families.SD.pipeline == "StableDiffusionPipeline"


def test_an_sd2_layout_folder_is_served_as_stable_diffusion(tmp_path, handler, monkeypatch):
    monkeypatch.setenv("SD_WARMUP", "")
    folder = tiny_sd2_folder(tmp_path / "tiny-sd2")
    assert families.detect(folder) is families.SD
    sd2 = type(handler)(str(folder))
    assert sd2.engine.family is families.SD
    # The family's encoder was built from the folder's own tokenizer: it pads with "!".
    assert sd2.engine.prompts.pad == 0 != sd2.engine.prompts.eos
    image = decode_image(sd2({"inputs": "a red circle", **FAST})["image"])
    assert image.size == sd2.engine.native_size[::-1]


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_a_pipeline_this_endpoint_does_not_serve_is_refused_at_start_up(tmp_path, pipeline):
    folder = linked_model(tmp_path / "model", {**shipped_index(), "_class_name": pipeline})
    with pytest.raises(RuntimeError) as caught:
        load_handler(folder)
    assert isinstance(caught.value, families.UnsupportedModelError)
    message = str(caught.value)
    assert str(folder / "model_index.json") in message
    assert f"`{pipeline}`" in message
    assert "`StableDiffusionPipeline` (Stable Diffusion 1.x and 2.x)" in message


@pytest.mark.parametrize("index", [{}, {"_class_name": None}, {"_class_name": 3}, []])
def test_a_model_index_naming_no_pipeline_is_refused_at_start_up(tmp_path, index):
    if isinstance(index, dict) and index:
        index = {**shipped_index(), **index}
    folder = linked_model(tmp_path / "model", index)
    with pytest.raises(families.UnsupportedModelError) as caught:
        load_handler(folder)
    message = str(caught.value)
    assert str(folder / "model_index.json") in message and "has no `_class_name`" in message
    assert "`StableDiffusionPipeline` (Stable Diffusion 1.x and 2.x)" in message


def test_a_model_index_that_is_not_json_is_refused_at_start_up(tmp_path):
    folder = linked_model(tmp_path / "model", '{"_class_name": "StableDiffusionPipeline",')
    with pytest.raises(families.UnsupportedModelError, match="is not valid JSON"):
        load_handler(folder)


def test_a_folder_without_model_index_is_refused_as_no_diffusers_folder(tmp_path):
    folder = linked_model(tmp_path / "model", None)
    with pytest.raises(RuntimeError) as caught:
        load_handler(folder)
    assert str(caught.value) == (
        f"{folder} holds no model_index.json: it must be a diffusers model folder "
        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    )


# ---------------------------------------------------------------- a family is a description


def test_a_familys_limits_replace_the_defaults_and_the_variables_still_win():
    wide = {"max_side": 1536, "max_pixels": 1024 * 1024}
    assert Settings.from_env({}).limits == Limits()
    assert Settings.from_env({}, limit_defaults=wide).limits.max_side == 1536
    assert Settings.from_env({"SD_MAX_SIDE": "768"}, limit_defaults=wide).limits.max_side == 768


def test_a_family_naming_a_limit_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="no such limits: max_height"):
        dataclasses.replace(families.SD, limits={"max_height": 1536})


def test_conditioning_fields_are_the_pipelines_keyword_arguments():
    @dataclasses.dataclass(frozen=True)
    class Pooled(Conditioning):  # as a family with pooled text embeddings would add them
        pooled_prompt_embeds: torch.Tensor

    embeds, pooled = torch.zeros(1, 77, 8), torch.ones(1, 8)
    assert Conditioning(embeds, None).kwargs() == {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": None,
    }
    assert Pooled(embeds, None, pooled).kwargs()["pooled_prompt_embeds"] is pooled


def test_the_engine_and_the_server_serve_a_family_as_described(tmp_path, monkeypatch, handler):
    """A family added as a description only: its prompt encoder, load options and limits are
    what the handler uses, with no change to the engine."""
    encoded = []

    def counting_encoder(pipe):
        encoder = families.SD.prompt_encoder(pipe)
        encode = encoder.encode
        encoder.encode = lambda *args, **kwargs: encoded.append(1) or encode(*args, **kwargs)
        return encoder

    described = dataclasses.replace(
        families.SD,
        name="a described family",
        prompt_encoder=counting_encoder,
        load_options={**families.SD.load_options, "requires_safety_checker": True},
        limits={"max_side": 1536},
    )
    monkeypatch.setattr(families, "FAMILIES", (described,))
    monkeypatch.setenv("SD_WARMUP", "")
    folder = linked_model(tmp_path / "model", shipped_index())

    assert served_limits(folder).max_side == 1536
    assert served_limits(tmp_path / "no-model").max_side == Limits().max_side
    served = load_handler(folder)
    assert served.engine.family is described
    assert served.engine.pipe.config.requires_safety_checker is True
    assert served.settings.limits.max_side == 1536
    response = served({"inputs": "a red circle", "width": 1536, "height": 64, **FAST})
    assert decode_image(response["image"]).size == (1536, 64)
    assert encoded == [1]
    # Otherwise the description is SD's: the same request gives the shipped handler's image.
    reference = handler({"inputs": "a red circle", "width": 1536 // 2, "height": 64, **FAST})
    again = served({"inputs": "a red circle", "width": 1536 // 2, "height": 64, **FAST})
    assert again["image"] == reference["image"]
