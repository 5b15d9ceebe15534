"""SDXL through the handler, on a tiny SDXL-shaped model with random weights
(model_tools/tiny_sdxl.py, made for the session).

Here: the family read from the folder, SDXL's limits, prompts through both encoders as
AUTOMATIC1111 reads them (and bit for bit as diffusers' ``encode_prompt`` where the two must
agree), clip skip, the text and size inputs the UNet receives, and a float16 VAE that never
gives NaNs. The request fields' meaning is checked for SD and SDXL alike by the tests that
take ``family_handler`` (test_handler.py, test_batches_and_samplers.py, test_image_metadata.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import requests
import torch
from diffusers import AutoencoderKL
from servers import LocalServer

from sd_endpoint import engine, families
from sd_endpoint.families.sdxl import XLPromptEncoder
from sd_endpoint.loader import REPO_ROOT, load_handler
from sd_endpoint.prompts import PromptTooLongError
from sd_endpoint.schema import parse_request
from tests.conftest import decode_image

FAST = {"seed": 3, "num_inference_steps": 2}
MAX_CHUNKS = 8


@pytest.fixture(scope="module")
def encoder(sdxl_handler) -> XLPromptEncoder:
    return families.SDXL.prompt_encoder(sdxl_handler.engine.pipe)


def encode(encoder, prompt, negative=None, guided=True, **options):
    options.setdefault("max_chunks", MAX_CHUNKS)
    with torch.inference_mode():
        return encoder.encode(prompt, negative, guided=guided, **options)


def pixels(response) -> np.ndarray:
    return np.asarray(decode_image(response["image"]).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- the family, read from the folder


def test_an_sdxl_folder_is_served_as_sdxl_at_its_native_size(sdxl_folder, sdxl_handler):
    assert families.detect(sdxl_folder) is families.SDXL
    assert sdxl_handler.engine.family is families.SDXL
    pipe = sdxl_handler.engine.pipe
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.watermark is None  # no invisible watermark: a seed gives its bytes
    unet = json.loads((sdxl_folder / "unet" / "config.json").read_text())
    assert sdxl_handler.engine.native_size == (unet["sample_size"] * 8,) * 2 == (128, 128)
    response = sdxl_handler({"inputs": "a red circle", **FAST})
    assert decode_image(response["image"]).size == (128, 128)
    assert response["parameters"]["height"] == response["parameters"]["width"] == 128


def test_a_second_text_encoder_in_pickle_form_is_refused_at_start_up(sdxl_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(sdxl_folder, folder, symlinks=True)
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))
    with pytest.raises(RuntimeError, match=r"text_encoder_2 holds only pickle weights"):
        load_handler(folder)


def test_sdxls_buckets_are_allowed_and_larger_sizes_refused(sdxl_handler):
    limits = sdxl_handler.settings.limits
    assert (limits.max_side, limits.max_pixels) == (1536, 1024 * 1024)
    for width, height in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (640, 1536)]:
        parse_request({"inputs": "x", "width": width, "height": height}, limits, (128, 128))
    response = sdxl_handler({"inputs": "a red circle", "width": 1536, "height": 640, **FAST})
    assert decode_image(response["image"]).size == (1536, 640)
    with pytest.raises(ValueError, match=r"`width` should be less than or equal to 1536"):
        sdxl_handler({"inputs": "x", "width": 1544, "height": 512})
    with pytest.raises(ValueError, match=r"1536 × 768 = 1,179,648 pixels is over the limit"):
        sdxl_handler({"inputs": "x", "width": 768, "height": 1536})


def test_the_work_limit_admits_four_1024_images_at_the_default_steps(sdxl_handler):
    limits = sdxl_handler.settings.limits
    body = {"inputs": "x", "width": 1024, "height": 1024, "num_images_per_prompt": 4}
    assert parse_request(body, limits, (128, 128)).num_inference_steps == 25
    parse_request({**body, "num_images_per_prompt": 1, "num_inference_steps": 100}, limits, (8, 8))
    with pytest.raises(ValueError, match=r"1024 × 1024 × 26 × 4 = 109,051,904, over the limit"):
        parse_request({**body, "num_inference_steps": 26}, limits, (128, 128))


def test_the_local_server_describes_and_serves_sdxls_limits(sdxl_folder, tmp_path):
    server = LocalServer(sdxl_folder, tmp_path / "server.log")
    try:
        server.wait_ready()
        spec = requests.get(server.url + "/openapi.json", timeout=30).json()
        width = spec["components"]["schemas"]["TextToImageRequest"]["properties"]["width"]
        assert width["anyOf"][0]["maximum"] == 1536
        page = requests.get(server.url + "/playground/request.json", timeout=30).json()
        assert page["request"]["properties"]["height"]["anyOf"][0]["maximum"] == 1536
        body = {"inputs": "a red circle", "width": 640, "height": 1536, **FAST}
        response = requests.post(server.url + "/", json=body, timeout=300)
        assert response.status_code == 200, response.text
        assert decode_image(response.json()["image"]).size == (640, 1536)
    finally:
        server.stop()


# ---------------------------------------------------------------- prompts, as A1111 reads them


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [("a red circle on a white background", None), ("a blue square", "red"), ("", "a")],
)
def test_one_chunk_without_emphasis_equals_diffusers_encode_prompt(
    sdxl_handler, encoder, prompt, negative
):
    pipe = sdxl_handler.engine.pipe
    with torch.inference_mode():
        expected = pipe.encode_prompt(prompt, None, "cpu", 1, True, negative)
        unguided = pipe.encode_prompt(prompt, None, "cpu", 1, False)
    got = encode(encoder, prompt, negative)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds")
    names += ("negative_pooled_prompt_embeds",)
    for name, tensor in zip(names, expected, strict=True):
        assert torch.equal(getattr(got, name), tensor), name
    alone = encode(encoder, prompt, guided=False)
    assert torch.equal(alone.prompt_embeds, unguided[0])
    assert torch.equal(alone.pooled_prompt_embeds, unguided[2])
    assert alone.negative_prompt_embeds is alone.negative_pooled_prompt_embeds is None


def test_the_embeddings_join_both_encoders_and_pool_bigg(sdxl_handler, encoder):
    pipe = sdxl_handler.engine.pipe
    widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    got = encode(encoder, "a red circle", "blue")
    assert widths == (32, 64)
    assert got.prompt_embeds.shape == got.negative_prompt_embeds.shape == (1, 77, 96)
    projection = pipe.text_encoder_2.config.projection_dim
    assert got.pooled_prompt_embeds.shape == (1, projection) == (1, 48)


def test_each_tokenizer_pads_with_its_own_token(encoder):
    clip_l, clip_g = encoder.encoders
    assert clip_l.pad == clip_l.eos != 0 and clip_g.pad == 0  # "!", as SDXL's tokenizer_2
    for tokenizer_encoder in encoder.encoders:
        ids = tokenizer_encoder.tokenize("a red circle").chunks[0].ids
        end = ids.index(tokenizer_encoder.eos)
        assert ids[end + 1 :] == (tokenizer_encoder.pad,) * (76 - end)


def test_emphasis_weighs_both_encoders_and_leaves_the_pooled_embedding(encoder):
    plain = encode(encoder, "a red circle")
    heavy = encode(encoder, "a (red:1.5) circle")
    for columns in (slice(0, 32), slice(32, 96)):  # CLIP-L's states, then bigG's
        assert not torch.equal(heavy.prompt_embeds[..., columns], plain.prompt_embeds[..., columns])
    assert torch.equal(heavy.pooled_prompt_embeds, plain.pooled_prompt_embeds)


def test_chunks_are_encoded_alone_and_the_pooled_embedding_is_the_first_chunks(encoder):
    both = encode(encoder, "a red circle BREAK a blue square")
    first, second = encode(encoder, "a red circle"), encode(encoder, "a blue square")
    assert both.prompt_embeds.shape == (1, 154, 96)
    assert torch.equal(both.prompt_embeds[:, :77], first.prompt_embeds)
    assert torch.equal(both.prompt_embeds[:, 77:], second.prompt_embeds)
    # Projected in a batch of two chunks rather than one: equal but for the last bits.
    assert torch.allclose(both.pooled_prompt_embeds, first.pooled_prompt_embeds, atol=1e-6)
    assert not torch.allclose(both.pooled_prompt_embeds, second.pooled_prompt_embeds)


@pytest.mark.parametrize("negative", [None, ""])
def test_an_empty_negative_prompt_is_zeros_as_long_as_the_prompt(encoder, negative):
    long = encode(encoder, "x" * 100, negative)  # one character per token: two chunks
    assert long.negative_prompt_embeds.shape == long.prompt_embeds.shape == (1, 154, 96)
    assert not long.negative_prompt_embeds.any() and not long.negative_pooled_prompt_embeds.any()
    assert long.negative_pooled_prompt_embeds.shape == long.pooled_prompt_embeds.shape


def test_prompt_and_negative_are_padded_to_the_same_chunks_with_empty_ones(encoder):
    empty = encode(encoder, "", "x").prompt_embeds  # the encoding of "" (not zeros)
    short = encode(encoder, "a red circle", "x" * 200)
    assert short.prompt_embeds.shape == short.negative_prompt_embeds.shape == (1, 231, 96)
    assert empty.any()
    assert torch.equal(short.prompt_embeds[:, 77:154], empty)
    assert torch.equal(short.prompt_embeds[:, 154:], empty)
    long = encode(encoder, "x" * 100, "blue")
    assert torch.equal(long.negative_prompt_embeds[:, 77:], empty)


def test_a_prompt_over_the_chunk_limit_is_refused_before_encoding(encoder):
    with pytest.raises(PromptTooLongError, match=r"`negative_prompt` has 320 tokens"):
        encode(encoder, "a", "zqxj" * 80, max_chunks=4)


def reference_layer(encoder, text, layer):
    """Layer -``layer`` of both encoders for one chunk, as they are (no final norm), joined."""
    states = []
    for prompt_encoder in encoder.encoders:
        ids = torch.tensor([prompt_encoder.tokenize(text).chunks[0].ids])
        with torch.inference_mode():
            output = prompt_encoder.text_encoder(ids, output_hidden_states=True)
        states.append(output.hidden_states[-layer])
    return torch.cat(states, dim=-1)


def test_clip_skip_1_and_2_both_read_the_penultimate_layer_and_3_goes_deeper(encoder):
    one, two = (encode(encoder, "a red circle", "blue", clip_skip=n) for n in (1, 2))
    three = encode(encoder, "a red circle", "blue", clip_skip=3)
    assert torch.equal(one.prompt_embeds, reference_layer(encoder, "a red circle", 2))
    assert torch.equal(one.prompt_embeds, two.prompt_embeds)
    assert torch.equal(one.negative_prompt_embeds, two.negative_prompt_embeds)
    assert torch.equal(three.prompt_embeds, reference_layer(encoder, "a red circle", 3))
    assert torch.equal(three.negative_prompt_embeds, reference_layer(encoder, "blue", 3))
    # The pooled embedding is the projected last layer's, whatever the skip.
    assert torch.equal(three.pooled_prompt_embeds, one.pooled_prompt_embeds)
    with pytest.raises(ValueError, match="clip_skip must be from 1 to 3, got 4"):
        encode(encoder, "a", clip_skip=4)


def test_clip_skip_2_gives_sdxls_own_image_and_is_echoed(sdxl_handler):
    body = {"inputs": "a red circle", **FAST}
    one, two = sdxl_handler(body), sdxl_handler({**body, "clip_skip": 2})
    assert np.array_equal(pixels(one), pixels(two))
    assert two["parameters"]["clip_skip"] == 2
    # The metadata says it as AUTOMATIC1111 writes it, whatever the model.
    assert decode_image(two["image"]).info["parameters"].endswith(", Clip skip: 2")
    with pytest.raises(ValueError, match="`clip_skip`"):
        sdxl_handler({**body, "clip_skip": 3})


# ---------------------------------------------------------------- what the UNet receives


def test_the_unet_gets_the_encoders_output_and_the_requests_size(sdxl_handler, encoder):
    """Text inputs pass through the engine unchanged; the size conditioning is diffusers'
    default: original size = target size = the requested (height, width), crop (0, 0)."""
    calls = []

    def record(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((kwargs["encoder_hidden_states"], added["text_embeds"], added["time_ids"]))

    hook = sdxl_handler.engine.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        sdxl_handler({"inputs": "a (red) circle", "negative_prompt": "blue", "height": 64,
                      "width": 96, **FAST})  # fmt: skip
    finally:
        hook.remove()
    expected = encode(encoder, "a (red) circle", "blue")
    assert len(calls) == FAST["num_inference_steps"]
    for states, pooled, time_ids in calls:  # the negative's half first, as diffusers batches
        assert torch.equal(
            states, torch.cat([expected.negative_prompt_embeds, expected.prompt_embeds])
        )
        assert torch.equal(
            pooled,
            torch.cat([expected.negative_pooled_prompt_embeds, expected.pooled_prompt_embeds]),
        )
        assert time_ids.tolist() == [[64, 96, 0, 0, 64, 96]] * 2


# ---------------------------------------------------------------- float16 and the VAE


def overflowing_vae(source, dest, force_upcast: bool) -> None:
    """``source``'s VAE, its first decoder convolution scaled so that its outputs overflow
    float16 (the largest weight, 30,000, still fits), with ``force_upcast`` set as given.
    Normalisation undoes the scale in float32: decoded there, the image is unchanged."""
    vae = AutoencoderKL.from_pretrained(source)
    conv = vae.decoder.conv_in
    with torch.no_grad():
        scale = 30_000 / conv.weight.abs().max()
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
    vae.register_to_config(force_upcast=force_upcast)
    vae.save_pretrained(dest, safe_serialization=True)


def model_with_vae(sdxl_folder, folder, vae: str, force_upcast: bool):
    """The tiny SDXL model with its VAE ``overflowing`` or ``safe`` in float16."""
    folder.mkdir()
    for part in sdxl_folder.iterdir():
        if part.name != "vae":
            (folder / part.name).symlink_to(part.resolve() if part.is_symlink() else part)
    if vae == "overflowing":
        overflowing_vae(sdxl_folder / "vae", folder / "vae", force_upcast)
    else:
        shutil.copytree(sdxl_folder / "vae", folder / "vae")
        config = json.loads((folder / "vae" / "config.json").read_text())
        (folder / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    return folder


@pytest.fixture
def float16_on_cpu(monkeypatch):
    """The handler in float16, which it runs only on a GPU by choice (torch on a CPU runs these
    tiny models in float16 too, slowly): the decode path a GPU deployment takes."""
    monkeypatch.setattr(engine, "resolve_dtype", lambda *args: torch.float16)
    monkeypatch.setenv("SD_WARMUP", "")


def test_the_overflowing_vae_gives_nans_in_float16_and_an_image_in_float32(sdxl_folder, tmp_path):
    overflowing_vae(sdxl_folder / "vae", tmp_path / "vae", force_upcast=True)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, finite = engine.decode_latents(vae.half(), latents.half())
        image, finite_wide = engine.decode_latents(vae.float(), latents.half())
    assert not finite and finite_wide and image.float().std() > 10


def test_a_vae_whose_config_asks_for_float32_decodes_in_it(
    sdxl_folder, tmp_path, float16_on_cpu, caplog
):
    served = load_handler(model_with_vae(sdxl_folder, tmp_path / "m", "overflowing", True))
    assert served.engine.pipe.unet.dtype == torch.float16
    assert served.engine.pipe.vae.dtype == torch.float32  # from the start
    with caplog.at_level(logging.WARNING, logger="sd_endpoint.engine"):
        image = pixels(served({"inputs": "a red circle", **FAST}))
    assert image.std() > 10  # not the black image that NaNs give
    assert "overflowed" not in caplog.text


def test_an_overflowing_vae_that_claims_float16_is_safe_decodes_again_in_float32(
    sdxl_folder, tmp_path, float16_on_cpu, caplog
):
    upcast = load_handler(model_with_vae(sdxl_folder, tmp_path / "a", "overflowing", True))
    claims = load_handler(model_with_vae(sdxl_folder, tmp_path / "b", "overflowing", False))
    assert claims.engine.pipe.vae.dtype == torch.float16
    body = {"inputs": "a red circle", **FAST}
    with caplog.at_level(logging.WARNING, logger="sd_endpoint.engine"):
        first = claims(body)
    assert "the VAE overflowed float16; it decodes in float32 from now on" in caplog.text
    assert claims.engine.pipe.vae.dtype == torch.float32  # and stays so
    assert first["image"] == upcast(body)["image"] == claims(body)["image"]


@pytest.mark.parametrize("model", ["sdxl-fp16-fix", "sd"])
def test_a_vae_safe_in_float16_keeps_decoding_in_it(
    sdxl_folder, tmp_path, float16_on_cpu, caplog, model
):
    """The fp16-fix VAE says `force_upcast: false`; SD 1.x's VAE config says true, but
    diffusers' SD pipeline never reads it, and that VAE decodes well in float16."""
    if model == "sd":
        folder = REPO_ROOT
        assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"] is True
    else:
        folder = model_with_vae(sdxl_folder, tmp_path / "m", "safe", False)
    served = load_handler(folder)
    with caplog.at_level(logging.WARNING, logger="sd_endpoint.engine"):
        image = pixels(served({"inputs": "a red circle", **FAST}))
    assert served.engine.pipe.vae.dtype == torch.float16
    assert image.std() > 10 and "overflowed" not in caplog.text


# ---------------------------------------------------------------- both library stacks

CROSS_STACK_SCRIPT = """
import json, sys
from sd_endpoint.loader import load_handler
print(json.dumps(load_handler(sys.argv[1])(json.loads(sys.argv[2]))))
"""


@pytest.mark.skipif(
    not os.environ.get("SD_OTHER_PYTHON"),
    reason="set SD_OTHER_PYTHON to the other stack's python (scripts/test.sh does)",
)
def test_the_other_library_stack_loads_the_folder_and_gives_the_same_image(
    sdxl_folder, sdxl_handler
):
    request = {"inputs": "a red circle", "negative_prompt": "blue", "width": 96, **FAST}
    here = sdxl_handler(request)
    other = subprocess.run(
        [os.environ["SD_OTHER_PYTHON"], "-c", CROSS_STACK_SCRIPT, str(sdxl_folder),
         json.dumps(request)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600, check=True,
    )  # fmt: skip
    there = json.loads(other.stdout.strip().splitlines()[-1])
    difference = np.abs(pixels(here) - pixels(there))
    assert difference.max() <= 2, f"images differ by up to {difference.max()} levels"
