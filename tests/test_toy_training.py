"""The toys are trained on the text inputs the endpoint serves: ``model_tools.toys`` encodes a
batch of captions as the family's prompt encoder encodes a request, and the same seed gives
the same weights."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model_tools import architecture, tiny_sdxl
from model_tools.synthetic import FILLER, random_scene
from model_tools.toys import TRAINED_SIDES, SDText, XLText
from model_tools.train import train_caption
from sd_endpoint.loader import REPO_ROOT

LONG = ", ".join(FILLER[:9]) + ", a red circle on a white background"  # two chunks
CAPTIONS = ["a red circle on a white background", "", LONG, "blue"]


@pytest.fixture(scope="module")
def xl_text(tmp_path_factory):
    arch = tiny_sdxl.toy()
    return XLText(tiny_sdxl.build(arch, seed=3), tmp_path_factory.mktemp("xl"))


@pytest.fixture(scope="module")
def sd_text(tmp_path_factory):
    arch = architecture.tiny(len(architecture.char_vocab()))
    return SDText(architecture.build(arch, seed=3), tmp_path_factory.mktemp("sd"))


def test_sdxl_captions_train_as_the_endpoint_encodes_them(xl_text):
    with torch.no_grad():
        states, mask, extra = xl_text.embed(CAPTIONS, np.random.default_rng(0))
    length = xl_text.encoder.length
    assert states.shape == (4, 2 * length, 64 + 96)
    pooled = extra["added_cond_kwargs"]["text_embeds"]
    for row, caption in enumerate(CAPTIONS):
        if not caption:
            continue
        served = xl_text.encoder.encode(caption, None, guided=False, max_chunks=3)
        chunks = served.prompt_embeds.shape[1] // length
        torch.testing.assert_close(states[row, : chunks * length], served.prompt_embeds[0])
        torch.testing.assert_close(pooled[row], served.pooled_prompt_embeds[0])
        assert mask[row].tolist() == [1.0] * chunks * length + [0.0] * (2 - chunks) * length


def test_a_dropped_sdxl_caption_is_zeros_as_an_empty_negative_prompt_is_served(xl_text):
    with torch.no_grad():
        states, mask, extra = xl_text.embed(CAPTIONS, np.random.default_rng(0))
        served = xl_text.encoder.encode("a red circle", "", guided=True, max_chunks=3)
    assert (
        not served.negative_prompt_embeds.any() and not served.negative_pooled_prompt_embeds.any()
    )
    assert not states[1].any() and not extra["added_cond_kwargs"]["text_embeds"][1].any()
    assert mask[1].sum() == xl_text.encoder.length


def test_sdxl_pooled_dropout_zeroes_the_pooled_embedding_alone(tmp_path):
    """With ``pooled_dropout`` a share of the kept captions loses the pooled embedding, their
    token states kept as the endpoint serves them; a dropped caption stays all zeros."""
    text = XLText(tiny_sdxl.build(tiny_sdxl.toy(), seed=3), tmp_path, pooled_dropout=0.3)
    captions = [CAPTIONS[0]] * 63 + [""]
    with torch.no_grad():
        states, _, extra = text.embed(captions, np.random.default_rng(2))
        served = text.encoder.encode(CAPTIONS[0], None, guided=False, max_chunks=3)
    pooled = extra["added_cond_kwargs"]["text_embeds"]
    for row in range(63):
        torch.testing.assert_close(states[row], served.prompt_embeds[0])
    zeroed = [row for row in range(63) if not pooled[row].any()]
    for row in set(range(63)) - set(zeroed):
        torch.testing.assert_close(pooled[row], served.pooled_prompt_embeds[0])
    assert 10 <= len(zeroed) <= 30, len(zeroed)  # 0.3 of 63 is about 19
    assert not states[63].any() and not pooled[63].any()


def test_the_sd_toy_refuses_the_sdxl_toys_dropout_options(tmp_path):
    command = [sys.executable, "-m", "model_tools.train", "--family", "sd", "--out", str(tmp_path)]
    result = subprocess.run(
        command + ["--pooled-dropout", "0.3"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--pooled-dropout: the sd toy has no such option" in result.stderr
    assert not any(tmp_path.iterdir())


def caption_mix(dropout: float, draws: int = 20_000) -> dict[str, float]:
    """Shares of dropped, bare-colour, whole and partial captions in ``draws`` training
    captions at ``dropout``; the kinds are shares of the kept captions."""
    rng = np.random.default_rng(5)
    counts = dict.fromkeys(("dropped", "colour", "whole", "partial"), 0)
    for _ in range(draws):
        scene = random_scene(rng)
        text = train_caption(scene, rng, dropout)
        if not text:
            counts["dropped"] += 1
        elif text == scene.colour:
            counts["colour"] += 1
        else:
            counts["whole" if text == scene.caption else "partial"] += 1
    kept = draws - counts["dropped"]
    return {"dropped": counts["dropped"] / draws} | {
        kind: counts[kind] / kept for kind in ("colour", "whole", "partial")
    }


def test_caption_dropout_drops_captions_and_leaves_the_mix_of_the_rest():
    """More dropout (the SDXL toy's) takes captions from every kind alike: the whole captions,
    which teach colour, shape and background together, stay two in three of the kept ones."""
    usual, more = caption_mix(0.1), caption_mix(0.4)
    assert usual["dropped"] == pytest.approx(0.1, abs=0.01)
    assert more["dropped"] == pytest.approx(0.4, abs=0.015)
    # A partial caption keeps each part with even odds, redrawn until one is kept: 1 in 7
    # keeps all three, which reads as a whole caption.
    expected = {"colour": 0.05 / 0.9, "whole": (0.55 + 0.3 / 7) / 0.9, "partial": 0.3 * 6 / 7 / 0.9}
    for kind, share in expected.items():
        assert usual[kind] == pytest.approx(share, abs=0.015), kind
        assert more[kind] == pytest.approx(share, abs=0.015), kind


def test_sdxl_size_numbers_are_a_trained_size_uncropped(xl_text):
    _, _, extra = xl_text.embed(CAPTIONS * 8, np.random.default_rng(1))
    time_ids = extra["added_cond_kwargs"]["time_ids"]
    assert time_ids.shape == (32, 6)
    for h, w, top, left, target_h, target_w in time_ids.tolist():
        assert (h, w) == (target_h, target_w) and (top, left) == (0, 0)
        assert h in TRAINED_SIDES and w in TRAINED_SIDES
    assert len({tuple(row) for row in time_ids.tolist()}) > 1


def test_sd_captions_train_as_the_endpoint_encodes_them(sd_text):
    with torch.no_grad():
        states, mask, extra = sd_text.embed(CAPTIONS, np.random.default_rng(0))
    assert extra == {}
    length = sd_text.encoder.length
    for row, caption in enumerate(CAPTIONS):
        served = sd_text.encoder.encode(caption, None, guided=False, max_chunks=3)
        chunks = served.prompt_embeds.shape[1] // length
        torch.testing.assert_close(states[row, : chunks * length], served.prompt_embeds[0])
        assert mask[row].sum() == chunks * length


def train_briefly(out) -> dict[str, str]:
    """A few steps of ``model_tools.train --family sdxl``; each file's digest."""
    options = "--vae-steps 2 --vae-batch 2 --pool 16 --unet-steps 3 --batch 4 --log-every 1"
    command = [sys.executable, "-m", "model_tools.train", "--family", "sdxl", "--out", str(out)]
    subprocess.run(command + options.split(), cwd=REPO_ROOT, check=True, capture_output=True)
    return {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


def test_the_same_seed_trains_the_same_sdxl_toy(tmp_path):
    first, second = train_briefly(tmp_path / "a"), train_briefly(tmp_path / "b")
    assert "text_encoder_2/model.safetensors" in first
    assert first == second


def test_the_sdxl_toy_is_a_small_sdxl_folder_written_for_both_stacks():
    from model_tools.toys import TOYS

    folder = TOYS["sdxl"].folder
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size < 12 * 2**20, f"{size / 2**20:.1f} MB"
    for name in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / name).iterdir()}
    pad = [
        json.loads((folder / name / "special_tokens_map.json").read_text())["pad_token"]
        for name in ("tokenizer", "tokenizer_2")
    ]
    assert pad == ["<|endoftext|>", "!"]
    for name in ("text_encoder", "text_encoder_2"):
        with safe_open(folder / name / "model.safetensors", "pt") as weights:
            keys = list(weights.keys())
            assert weights.get_tensor(keys[0]).dtype == torch.float16
        assert all(k.startswith(("text_model.", "text_projection.")) for k in keys)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
