"""AUTOMATIC1111's prompt syntax, chunked long prompts and clip skip (sd_endpoint/prompts.py).

The parser cases are the web UI's own documented examples; the encoder is checked against
diffusers' ``encode_prompt`` where the two must agree (one chunk, no emphasis; clip skip on
the base image's diffusers), and through the handler, whose one-chunk images must not change
by a single byte.
"""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version
from transformers import CLIPTextModel, CLIPTokenizer

from sd_endpoint.engine import latents_to_pixels
from sd_endpoint.prompts import PromptEncoder, PromptTooLongError, escape, parse
from tests.conftest import decode_image

MAX_CHUNKS = 8


@pytest.fixture(scope="module")
def encoder(repo_root):
    tokenizer = CLIPTokenizer.from_pretrained(repo_root / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(repo_root / "text_encoder").eval()
    return PromptEncoder(tokenizer, text_encoder)


def encode(encoder, prompt, negative=None, guided=True, **options):
    options.setdefault("max_chunks", MAX_CHUNKS)
    with torch.inference_mode():
        conditioning = encoder.encode(prompt, negative, guided=guided, **options)
    return conditioning.prompt_embeds, conditioning.negative_prompt_embeds


# --- the syntax: the web UI's documented examples ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parses_the_web_uis_documented_examples(text, expected):
    spans = parse(text)
    assert [t for t, _ in spans] == [t for t, _ in expected]
    assert [w for _, w in spans] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word:.5)", [("word", 0.5)]),
        ("((word:1.5))", [("word", 1.65)]),
        ("[(word:2)]", [("word", 2 / 1.1)]),
        ("a) b] c", [("a) b] c", 1.0)]),  # unmatched closers are text
        ("a [b", [("a ", 1.0), ("b", 1 / 1.1)]),  # an unclosed opener weights the rest
        ("(a]", [("a]", 1.1)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("a:b: c", [("a:b: c", 1.0)]),
        ("word:1.2)", [("word:1.2)", 1.0)]),  # a weight without its bracket is text
        ("(word:1.2.3)", [("word:1.2.3", 1.1)]),  # the web UI fails on this one
        ("", [("", 1.0)]),
    ],
)
def test_parses_nesting_escapes_and_unbalanced_brackets(text, expected):
    spans = parse(text)
    assert [t for t, _ in spans] == [t for t, _ in expected]
    assert [w for _, w in spans] == pytest.approx([w for _, w in expected])


def test_break_is_an_upper_case_word_and_breaks_inside_brackets_too():
    assert parse("a BREAK b") == [("a", 1.0), ("BREAK", None), ("b", 1.0)]
    assert parse("a break b, BREAKING") == [("a break b, BREAKING", 1.0)]
    spans = parse("(a BREAK b)")
    assert [t for t, _ in spans] == ["a", "BREAK", "b"]
    assert spans[1][1] is None and spans[0][1] == spans[2][1] == pytest.approx(1.1)


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_parsing_never_fails_and_escaped_text_comes_back_whole(text):
    spans = parse(text)
    assert spans and all(isinstance(t, str) for t, _ in spans)
    if "BREAK" not in text:
        assert parse(escape(text)) == [(text, 1.0)]


@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\:")))
@settings(max_examples=200, deadline=None)
def test_text_without_syntax_is_one_span_of_weight_one(text):
    if "BREAK" not in text:
        assert parse(text) == [(text, 1.0)]


@given(st.text(alphabet="ab (:)[]\\.1,", max_size=300))
@settings(max_examples=200, deadline=None)
def test_any_text_makes_whole_chunks(encoder, text):
    tokenized = encoder.tokenize(text)
    assert tokenized.chunks
    for chunk in tokenized.chunks:
        assert len(chunk.ids) == len(chunk.weights) == 77
        assert chunk.ids[0] == encoder.bos and encoder.eos in chunk.ids[1:]


# --- chunks ----------------------------------------------------------------------------------
# The shipped tokenizer spells words one character per token, so "x" * n is n tokens.


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("", 1),
        ("x" * 75, 1),
        ("x" * 76, 2),
        ("x" * 150, 2),
        ("x" * 151, 3),
        ("a BREAK b", 2),
        ("a BREAK BREAK b", 3),
        ("a BREAK", 1),
        ("x" * 75 + " BREAK b", 2),
    ],
)
def test_chunk_counts_at_the_boundaries(encoder, text, chunks):
    assert encoder.count_chunks(text) == chunks


def test_a_chunk_holds_bos_75_tokens_eos_then_padding(encoder):
    first, second = encoder.tokenize("x" * 76).chunks  # one word: 75 "x" then "x</w>"
    x = encoder.tokenizer.convert_tokens_to_ids("x")
    x_end = encoder.tokenizer.convert_tokens_to_ids("x</w>")
    assert first.ids == (encoder.bos, *[x] * 75, encoder.eos)
    assert second.ids == (encoder.bos, x_end, encoder.eos, *[encoder.pad] * 74)


def test_a_phrase_crossing_the_boundary_moves_whole_to_the_next_chunk(encoder):
    """The web UI's default word wrap: the words after the last comma, when it is within 20
    tokens of the chunk's end, start the next chunk instead of being split."""
    text = "y" * 60 + ", " + "z" * 30
    first, second = encoder.tokenize(text).chunks
    z = encoder.tokenizer.convert_tokens_to_ids("z")
    assert z not in first.ids and second.ids[1:31].count(z) == 29  # the last is "z</w>"
    # A comma further back than 20 tokens does not move anything.
    first, _ = encoder.tokenize("y" * 40 + ", " + "z" * 50).chunks
    assert z in first.ids


def test_the_negative_prompt_is_padded_to_the_prompts_chunks_and_back(encoder):
    empty = encode(encoder, "", None)[0]
    long, negative = encode(encoder, "x" * 100, None)
    assert long.shape == negative.shape == (1, 154, 64)
    assert torch.equal(negative, torch.cat([empty, empty], dim=1))

    short, long_negative = encode(encoder, "a red circle", "x" * 200)
    assert short.shape == long_negative.shape == (1, 231, 64)
    assert torch.equal(short[:, 77:154], empty) and torch.equal(short[:, 154:], empty)
    assert torch.equal(short[:, :77], encode(encoder, "a red circle")[0])


def test_without_guidance_there_is_no_negative_and_no_padding(encoder):
    prompt, negative = encode(encoder, "a red circle", "x" * 200, guided=False)
    assert negative is None and prompt.shape == (1, 77, 64)


def test_each_chunk_is_encoded_on_its_own(encoder):
    """The second chunk's states are those of its text alone: positions restart per chunk."""
    both = encode(encoder, "x" * 75 + " BREAK a red circle")[0]
    assert torch.equal(both[:, 77:], encode(encoder, "a red circle")[0])
    assert torch.equal(both[:, :77], encode(encoder, "x" * 75)[0])


# --- weights ---------------------------------------------------------------------------------


def test_weight_one_everywhere_equals_the_plain_prompt(encoder):
    plain = encode(encoder, "a red circle on a white background", "blue")
    weighted = encode(encoder, "(a red:1) circle [(on a white background:1.1)]", "(blue:1.0)")
    assert torch.equal(weighted[0], plain[0]) and torch.equal(weighted[1], plain[1])


def test_weights_scale_their_tokens_then_restore_the_chunks_mean(encoder):
    plain = encode(encoder, "a red circle")[0][0]
    heavy = encode(encoder, "a (red:1.5) circle")[0][0]
    # bos, "a</w>", then "r", "e", "d</w>" at positions 2-4.
    rescale = (heavy[0] / plain[0]).mean()
    assert rescale.item() != pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(heavy[2:5], plain[2:5] * 1.5 * rescale, rtol=1e-4, atol=1e-6)
    rest = torch.cat([heavy[:2], heavy[5:]])
    assert torch.allclose(rest, torch.cat([plain[:2], plain[5:]]) * rescale, rtol=1e-4, atol=1e-6)
    assert heavy.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)


def test_an_absurd_weight_is_refused_naming_the_field(encoder):
    with pytest.raises(ValueError, match="`negative_prompt` gives a token the emphasis weight"):
        encode(encoder, "a", "(" * 100 + "blue")


# --- limits ----------------------------------------------------------------------------------


def test_over_the_limit_the_error_counts_tokens_and_never_quotes_the_prompt(encoder):
    calls = []
    hook = encoder.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    secret = "zqxj" * 80  # 320 tokens: 5 chunks
    try:
        with pytest.raises(PromptTooLongError) as caught:
            encode(encoder, "a red circle", secret, max_chunks=4)
    finally:
        hook.remove()
    message = str(caught.value)
    assert "`negative_prompt` has 320 tokens" in message and "5 chunks" in message
    assert "at most 4 chunks (300 tokens)" in message
    assert "zqxj" not in message and "qxj" not in message
    assert calls == []  # refused before any forward pass
    assert encode(encoder, "a red circle", secret, max_chunks=5)[1].shape == (1, 385, 64)


# --- diffusers agreement -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(repo_root):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        repo_root, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [("a red circle on a white background", None), ("a blue square", "red"), ("", "")],
)
def test_one_chunk_without_emphasis_equals_diffusers_encode_prompt(encoder, pipe, prompt, negative):
    with torch.inference_mode():
        expected = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    got = encode(encoder, prompt, negative)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_sd2_style_padding_uses_the_tokenizers_own_pad_token(repo_root, encoder, pipe):
    """SD 2.x pads with "!" (id 0), not with the end token as SD 1.x does."""
    tokenizer = CLIPTokenizer.from_pretrained(repo_root / "tokenizer", pad_token="!")
    sd2 = PromptEncoder(tokenizer, encoder.text_encoder)
    assert sd2.pad == 0 != sd2.eos
    chunk = sd2.tokenize("a red circle").chunks[0]
    end = chunk.ids.index(sd2.eos)
    assert chunk.ids[end + 1 :] == (0,) * (76 - end)
    pipe_sd2 = type(pipe)(
        **{**pipe.components, "tokenizer": tokenizer}, requires_safety_checker=False
    )
    with torch.inference_mode():
        expected = pipe_sd2.encode_prompt("a red circle", "cpu", 1, True, None)
    got = encode(sd2, "a red circle", None)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], encode(encoder, "a red circle")[0])


def reference_clip_skip(encoder, text):
    """The web UI's clip skip 2: the penultimate layer's states, then the final layer norm."""
    model = encoder.text_encoder
    ids = torch.tensor([encoder.tokenize(text).chunks[0].ids])
    with torch.inference_mode():
        states = model(ids, output_hidden_states=True).hidden_states
        return getattr(model, "text_model", model).final_layer_norm(states[-2])


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(encoder):
    got = encode(encoder, "a red circle", "blue", clip_skip=2)
    assert torch.equal(got[0], reference_clip_skip(encoder, "a red circle"))
    # The negative prompt goes through the same layers as the prompt, as in the web UI.
    assert torch.equal(got[1], reference_clip_skip(encoder, "blue"))
    assert not torch.equal(got[0], encode(encoder, "a red circle")[0])


@pytest.mark.skipif(
    Version(diffusers.__version__) >= Version("0.40"),
    reason="diffusers' own clip_skip fails with transformers >= 5.6 (diffusers #14124)",
)
def test_clip_skip_2_equals_diffusers_clip_skip_1(encoder, pipe):
    """diffusers counts the layers skipped (1 = the penultimate), the web UI the layer used
    (2 = the penultimate). diffusers skips for the prompt only, not the negative prompt."""
    with torch.inference_mode():
        expected = pipe.encode_prompt("a red circle", "cpu", 1, True, "blue", clip_skip=1)
        negative = pipe.encode_prompt("blue", "cpu", 1, False, clip_skip=1)[0]
    got = encode(encoder, "a red circle", "blue", clip_skip=2)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], negative)


# --- through the handler -------------------------------------------------------------------------


def stock_pixels(handler, prompt, negative, seed, steps=6):
    """The image as the handler made it before this encoder, with diffusers' own
    ``encode_prompt``: one chunk, cut at 77 tokens."""
    engine = handler.engine
    pipe = engine.pipe
    with engine._lock, torch.inference_mode():
        pipe.scheduler = engine.new_scheduler("default")
        pipe.unet = engine._eager_unet
        embeds, negative_embeds = pipe.encode_prompt(prompt, engine.device, 1, True, negative)
        latents = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(seed)],
            output_type="latent",
        ).images
        return latents_to_pixels(pipe.vae, latents).cpu().numpy()[0]


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [("a red circle on a white background", None), ("a yellow triangle", "black")],
)
def test_one_chunk_images_are_byte_identical_to_the_pipelines_own_encoding(
    handler, prompt, negative
):
    body = {"inputs": prompt, "parameters": {"seed": 7, "num_inference_steps": 6}}
    if negative:
        body["parameters"]["negative_prompt"] = negative
    response = handler(body)
    got = np.asarray(decode_image(response["image"]).convert("RGB"))
    assert np.array_equal(got, stock_pixels(handler, prompt, negative, seed=7))


def test_a_long_prompt_is_used_whole_and_draws_no_truncation_warning(handler):
    body = {"inputs": "x" * 100 + ", a red circle", "parameters": {"num_inference_steps": 2}}
    response = handler(body)
    assert not [w for w in response["warnings"] if "token" in w]


def test_a_prompt_over_the_chunk_limit_is_refused_naming_the_field(handler):
    limit = handler.settings.limits.max_prompt_chunks
    with pytest.raises(ValueError) as caught:
        handler({"inputs": "q" * (75 * limit + 1)})
    message = str(caught.value)
    assert "`inputs`" in message and f"{75 * limit + 1:,} tokens" in message
    assert "qqq" not in message
    assert handler({"inputs": "a red circle", "parameters": {"num_inference_steps": 1}})


def test_clip_skip_is_validated_echoed_and_changes_the_image(handler):
    body = {"inputs": "a red circle", "parameters": {"seed": 3, "num_inference_steps": 4}}
    one = handler(body)
    two = handler({**body, "parameters": {**body["parameters"], "clip_skip": 2}})
    assert one["parameters"]["clip_skip"] == 1 and two["parameters"]["clip_skip"] == 2
    assert one["image"] != two["image"]
    json.dumps(two["parameters"])
    for bad in (0, 3, 1.5, "2", True):
        with pytest.raises(ValueError, match="`clip_skip`"):
            handler({**body, "parameters": {**body["parameters"], "clip_skip": bad}})
